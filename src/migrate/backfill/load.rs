//! The backfill's two loads, in checkpointed batches: the rows (key order) and the closure
//! (made from the plan's paths, by `COPY`).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::{Client, error::SqlState};

use super::Options;
use crate::migrate::copy_in::CopyIn;
use crate::routing::rules::{TableMap, quote_ident};

/// The next batch's last (level, id) after `from`, or None when done.
async fn batch_end(
    client: &Client,
    from: (i32, i64),
    batch: i64,
) -> Result<Option<(i32, i64)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT level, affiliate_id::int8 FROM (
                 SELECT level, affiliate_id FROM cutover.backfill_plan
                 WHERE (level, affiliate_id) > ($1, $2)
                 ORDER BY level, affiliate_id LIMIT $3
             ) b ORDER BY level DESC, affiliate_id DESC LIMIT 1",
            &[&from.0, &from.1, &batch],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The last key of the next batch of `batch` plan rows after key `from`, in key order.
async fn batch_end_by_key(
    client: &Client,
    from: i64,
    batch: i64,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT max(affiliate_id)::int8 FROM (
                 SELECT affiliate_id FROM cutover.backfill_plan
                 WHERE affiliate_id > $1 ORDER BY affiliate_id LIMIT $2
             ) b HAVING count(*) > 0",
            &[&from, &batch],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Where the loads stand: the rows' last (level, id) copied (level 0: in key order) and the
/// closure's last (level, id) whose pairs are in.
struct Checkpoints {
    rows: (i32, i64),
    closure: (i32, i64),
}

async fn checkpoints(client: &Client) -> Result<Checkpoints, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT last_level, last_id, closure_level, closure_id FROM cutover.backfill_progress",
            &[],
        )
        .await?;
    Ok(Checkpoints {
        rows: (row.get(0), row.get(1)),
        closure: (row.get(2), row.get(3)),
    })
}

fn maybe_abort(options: &Options, batches: &AtomicU64) {
    let committed = batches.fetch_add(1, Ordering::Relaxed) + 1;
    if options.abort_after_batches == Some(committed) {
        // A test of resumption: die like a kill -9 would, with no cleanup.
        std::process::abort();
    }
}

/// Copies the plan's rows; returns how many were in v2 already (dual-written, kept).
pub(super) async fn copy_rows(
    client: &Client,
    table: &TableMap,
    options: &Options,
    batches: &AtomicU64,
) -> Result<i64, tokio_postgres::Error> {
    // From the plan's snapshot of the rows, not from legacy as it is now (see plan()).
    let (mut target_cols, mut source_cols) = table.stored_column_lists("p");
    // A derived column's copy of legacy's own value goes in with the row: carried here, it
    // is not written again for every row by the counters phase's carry (a whole-table
    // update: 1M row versions, about a fifth of a million-row backfill).
    for c in table.columns.iter() {
        if let Some(copy) = &c.legacy_copy {
            target_cols.push_str(&format!(", {}", quote_ident(copy)));
            source_cols.push_str(&format!(", p.{}", quote_ident(&c.legacy)));
        }
    }
    // The usual case skips rows already present with an anti-join; a row dual-written
    // between that check and the insert makes the batch fall back to ON CONFLICT (whose
    // speculative insertion costs more per row).
    let rows_sql = |guard: &str| {
        format!(
            "WITH ins AS (
                 INSERT INTO fature_v2.affiliates_optimized
                     ({target_cols}, hierarchy_path, hierarchy_level, direct_referrals_count, total_network_size)
                 SELECT {source_cols}, p.path, p.level, p.direct, p.network
                 FROM cutover.backfill_plan p
                 WHERE p.affiliate_id > $1 AND p.affiliate_id <= $2
                   AND NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized t WHERE t.affiliate_id = p.affiliate_id)
                 ORDER BY p.affiliate_id
                 {guard}
                 RETURNING 1
             )
             SELECT count(*) FROM ins"
        )
    };
    let insert = client.prepare(&rows_sql("")).await?;
    let insert_safe = client
        .prepare(&rows_sql("ON CONFLICT (affiliate_id) DO NOTHING"))
        .await?;
    let total: i64 = client
        .query_one("SELECT count(*) FROM cutover.backfill_plan", &[])
        .await?
        .get(0);
    let mut progress = crate::migrate::progress::Phase::start(
        options.progress,
        "backfill",
        "rows",
        total as u64,
        "rows",
    );
    // In key order, not parents first: the parent key and v2's triggers are aside, and the
    // primary key (and any index that follows the key) is then filled in order, not at
    // random — which is what ids that do not follow the tree cost. The checkpoint is the last
    // key (level 0); a checkpoint with a level is a parents-first one from an earlier version,
    // taken up from the start (the anti-join skips what is in).
    let mut from = match checkpoints(client).await?.rows {
        (0, id) => id,
        _ => 0,
    };
    let done_before: i64 = client
        .query_one(
            "SELECT count(*) FROM cutover.backfill_plan WHERE affiliate_id <= $1",
            &[&from],
        )
        .await?
        .get(0);
    progress.resume_at(done_before as u64);
    let mut already_present = 0;
    while let Some(end) = batch_end_by_key(client, from, options.batch).await? {
        client.batch_execute("BEGIN").await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&from, &end];
        let inserted: i64 = fast_or_safe(client, &insert, &insert_safe, &params).await?;
        let in_batch: i64 = client
            .query_one(
                "SELECT count(*) FROM cutover.backfill_plan
                 WHERE affiliate_id > $1 AND affiliate_id <= $2",
                &[&from, &end],
            )
            .await?
            .get(0);
        // A row found already in v2 came with counters of its own: the counters phase
        // checks them all.
        client
            .execute(
                "UPDATE cutover.backfill_progress
                 SET last_level = 0, last_id = $1, rows_copied = rows_copied + $2,
                     counters_exact = counters_exact AND $2 = $3, updated_at = now()",
                &[&end, &inserted, &in_batch],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        already_present += in_batch - inserted;
        progress.inc(in_batch as u64);
        from = end;
        maybe_abort(options, batches);
    }
    progress.finish();
    Ok(already_present)
}

