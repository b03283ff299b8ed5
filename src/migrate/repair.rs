//! `cutover repair`: brings the target back to the legacy truth for every key that drifted.
//!
//! - a key missing in the target (and not quarantined) is inserted, parents before children,
//!   through the target's own triggers (paths, closure, counters) — before the updates, so
//!   that a row can be given back a parent that was missing;
//! - a key only the target has is deleted (its children, if any, are detached as any delete
//!   detaches them);
//! - a key whose mapped columns differ gets legacy's values (a parent change moves the
//!   subtree; a move that would make a cycle is refused by the target and reported);
//! - the closure is then compared with the truth recomputed from the parent links (wrong rows
//!   removed, missing ones added) and the derived counters recomputed from the tree.
//!
//! Everything runs in one transaction: a repair applies whole or not at all. `--dry-run`
//! runs it and rolls back, reporting what it would have done.

use serde::Serialize;
use tokio_postgres::Client;

use crate::routing::rules::{TableMap, quote_ident};

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub inserted: Vec<i64>,
    pub deleted: Vec<i64>,
    pub updated: Vec<i64>,
    /// Keys that could not be repaired, and why (a parent the target does not have, a cycle).
    pub unrepairable: Vec<(i64, String)>,
    pub counters_fixed: u64,
    /// Entries of the dual-write repair queue (`cutover.write_divergences`) now resolved,
    /// and those still pending (their keys are unrepairable).
    pub queue_resolved: u64,
    pub queue_pending: u64,
    /// Closure rows removed (wrong) and added (missing), against the parent links.
    pub closure_removed: u64,
    pub closure_added: u64,
    pub dry_run: bool,
}

pub async fn run(
    client: &Client,
    table: &TableMap,
    dry_run: bool,
    show: super::progress::Show,
) -> Result<Summary, tokio_postgres::Error> {
    // The repair's own writes on the target are not to be mirrored back into legacy.
    client
        .batch_execute("SET cutover.mirroring = 'on'; BEGIN")
        .await?;
    let result = repair(client, table, dry_run, show).await;
    match (&result, dry_run) {
        (Ok(_), false) => client.batch_execute("COMMIT").await?,
        _ => client.batch_execute("ROLLBACK").await?,
    }
    result
}

