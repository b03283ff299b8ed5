//! `cutover rules promote fp_… --name NAME`: an automatic query type (a statement no rule
//! names, known by its fingerprint) written into the rules as a named one, so that it gets a
//! name in metrics and reports, its own comparison options and expected classes, a target
//! SQL if wanted — and so that the stage it has live carries over.
//!
//! The fingerprint's normalized text (`cutover.fingerprints`, recorded by the shadow) has `?`
//! where the statement had values; the rule's `match` gets `$1`, `$2`, … in their place,
//! which fingerprints the same. The new rule set is validated whole before the file is
//! written; the file is written whole (a temporary file renamed over it). The live stage of
//! the automatic type is copied to the new name, audited, in the control database.

use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use super::RuleSet;
use crate::routing::fingerprint;

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error(
        "no automatic query type {0:?} has been seen (cutover.fingerprints): run the application through the proxy with the shadow on, or check the id in `cutover report`"
    )]
    Unknown(String),
    #[error(
        "{0:?} is not a query type name: lower-case letters, digits and _, starting with a letter"
    )]
    BadName(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Rules(#[from] super::RulesError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// What was done.
#[derive(Debug)]
pub struct Promoted {
    pub file: PathBuf,
    pub rule: String,
}

/// A normalized text's `?`s as `$1`, `$2`, … — checked to fingerprint the same.
pub fn example_of(normalized: &str) -> Result<String, PromoteError> {
    let mut out = String::with_capacity(normalized.len() + 8);
    let mut n = 0;
    for c in normalized.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    match fingerprint::fingerprint(&out) {
        Ok(f) if f.text == normalized => Ok(out),
        _ => Err(PromoteError::Invalid(format!(
            "the statement cannot be written back as SQL that fingerprints the same: {normalized}"
        ))),
    }
}

/// The `[[query_type]]` block for a rule.
fn block(name: &str, fingerprint_id: &str, example: &str) -> String {
    // A TOML literal string cannot hold ''' itself; SQL rarely does.
    format!(
        "\n# Promoted from the automatic query type {fingerprint_id} by `cutover rules promote`.\n[[query_type]]\nname = \"{name}\"\nmatch = '''\n{example}'''\n"
    )
}

/// Promotes automatic type `id` to a rule named `name` in `dir`/`file`.
pub async fn promote(
    client: &Client,
    dir: &Path,
    file: &str,
    id: &str,
    name: &str,
) -> Result<Promoted, PromoteError> {
    if !super::is_identifier(name) || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(PromoteError::BadName(name.to_owned()));
    }
    let normalized: String = client
        .query_opt(
            "SELECT normalized FROM cutover.fingerprints WHERE fingerprint = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| PromoteError::Unknown(id.to_owned()))?
        .get(0);
    let example = example_of(&normalized)?;
    if example.contains("'''") {
        return Err(PromoteError::Invalid(
            "the statement holds ''' and cannot be written as a TOML literal string; write the rule by hand".into(),
        ));
    }
    let path = dir.join(file);
    let mut text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(PromoteError::Write { path, source }),
    };
    let rule = block(name, id, &example);
    text.push_str(&rule);

    // The whole set, with the new file, must be valid: as the proxy would load it.
    let mut sources = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| PromoteError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && *p != path)
        .collect();
    names.sort();
    for other in names {
        let other_text = std::fs::read_to_string(&other).map_err(|source| PromoteError::Write {
            path: other.clone(),
            source,
        })?;
        sources.push((other, other_text));
    }
    sources.push((path.clone(), text.clone()));
    let rules = RuleSet::from_sources(&sources)?;
    let promoted = rules
        .named(name)
        .ok_or_else(|| PromoteError::Invalid(format!("{name}: not in the rules after writing")))?;
    let matched = fingerprint::fingerprint(&example)
        .ok()
        .and_then(|f| rules.query_type_for(&f).map(|q| q.name.clone()));
    if matched.as_deref() != Some(promoted.name.as_str()) {
        return Err(PromoteError::Invalid(format!(
            "the statement is matched by query type {matched:?} already"
        )));
    }

    let temporary = path.with_extension("toml.promoting");
    std::fs::write(&temporary, &text)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .map_err(|source| PromoteError::Write {
            path: path.clone(),
            source,
        })?;

    Ok(Promoted { file: path, rule })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_normalized_text_becomes_a_statement_that_fingerprints_the_same() {
        let normalized = fingerprint::fingerprint(
            "SELECT affiliate_id FROM affiliates WHERE status IN ('a', 'b') AND level_1_referrals > 3 LIMIT 5",
        )
        .unwrap()
        .text;
        let example = example_of(&normalized).unwrap();
        assert_eq!(
            example,
            "SELECT affiliate_id FROM affiliates WHERE status IN ($1) AND level_1_referrals > $2 LIMIT $3"
        );
        assert!(block("top_by_status", "fp_0", &example).contains("match = '''\nSELECT"));
    }
}
