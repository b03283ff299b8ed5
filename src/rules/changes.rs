//! Behaviour changes: where v2 answers differently from legacy on purpose — it refuses a move
//! that makes a parent cycle, it detaches the children of a deleted parent, it lacks the rows
//! the backfill quarantined. The application can tell, so each one is declared in the rules
//! (`[[behaviour_change]]`: its kind, the query types it shows through, what it means), shown by
//! `cutover rules explain`, counted (`cutover_behaviour_changes_total`, the report), and the
//! gate refuses to let those query types serve from v2 until a reviewer has accepted it
//! (`cutover ctl accept`). The kinds are the differences the product knows how to observe.

use std::collections::HashSet;

use super::{Builder, Location, raw::RawBehaviourChange};

/// A difference v2 makes on purpose, which the product can observe and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A move under one's own descendant: legacy accepts it (a cycle), v2 fails it with
    /// 23514 (`chk_no_cycle`).
    RefusedCycle,
    /// A deleted parent: legacy's children keep pointing at it, v2's become roots (recorded in
    /// `fature_v2.detached_affiliates`).
    DetachedChildren,
    /// Rows the backfill could not place (orphans, cycles): v2 does not have them
    /// (`cutover.backfill_quarantine`).
    QuarantinedRows,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 3] = [
        ChangeKind::RefusedCycle,
        ChangeKind::DetachedChildren,
        ChangeKind::QuarantinedRows,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::RefusedCycle => "refused_cycle",
            ChangeKind::DetachedChildren => "detached_children",
            ChangeKind::QuarantinedRows => "quarantined_rows",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The error (SQLSTATE, constraint) by which it shows on a statement v2 serves, when it
    /// shows as one.
    pub fn error(self) -> Option<(&'static str, &'static str)> {
        match self {
            ChangeKind::RefusedCycle => Some(("23514", "chk_no_cycle")),
            ChangeKind::DetachedChildren | ChangeKind::QuarantinedRows => None,
        }
    }
}

impl std::fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A declared behaviour change.
#[derive(Debug, Clone)]
pub struct BehaviourChange {
    /// A label (`[a-z][a-z0-9_]*`): metrics, the report, `ctl accept`.
    pub name: String,
    pub kind: ChangeKind,
    /// The named query types through which the application sees it.
    pub query_types: Vec<String>,
    /// What the application sees, for reviewers.
    pub description: String,
    pub location: Location,
}

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
