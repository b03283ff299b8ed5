//! The audit trail of stage changes, newest first.

use serde::Serialize;
use tokio_postgres::Client;

use crate::routing::rules::stage_label;

/// One audit row.
#[derive(Debug, Serialize)]
pub struct AuditEntry {
    pub changed_at: String,
    pub query_type: String,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    pub changed_by: String,
    pub via: String,
    pub forced: bool,
}

/// The most recent changes, newest first.
pub async fn history(
    client: &Client,
    limit: i64,
) -> Result<Vec<AuditEntry>, tokio_postgres::Error> {
    let shown = |stage: Option<String>, percent: Option<i16>| -> Option<String> {
        Some(stage_label(&stage?, percent.unwrap_or(0)))
    };
    Ok(client
        .query(
            "SELECT to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    query_type, from_stage, from_percent, to_stage, to_percent, reason,
                    changed_by, via, forced
             FROM cutover.stage_audit ORDER BY id DESC LIMIT $1",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| AuditEntry {
            changed_at: r.get(0),
            query_type: r.get(1),
            from: shown(r.get(2), r.get(3)),
            to: shown(Some(r.get(4)), Some(r.get(5))).unwrap_or_default(),
            reason: r.get(6),
            changed_by: r.get(7),
            via: r.get(8),
            forced: r.get(9),
        })
        .collect())
}
