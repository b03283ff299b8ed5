//! The files nothing here can run (docker/, Kubernetes manifests) and the commands the docs
//! show are kept honest: every flag they pass to `cutover` exists, the rules ConfigMap is the
//! rules file, the Dockerfile copies what exists, the dashboard asks for metrics that exist.

mod support;

use std::path::Path;

use support::cutover;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn help(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--help");
    let (code, out, err) = cutover(&all, &[]);
    assert_eq!(code, 0, "cutover {args:?} --help: {err}");
    out
}

/// The `--flags` of a command line.
fn flags(line: &str) -> Vec<String> {
    line.split_whitespace()
        .filter(|t| {
            t.starts_with("--")
                && t.len() > 2
                && t[2..].starts_with(|c: char| c.is_ascii_lowercase())
        })
        .map(|t| {
            t.split('=')
                .next()
                .unwrap()
                .trim_matches(|c| c == '"' || c == '\'')
                .to_owned()
        })
        .collect()
}

/// Checks that every flag of a `cutover …` command line exists for its subcommand.
fn check_command(line: &str, origin: &str) {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let Some(at) = tokens.iter().position(|t| *t == "cutover") else {
        return;
    };
    const COMMANDS: &[&str] = &[
        "serve", "migrate", "backfill", "verify", "repair", "rules", "ctl", "report", "demo",
        "fixture",
    ];
    // Program output that starts with the word (`cutover memory: …`) is not a command.
    let Some(sub) = tokens.get(at + 1).filter(|t| COMMANDS.contains(t)) else {
        return;
    };
    let mut path = vec![*sub];
    let nested: &[&str] = match *sub {
        "ctl" => &["status", "set", "history", "mark", "changes", "accept"],
        "rules" => &["check", "explain", "promote"],
        _ => &[],
    };
    if let Some(second) = tokens[at + 2..].iter().find(|t| nested.contains(t)) {
        path.push(second);
    }
    let mut text = help(&path[..1]);
    if path.len() > 1 {
        text.push_str(&help(&path));
    }
    for flag in flags(&tokens[at..].join(" ")) {
        assert!(
            text.contains(&format!("{flag} "))
                || text.contains(&format!("{flag}\n"))
                || text.contains(&format!("{flag} <")),
            "{origin}: `cutover {}` has no {flag} (in: {line})",
            path.join(" ")
        );
    }
}

