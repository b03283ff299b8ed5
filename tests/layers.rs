//! The source tree's layers (docs/architecture.md, "Layers"): a part of `src/` imports only
//! the parts below it, so no import cycle can form between them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// From the top down.
const LAYERS: &[&str] = &[
    "cli", "demo", "serve", "admin", "report", "proxy", "control", "migrate", "shadow", "metrics",
    "routing", "config", "net", "wire",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The parts a file names through `crate::`: `crate::part::…`, and each top-level item of a
/// `use crate::{…}` group. Comments are left out.
fn parts_named(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut named = BTreeSet::new();
    let path = regex::Regex::new(r"\bcrate::([a-z_]+)").unwrap();
    for c in path.captures_iter(&code) {
        named.insert(c[1].to_owned());
    }
    let group = regex::Regex::new(r"(?s)\buse crate::\{(.*?)\};").unwrap();
    for c in group.captures_iter(&code) {
        let (mut depth, mut item) = (0, String::new());
        for ch in c[1].chars().chain([',']) {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    let head = item.trim().split("::").next().unwrap_or("").to_owned();
                    named.insert(head);
                    item.clear();
                    continue;
                }
                _ => {}
            }
            item.push(ch);
        }
    }
    named
}

#[test]
fn every_part_imports_only_parts_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let layer = |name: &str| LAYERS.iter().position(|l| *l == name);
    let mut upward = Vec::new();
    let mut seen = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let part = first.to_string_lossy().trim_end_matches(".rs").to_owned();
        if part == "lib" || part == "main" {
            continue;
        }
        let me = layer(&part).unwrap_or_else(|| {
            panic!("src/{part} is in no layer: place it in LAYERS and in docs/architecture.md")
        });
        seen.insert(part.clone());
        for named in parts_named(&std::fs::read_to_string(file).unwrap()) {
            if let Some(other) = layer(&named)
                && other <= me
                && named != part
            {
                upward.push(format!("{} imports {named}", relative.display()));
            }
        }
    }
    assert!(upward.is_empty(), "imports of a part above: {upward:#?}");
    // The list names what exists, nothing more.
    assert_eq!(seen.len(), LAYERS.len(), "{seen:?}");
}

#[test]
fn the_layers_are_those_the_architecture_draws() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .unwrap();
    assert!(
        doc.contains(&LAYERS.join(" ─▶ ")),
        "docs/architecture.md's layer line"
    );
}
