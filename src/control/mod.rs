//! The control plane's shared state in the `cutover` schema (migration 0006 and later).
//!
//! Today: the rules' baseline for each named query type is written into
//! `cutover.query_type_state` when a proxy starts — the stage only where the query type has
//! no live state yet (live changes win over the files), the dual-write mode (`strict`) always
//! (it is a reviewed rule option, not live state). The dual-write trigger reads that table
//! at each statement, so every replica and every writer sees one truth.
//!
//! Never blocks the proxy: a control database that cannot be reached is logged, and the
//! proxy serves on.

use tokio_postgres::Client;

use crate::rules::{RuleSet, Stage};

/// The stage name and percent stored for a stage.
pub fn stage_columns(stage: Stage) -> (&'static str, i16) {
    match stage {
        Stage::Legacy => ("legacy", 0),
        Stage::Shadow => ("shadow", 0),
        Stage::Cutover(p) => ("cutover", i16::from(p.get())),
        Stage::Target => ("target", 100),
        Stage::Complete => ("complete", 100),
    }
}

/// Writes the rules' baseline into `cutover.query_type_state`; returns the query types
/// that had no state yet.
pub async fn seed_query_types(
    client: &Client,
    rules: &RuleSet,
) -> Result<u64, tokio_postgres::Error> {
    let statement = client
        .prepare(
            "INSERT INTO cutover.query_type_state AS s (query_type, stage, percent, dual_write)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (query_type) DO UPDATE SET dual_write = EXCLUDED.dual_write
                 WHERE s.dual_write <> EXCLUDED.dual_write
             RETURNING (xmax = 0) AS inserted",
        )
        .await?;
    let mut inserted = 0;
    for qt in &rules.query_types {
        let (stage, percent) = stage_columns(qt.stage);
        let mode = if qt.strict { "strict" } else { "isolated" };
        let rows = client
            .query(&statement, &[&qt.name, &stage, &percent, &mode])
            .await?;
        inserted += rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
    }
    Ok(inserted)
}

/// Seeds the state through the upstream URL's own user, if it names one; logs the outcome.
pub async fn seed_at_start(config: tokio_postgres::Config, rules: std::sync::Arc<RuleSet>) {
    if config.get_user().is_none() {
        tracing::info!(
            "the upstream URL names no user: query type state not seeded from the rules"
        );
        return;
    }
    let client = match crate::connect::connect(&config).await {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%error, "control database unreachable: query type state not seeded");
            return;
        }
    };
    match seed_query_types(&client, &rules).await {
        Ok(n) => tracing::info!(new = n, "query type state seeded from the rules"),
        Err(error) => {
            tracing::warn!(%error, "query type state not seeded (is `cutover migrate` applied?)")
        }
    }
}
