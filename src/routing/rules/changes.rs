//! Behaviour changes: where v2 answers differently from legacy on purpose — it refuses a move
//! that makes a parent cycle, it detaches the children of a deleted parent, it lacks the rows
//! the backfill quarantined. The application can tell, so each one is declared in the rules
//! (`[[behaviour_change]]`: its kind, the query types it shows through, what it means), shown by
//! `cutover rules explain`, counted (`cutover_behaviour_changes_total`, the report), and the
//! gate refuses to let those query types serve from v2 until a reviewer has accepted it
//! (`cutover ctl accept`). The kinds are the differences the product knows how to observe.

use super::Location;

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
