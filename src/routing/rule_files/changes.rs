//! The `[[behaviour_change]]` tables read and validated ([`crate::routing::rules::changes`]
//! says what they mean).

use std::collections::HashSet;

use super::{Builder, raw::RawBehaviourChange};
use crate::routing::rules::changes::{BehaviourChange, ChangeKind};

fn is_label(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Builder {
    /// Validates the declarations of one file against the query types' names.
    pub(super) fn behaviour_changes(
        &mut self,
        file: &std::path::Path,
        text: &str,
        raw: &[toml::Spanned<RawBehaviourChange>],
        query_types: &HashSet<String>,
        declared: &mut Vec<BehaviourChange>,
    ) {
        for entry in raw {
            let r = entry.get_ref();
            let before = self.diagnostics.len();
            let name = r.name.get_ref();
            if !is_label(name) {
                self.at(
                    file,
                    text,
                    &r.name,
                    format!("behaviour change name {name:?}: lower case letters, digits and _ (it is a metric label)"),
                );
            } else if declared.iter().any(|c| &c.name == name) {
                self.at(
                    file,
                    text,
                    &r.name,
                    format!("duplicate behaviour change {name:?}"),
                );
            }
            let kind = ChangeKind::parse(r.kind.get_ref());
            match kind {
                None => self.at(
                    file,
                    text,
                    &r.kind,
                    format!(
                        "unknown behaviour change kind {:?}: one of {}",
                        r.kind.get_ref(),
                        ChangeKind::ALL.map(ChangeKind::as_str).join(", ")
                    ),
                ),
                Some(k) => {
                    if let Some(other) = declared.iter().find(|c| c.kind == k) {
                        self.at(
                            file,
                            text,
                            &r.kind,
                            format!("kind {k} is already declared as {:?}", other.name),
                        );
                    }
                }
            }
            if r.query_types.get_ref().is_empty() {
                self.at(
                    file,
                    text,
                    &r.query_types,
                    "name the query types through which the application sees it",
                );
            }
            for qt in r.query_types.get_ref() {
                if !query_types.contains(qt.get_ref()) {
                    self.at(
                        file,
                        text,
                        qt,
                        format!("no query type {:?} in the rules", qt.get_ref()),
                    );
                }
            }
            if r.description.get_ref().trim().is_empty() {
                self.at(
                    file,
                    text,
                    &r.description,
                    "say what the application sees (reviewers accept it on this text)",
                );
            }
            if self.diagnostics.len() > before {
                continue;
            }
            let Some(kind) = kind else { continue };
            declared.push(BehaviourChange {
                name: name.clone(),
                kind,
                query_types: r
                    .query_types
                    .get_ref()
                    .iter()
                    .map(|q| q.get_ref().clone())
                    .collect(),
                description: r.description.get_ref().trim().to_owned(),
                location: self.location(file, text, &r.name),
            });
        }
    }
}