#[test]
fn the_commands_in_the_docs_exist_with_their_flags() {
    let mut docs = vec!["README.md".to_owned()];
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(format!(
                "docs/{}",
                path.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    let mut checked = 0;
    for doc in &docs {
        let mut in_code = false;
        for line in read(doc).lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            let line = line.replace("cargo run --release -- ", "cutover ");
            if in_code && line.trim_start().starts_with("cutover ") {
                // Each command of a `a && b | c; d` line on its own.
                let code = line.split(" #").next().unwrap();
                for command in code.split(['&', '|', ';']) {
                    check_command(command, doc);
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "only {checked} commands found in the docs");
}

#[test]
fn compose_and_kubernetes_use_flags_that_exist() {
    let serve = help(&["serve"]);
    for file in [
        "docker/compose.yaml",
        "docker/k8s/deployment.yaml",
        "docker/Dockerfile",
    ] {
        let text = read(file);
        // The list items of a `command:`/`args:` block and the CMD line.
        for flag in text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            // The Dockerfile's build lines pass flags to cargo, not to cutover.
            .filter(|l| !file.ends_with("Dockerfile") || l.starts_with("CMD"))
            .flat_map(flags)
            .filter(|f| !f.starts_with("--from") && f != "--build")
        {
            if ["--affiliates", "--anomalies", "--if-empty"].contains(&flag.as_str()) {
                assert!(
                    help(&["fixture"]).contains(&flag),
                    "{file}: fixture has no {flag}"
                );
            } else {
                assert!(serve.contains(&flag), "{file}: serve has no {flag}");
            }
        }
        for env in ["CUTOVER_CONTROL", "CUTOVER_ADMIN_TOKEN", "CUTOVER_UPSTREAM"] {
            if text.contains(env) {
                assert!(
                    serve.contains(&format!("env: {env}")),
                    "{file}: {env} is not read"
                );
            }
        }
    }
}

#[test]
fn the_rules_configmap_is_the_rules_file() {
    let configmap = read("docker/k8s/rules-configmap.yaml");
    let body = configmap
        .split_once("  fature.toml: |\n")
        .expect("the ConfigMap has fature.toml")
        .1;
    let unindented: String = body
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        unindented.trim_end(),
        read("rules/fature.toml").trim_end(),
        "regenerate docker/k8s/rules-configmap.yaml from rules/fature.toml"
    );
}

#[test]
fn the_dockerfile_copies_what_exists_and_the_dashboard_what_is_exported() {
    for line in read("docker/Dockerfile").lines() {
        if let Some(rest) = line.strip_prefix("COPY ")
            && !rest.starts_with("--from")
        {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for source in &parts[..parts.len() - 1] {
                assert!(
                    Path::new(ROOT).join(source).exists(),
                    "Dockerfile copies {source}"
                );
            }
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("docker/grafana/dashboards/cutover.json")).unwrap();
    let metrics = read("docs/metrics.md");
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("cutover_"))
            {
                let base = name.trim_end_matches("_sum").trim_end_matches("_count");
                assert!(
                    metrics.contains(&format!("`{base}`")),
                    "{name} is not in docs/metrics.md"
                );
            }
        }
    }
    assert!(exprs >= 6);
}

/// The metric names an expression (PromQL, a dashboard's or an alert's) uses.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cutover_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Monitoring as the seed's phase 6 asks (issue 20, item 7): every series a proxy counts is
/// exported at zero from the start (so `increase()` alerts see the first event and dashboards
/// show 0, not "No data"), and every metric the shipped alerting rules and the Grafana
/// dashboard name is one a running proxy exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_the_dashboard_name_metrics_a_proxy_exports_from_the_start() {
    let p = support::proxy().await;
    let exported: std::collections::BTreeSet<String> = p
        .metrics()
        .await
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    for series in [
        "cutover_shadow_dropped_total",
        "cutover_comparisons_skipped_total",
        "cutover_auto_rampdowns_total",
        "cutover_control_connected",
        "cutover_admin_auth_failures_total",
        "cutover_logins_total",
    ] {
        assert!(
            exported.contains(series),
            "{series} is not exported before its first event"
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let alerts = std::fs::read_to_string(root.join("docker/alerts.yml")).unwrap();
    let expressions: String = alerts
        .lines()
        .skip_while(|_| false)
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| !l.contains("summary:") && !l.contains("runbook:"))
        .collect::<Vec<_>>()
        .join("\n");
    let dashboard =
        std::fs::read_to_string(root.join("docker/grafana/dashboards/cutover.json")).unwrap();
    for (source, text) in [
        ("docker/alerts.yml", expressions.as_str()),
        ("the dashboard", dashboard.as_str()),
    ] {
        let names = metric_names(text);
        assert!(!names.is_empty(), "{source}: no metric found");
        for name in names {
            // Histograms are exported as name_bucket / _sum / _count (or a summary's quantiles).
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exported.contains(&name) || exported.iter().any(|e| e.starts_with(base)),
                "{source} names {name}, which the proxy does not export"
            );
        }
    }
    p.shutdown().await;
}

/// The runbook's commands run as written inside the Docker set-up (issue 20, item 4): the
/// image's working directory holds the rules (every command's default `--rules rules`), and
/// the compose file's cutover container has the database URL the offline commands read, with
/// PostgreSQL's port published on the loopback interface.
#[test]
fn the_image_runs_the_offline_commands_as_the_runbook_writes_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let dockerfile = read("docker/Dockerfile");
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        runtime.contains("COPY rules /etc/cutover/rules")
            && runtime.contains("WORKDIR /etc/cutover\n"),
        "the runtime image's working directory is where its rules are"
    );
    let compose = read("docker/compose.yaml");
    let service = compose
        .split("\n  cutover:\n")
        .nth(1)
        .and_then(|rest| rest.split("\n  prometheus:").next())
        .expect("a cutover service");
    for variable in ["DATABASE_URL:", "CUTOVER_ADMIN_TOKEN:", "CUTOVER_CONTROL:"] {
        assert!(
            service.contains(variable),
            "the cutover container lacks {variable}"
        );
    }
    assert!(
        compose.contains("- 127.0.0.1:5432:5432"),
        "PostgreSQL's port on the loopback"
    );
}

/// A window without a unit is refused, not read as hours (issue 20, item 6).
#[test]
fn a_report_window_needs_a_unit() {
    let (code, _, err) = cutover(
        &[
            "report",
            "--since",
            "90",
            "--database-url",
            "postgres://nowhere/x",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give a unit"), "{err}");
}