async fn repair(
    client: &Client,
    table: &TableMap,
    dry_run: bool,
    show: super::progress::Show,
) -> Result<Summary, tokio_postgres::Error> {
    let legacy = table.legacy.quoted();
    let key = quote_ident(&table.key);
    let shared: Vec<&crate::routing::rules::ColumnMap> = table.stored_columns().collect();
    let (target_cols, legacy_cols) = table.stored_column_lists("l");
    let differs = crate::routing::rules::any_differs_sql(shared.iter().copied());
    let quarantine: bool = client
        .query_one(
            "SELECT to_regclass('cutover.backfill_quarantine') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    let not_quarantined = if quarantine {
        format!(
            "AND NOT EXISTS (SELECT 1 FROM cutover.backfill_quarantine qq WHERE qq.affiliate_id = l.{key})"
        )
    } else {
        String::new()
    };
    let mut summary = Summary {
        dry_run,
        ..Summary::default()
    };

    // Extra keys first: a row the target should not have may hold an external_id a missing
    // row needs.
    for row in client
        .query(
            &format!(
                "DELETE FROM fature_v2.affiliates_optimized t
                 WHERE NOT EXISTS (SELECT 1 FROM {legacy} l WHERE l.{key} = t.affiliate_id)
                 RETURNING t.affiliate_id::int8"
            ),
            &[],
        )
        .await?
    {
        summary.deleted.push(row.get(0));
    }

    // Missing keys, parents first: rounds of the rows whose parent the target already has.
    loop {
        let inserted: Vec<i64> = client
            .query(
                &format!(
                    "INSERT INTO fature_v2.affiliates_optimized ({target_cols})
                     SELECT {legacy_cols} FROM {legacy} l
                     WHERE NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized t WHERE t.affiliate_id = l.{key})
                       {not_quarantined}
                       AND (l.parent_affiliate_id IS NULL OR EXISTS (
                            SELECT 1 FROM fature_v2.affiliates_optimized p WHERE p.affiliate_id = l.parent_affiliate_id))
                     ORDER BY l.{key}
                     RETURNING affiliate_id::int8"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if inserted.is_empty() {
            break;
        }
        summary.inserted.extend(inserted);
    }
    // Different keys: legacy's values, one row at a time so that a refused move (a cycle)
    // is reported and does not stop the rest.
    let different: Vec<i64> = client
        .query(
            &format!(
                "SELECT l.{key}::int8 FROM {legacy} l JOIN fature_v2.affiliates_optimized t ON t.affiliate_id = l.{key}
                 WHERE {differs}
                   AND NOT (l.parent_affiliate_id IS NOT NULL AND t.parent_affiliate_id IS NULL
                            AND EXISTS (SELECT 1 FROM fature_v2.detached_affiliates d
                                        WHERE d.affiliate_id = t.affiliate_id
                                          AND d.former_parent_id = l.parent_affiliate_id)
                            AND NOT EXISTS (SELECT 1 FROM {legacy} lp WHERE lp.{key} = l.parent_affiliate_id)
                            AND NOT ({}))
                 ORDER BY 1",
                shared
                    .iter()
                    .filter(|c| c.legacy != "parent_affiliate_id")
                    .map(|c| format!("l.{} IS DISTINCT FROM t.{}", quote_ident(&c.legacy), quote_ident(&c.target)))
                    .collect::<Vec<_>>()
                    .join(" OR ")
            ),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let update = client
        .prepare(&format!(
            "UPDATE fature_v2.affiliates_optimized t SET ({target_cols}) = ({legacy_cols})
             FROM {legacy} l WHERE l.{key} = t.affiliate_id AND t.affiliate_id = $1"
        ))
        .await?;
    let phase = super::progress::Phase::start(
        show,
        "repair",
        "different rows",
        different.len() as u64,
        "rows",
    );
    for id in different {
        phase.inc(1);
        client.batch_execute("SAVEPOINT repair_row").await?;
        match client.execute(&update, &[&id]).await {
            Ok(_) => {
                client.batch_execute("RELEASE SAVEPOINT repair_row").await?;
                summary.updated.push(id);
            }
            Err(e) => {
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT repair_row")
                    .await?;
                let why = e
                    .as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_owned());
                summary.unrepairable.push((id, why));
            }
        }
    }
    phase.finish();

    for row in client
        .query(
            &format!(
                "SELECT l.{key}::int8, l.parent_affiliate_id::int8 FROM {legacy} l
                 WHERE NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized t WHERE t.affiliate_id = l.{key})
                   {not_quarantined}
                 ORDER BY 1"
            ),
            &[],
        )
        .await?
    {
        let parent: Option<i64> = row.get(1);
        summary.unrepairable.push((
            row.get(0),
            format!("its parent {} is not in the target (quarantined or missing)", parent.unwrap_or(0)),
        ));
    }

    // The closure, against the truth recomputed from the parent links.
    client
        .batch_execute(
            "CREATE TEMP TABLE repair_truth ON COMMIT DROP AS
             WITH RECURSIVE truth(ancestor_id, descendant_id, level_distance) AS (
                 SELECT parent_affiliate_id, affiliate_id, 1
                 FROM fature_v2.affiliates_optimized WHERE parent_affiliate_id IS NOT NULL
                 UNION ALL
                 SELECT p.parent_affiliate_id, t.descendant_id, t.level_distance + 1
                 FROM truth t JOIN fature_v2.affiliates_optimized p ON p.affiliate_id = t.ancestor_id
                 WHERE p.parent_affiliate_id IS NOT NULL AND t.level_distance < 100000
             )
             SELECT * FROM truth",
        )
        .await?;
    summary.closure_removed = client
        .execute(
            "DELETE FROM fature_v2.hierarchy_index h
             WHERE NOT EXISTS (SELECT 1 FROM repair_truth t
                               WHERE t.ancestor_id = h.ancestor_id AND t.descendant_id = h.descendant_id
                                 AND t.level_distance = h.level_distance)",
            &[],
        )
        .await?;
    summary.closure_added = client
        .execute(
            "INSERT INTO fature_v2.hierarchy_index (ancestor_id, descendant_id, level_distance)
             SELECT t.ancestor_id, t.descendant_id, t.level_distance FROM repair_truth t
             WHERE NOT EXISTS (SELECT 1 FROM fature_v2.hierarchy_index h
                               WHERE h.ancestor_id = t.ancestor_id AND h.descendant_id = t.descendant_id)",
            &[],
        )
        .await?;

    // The derived counters, from the tree.
    let fixed = client
        .execute(
            "UPDATE fature_v2.affiliates_optimized t
             SET direct_referrals_count = c.direct, total_network_size = c.network
             FROM (SELECT a.affiliate_id,
                          (SELECT count(*) FROM fature_v2.affiliates_optimized ch WHERE ch.parent_affiliate_id = a.affiliate_id)::int AS direct,
                          -- the column plus its pending deltas is the size (migration 0017)
                          ((SELECT count(*) FROM fature_v2.hierarchy_index h WHERE h.ancestor_id = a.affiliate_id)
                           - coalesce((SELECT sum(d.delta) FROM fature_v2.network_size_deltas d
                                       WHERE d.affiliate_id = a.affiliate_id), 0))::int AS network
                   FROM fature_v2.affiliates_optimized a) c
             WHERE t.affiliate_id = c.affiliate_id
               AND (t.direct_referrals_count, t.total_network_size) IS DISTINCT FROM (c.direct, c.network)",
            &[],
        )
        .await?;
    summary.counters_fixed = fixed;
    // Legacy's own counter, carried in v2 for the way back (migration 0014).
    client
        .batch_execute("SELECT cutover.carry_legacy_counters(NULL)")
        .await?;
    queue(client, &mut summary).await?;
    Ok(summary)
}

