//! Behaviour changes on the control plane: how often each kind happened, which the reviewers
//! accepted (`cutover.behaviour_acceptances`), and the gate that lets no query type serve from
//! v2 while a change it shows through is not accepted, or while v2 behaved differently in a
//! way the rules do not declare (rules/changes.rs).

use serde::Serialize;
use tokio_postgres::GenericClient;

use super::ChangeError;
use crate::routing::rules::{
    RuleSet,
    changes::{BehaviourChange, ChangeKind},
};

/// What the gate needs of the rules for one query type.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    /// The declared changes the query type shows (name, kind).
    pub changes: Vec<(String, ChangeKind)>,
    /// The kinds the rules declare nothing for.
    pub undeclared: Vec<ChangeKind>,
}

impl Declared {
    pub fn of(rules: &RuleSet, query_type: &str) -> Self {
        Self {
            changes: rules
                .changes_of(query_type)
                .map(|c| (c.name.clone(), c.kind))
                .collect(),
            undeclared: undeclared(rules),
        }
    }
}

/// The kinds the rules declare nothing for.
fn undeclared(rules: &RuleSet) -> Vec<ChangeKind> {
    ChangeKind::ALL
        .into_iter()
        .filter(|k| !rules.behaviour_changes.iter().any(|c| c.kind == *k))
        .collect()
}

/// A reviewer's acceptance.
#[derive(Debug, Clone, Serialize)]
pub struct Acceptance {
    pub reason: String,
    pub accepted_by: String,
    pub via: String,
    /// UTC, `YYYY-MM-DD HH:MM`.
    pub accepted_at: String,
}

/// One behaviour change, declared or not, as operators and the report see it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Its name in the rules; `None` for a kind the rules do not declare.
    pub name: Option<String>,
    pub kind: ChangeKind,
    pub description: Option<String>,
    pub query_types: Vec<String>,
    /// How often it happened (`cutover.behaviour_observed`).
    pub observed: i64,
    pub accepted: Option<Acceptance>,
}

/// How often a kind of behaviour change happened (`cutover.behaviour_observed`).
pub async fn observed(
    client: &impl GenericClient,
    kind: ChangeKind,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT cutover.behaviour_observed($1)", &[&kind.as_str()])
        .await?
        .get(0))
}

async fn acceptance(
    client: &impl GenericClient,
    name: &str,
    kind: ChangeKind,
) -> Result<Option<Acceptance>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT reason, accepted_by, via, to_char(accepted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')
             FROM cutover.behaviour_acceptances WHERE change = $1 AND kind = $2",
            &[&name, &kind.as_str()],
        )
        .await?
        .map(|r| Acceptance {
            reason: r.get(0),
            accepted_by: r.get(1),
            via: r.get(2),
            accepted_at: r.get(3),
        }))
}

/// Every declared change, then every undeclared kind that happened.
pub async fn status(
    client: &impl GenericClient,
    rules: &RuleSet,
) -> Result<Vec<Status>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for c in &rules.behaviour_changes {
        out.push(declared_status(client, c).await?);
    }
    for kind in undeclared(rules) {
        let n = observed(client, kind).await?;
        if n > 0 {
            out.push(Status {
                name: None,
                kind,
                description: None,
                query_types: Vec::new(),
                observed: n,
                accepted: None,
            });
        }
    }
    Ok(out)
}

async fn declared_status(
    client: &impl GenericClient,
    c: &BehaviourChange,
) -> Result<Status, tokio_postgres::Error> {
    Ok(Status {
        name: Some(c.name.clone()),
        kind: c.kind,
        description: Some(c.description.clone()),
        query_types: c.query_types.clone(),
        observed: observed(client, c.kind).await?,
        accepted: acceptance(client, &c.name, c.kind).await?,
    })
}

/// Records a reviewer's acceptance of the declared change `name` (again: the new reason
/// replaces the old).
pub async fn accept(
    client: &impl GenericClient,
    rules: &RuleSet,
    name: &str,
    reason: &str,
    who: &str,
    via: &'static str,
) -> Result<Status, ChangeError> {
    let Some(change) = rules.behaviour_changes.iter().find(|c| c.name == name) else {
        return Err(ChangeError::UnknownBehaviourChange(name.to_owned()));
    };
    if reason.trim().is_empty() {
        return Err(ChangeError::Invalid("a reason is required".into()));
    }
    client
        .execute(
            "INSERT INTO cutover.behaviour_acceptances (change, kind, reason, accepted_by, via)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (change) DO UPDATE SET kind = EXCLUDED.kind, reason = EXCLUDED.reason,
                 accepted_by = EXCLUDED.accepted_by, via = EXCLUDED.via, accepted_at = now()",
            &[&name, &change.kind.as_str(), &reason, &who, &via],
        )
        .await?;
    tracing::info!(change = name, %who, via, "behaviour change accepted");
    Ok(declared_status(client, change).await?)
}

/// The gate for a raise that serves more from v2: every declared change the query type shows
/// must be accepted, and no undeclared kind may have happened.
pub(super) async fn gate(
    client: &impl GenericClient,
    declared: &Declared,
) -> Result<(), ChangeError> {
    for (name, kind) in &declared.changes {
        if acceptance(client, name, *kind).await?.is_none() {
            return Err(ChangeError::Unaccepted {
                change: name.clone(),
                kind: *kind,
                observed: observed(client, *kind).await?,
            });
        }
    }
    for kind in &declared.undeclared {
        let n = observed(client, *kind).await?;
        if n > 0 {
            return Err(ChangeError::Undeclared {
                kind: *kind,
                observed: n,
            });
        }
    }
    Ok(())
}