/// Runs `fast`; if a concurrent insert makes it hit a unique key, runs `safe` instead.
/// Both return a count. Must be called inside a transaction.
async fn fast_or_safe(
    client: &Client,
    fast: &tokio_postgres::Statement,
    safe: &tokio_postgres::Statement,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<i64, tokio_postgres::Error> {
    client.batch_execute("SAVEPOINT batch").await?;
    match client.query_one(fast, params).await {
        Ok(row) => {
            client.batch_execute("RELEASE SAVEPOINT batch").await?;
            Ok(row.get(0))
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            client.batch_execute("ROLLBACK TO SAVEPOINT batch").await?;
            Ok(client.query_one(safe, params).await?.get(0))
        }
        Err(e) => Err(e),
    }
}

pub(super) async fn build_closure(
    client: &Client,
    options: &Options,
    batches: &AtomicU64,
) -> Result<(), tokio_postgres::Error> {
    let total: i64 = client
        .query_one("SELECT count(*) FROM cutover.backfill_plan", &[])
        .await?
        .get(0);
    let progress = crate::migrate::progress::Phase::start(
        options.progress,
        "backfill",
        "closure",
        total as u64,
        "affiliates",
    );
    let mut from = checkpoints(client).await?.closure;
    while let Some(end) = batch_end(client, from, options.batch).await? {
        client.batch_execute("BEGIN").await?;
        closure_batch(client, from, end).await?;
        client
            .execute(
                "UPDATE cutover.backfill_progress SET closure_level = $1, closure_id = $2, updated_at = now()",
                &[&end.0, &end.1],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        progress.inc(options.batch as u64);
        from = end;
        maybe_abort(options, batches);
    }
    progress.finish();
    Ok(())
}

/// The closure pairs of the plan's affiliates after `from` up to `end` (in (level, id)
/// order), made from their paths here and loaded with `COPY`. Descendants that already had
/// their pairs are skipped whole (the closure's indexes are aside: no conflict to fall back
/// on, and none to expect).
async fn closure_batch(
    client: &Client,
    from: (i32, i64),
    end: (i32, i64),
) -> Result<(), tokio_postgres::Error> {
    let paths = client
        .query(
            "SELECT p.affiliate_id::int8, p.path::text FROM cutover.backfill_plan p
             WHERE (p.level, p.affiliate_id) > ($1, $2) AND (p.level, p.affiliate_id) <= ($3, $4)
               AND p.level > 1
               AND NOT EXISTS (SELECT 1 FROM cutover.backfill_closure_present h
                               WHERE h.affiliate_id = p.affiliate_id)",
            &[&from.0, &from.1, &end.0, &end.1],
        )
        .await?;
    let mut copy = CopyIn::start(
        client,
        "COPY fature_v2.hierarchy_index (ancestor_id, descendant_id, level_distance) FROM STDIN",
    )
    .await?;
    for row in &paths {
        crate::migrate::tree::write_closure_rows(copy.rows(), row.get(0), row.get(1));
        copy.flush_full().await?;
    }
    copy.finish().await?;
    Ok(())
}