/// The dual-write repair queue: every pending entry whose key is now as legacy has it is
/// marked repaired (the repair above compared every key, queued or not).
async fn queue(client: &Client, summary: &mut Summary) -> Result<(), tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('cutover.write_divergences') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(());
    }
    let unrepairable: Vec<i64> = summary.unrepairable.iter().map(|(id, _)| *id).collect();
    summary.queue_resolved = client
        .execute(
            "UPDATE cutover.write_divergences SET repaired_at = now()
             WHERE repaired_at IS NULL
               AND (affiliate_id IS NULL OR affiliate_id <> ALL ($1::int8[]))",
            &[&unrepairable],
        )
        .await?;
    summary.queue_pending = client
        .query_one(
            "SELECT count(*) FROM cutover.write_divergences WHERE repaired_at IS NULL",
            &[],
        )
        .await?
        .get::<_, i64>(0) as u64;
    Ok(())
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would" } else { "did" };
        let keys = |v: &[i64]| {
            let shown: Vec<String> = v.iter().take(10).map(ToString::to_string).collect();
            if v.len() > 10 {
                format!("{} …", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        writeln!(
            f,
            "repair ({verb}): insert {} [{}]",
            self.inserted.len(),
            keys(&self.inserted)
        )?;
        writeln!(
            f,
            "  update {} [{}]",
            self.updated.len(),
            keys(&self.updated)
        )?;
        writeln!(
            f,
            "  delete {} [{}]",
            self.deleted.len(),
            keys(&self.deleted)
        )?;
        writeln!(f, "  counters fixed {}", self.counters_fixed)?;
        writeln!(
            f,
            "  dual-write queue: {} resolved, {} pending",
            self.queue_resolved, self.queue_pending
        )?;
        writeln!(
            f,
            "  closure rows removed {}, added {}",
            self.closure_removed, self.closure_added
        )?;
        write!(f, "  unrepairable {}", self.unrepairable.len())?;
        for (id, why) in self.unrepairable.iter().take(20) {
            write!(f, "\n    {id}: {why}")?;
        }
        Ok(())
    }
}
