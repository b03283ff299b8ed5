//! `cutover backfill`: every legacy row into the target, set-based, batched and resumable.
//! Until it is done it owns v2: dual-write hands it every key (`cutover.backfill_running()`),
//! so its bulk phases may set v2's keys, indexes and triggers aside.
//!
//! 1. **plan**: the parent links read out in one snapshot and walked in memory
//!    ([`crate::migrate::tree`]) give every reachable row its level, path and counters; the rows join
//!    them in the same snapshot (`cutover.backfill_plan`, in key order). Rows no root reaches
//!    are quarantined with their reason (`cutover.backfill_quarantine`): an orphan (its
//!    parent does not exist), a member of a parent cycle, or a row under one of those.
//! 2. **rows and closure**, side by side on two connections, everything either would
//!    maintain row by row set aside: the rows in batches in key order, inserted complete
//!    (path, level, counters, legacy's own counter; a row already in the target is skipped,
//!    and a batch that races with one falls back to `ON CONFLICT DO NOTHING`); the closure in
//!    batches in (level, id) order, each row's ancestors from its path, by `COPY`. Then both
//!    connections rebuild what was set aside, and the keys are validated.
//! 3. **counters**: direct referrals and network sizes checked and corrected, each count
//!    aggregated once — unless v2 was empty at the plan and stayed so, when the rows went in
//!    with the truth.
//! 4. **catch-up**: the keys dual-write handed over meanwhile, synced through v2's triggers.
//!
//! Each batch commits with its checkpoint (`cutover.backfill_progress`; the rows and the
//! closure have one each): a backfill killed at any point and run again continues after the
//! last committed batches. Legacy's drifted `level_1_referrals` are reported; the target
//! holds the recomputed truth.
//!
//! Here the phases and their bookkeeping; the plan in `plan`, the two loads in `load`, what
//! is set aside and put back in `aside`.

use std::{sync::atomic::AtomicU64, time::Instant};

use serde::Serialize;
use tokio_postgres::Client;

use crate::routing::rules::{TableMap, quote_ident};

mod aside;
mod load;
mod plan;

use aside::{
    Aside, HIERARCHY_INDEX, closure_aside, closure_restore, restore_set_aside,
    restore_set_aside_on, set_aside,
};
use load::{build_closure, copy_rows};
use plan::{PlanInto, plan, quarantined};

pub const DEFAULT_BATCH: i64 = 50_000;

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub legacy_rows: i64,
    pub copied: i64,
    /// Rows already in the target (dual-written during the backfill), left as they are.
    pub already_present: i64,
    /// Keys the application wrote through dual-write while the backfill ran, synced at its
    /// end.
    pub caught_up: i64,
    pub closure_rows: i64,
    pub quarantined: Vec<Quarantined>,
    /// Legacy rows whose level_1_referrals differs from their real number of children.
    pub counter_drift: i64,
    pub counter_drift_sample: Vec<(i64, i32, i64)>,
    pub resumed: bool,
    pub dry_run: bool,
    pub seconds: f64,
    /// Seconds spent in each phase of this run.
    pub phases: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quarantined {
    pub affiliate_id: i64,
    pub parent_affiliate_id: Option<i64>,
    pub reason: String,
}

impl Summary {
    /// Whether anything needs a person's attention (the exit code says so).
    pub fn anomalies(&self) -> bool {
        !self.quarantined.is_empty() || self.counter_drift > 0
    }
}

/// Key of the advisory lock a running backfill holds ("backfill" in ASCII): a second one is
/// refused while it runs.
const BACKFILL_LOCK: i64 = i64::from_be_bytes(*b"backfill");

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("another `cutover backfill` is running on this database; wait for it to end")]
    Running,
    #[error(
        "v2 already serves {0}: a new backfill would hand the application's writes to itself until it ends, and what v2 serves would go stale meanwhile. `cutover repair` brings v2 back to legacy in place; or step those query types back to shadow first"
    )]
    TargetServes(String),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Connect(#[from] crate::net::connect::ConnectError),
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub batch: i64,
    pub dry_run: bool,
    /// What to show while it works (a bar, lines, nothing).
    pub progress: crate::migrate::progress::Show,
    /// For tests of resumption: stop the process abruptly after this many committed batches.
    pub abort_after_batches: Option<u64>,
}

/// A backfill on `client`; `helper` is where a second connection to the same database comes
/// from (the rows and the closure load side by side, one on each).
pub async fn run(
    client: &Client,
    helper: &tokio_postgres::Config,
    table: &TableMap,
    options: &Options,
) -> Result<Summary, BackfillError> {
    if options.dry_run {
        return Ok(run_dry(client, table).await?);
    }
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&BACKFILL_LOCK])
        .await?
        .get(0);
    if !locked {
        return Err(BackfillError::Running);
    }
    let result = match serving_from_target(client).await {
        Ok(serving) if !serving.is_empty() => Err(BackfillError::TargetServes(serving.join(", "))),
        Ok(_) => match crate::net::connect::connect_as(helper, "cutover backfill").await {
            Ok(second) => run_unlocked(client, &second, table, options)
                .await
                .map_err(Into::into),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    };
    // Closing the connection releases the lock too; unlock explicitly to be tidy.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&BACKFILL_LOCK])
        .await;
    result
}

/// Query types served (in part) by the target, when a backfill has completed: a new plan would
/// take v2 back from dual-write (writes handed to it until it ends) while they read from v2.
/// A backfill that never completed is resumed or planned afresh freely: nothing serves from v2
/// before one has (the stage gate refuses it).
async fn serving_from_target(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT s.query_type || ' (' || s.stage || ')' FROM cutover.query_type_state s
             WHERE EXISTS (SELECT 1 FROM cutover.backfill_progress WHERE phase = 'done')
               AND (s.stage IN ('target', 'complete') OR (s.stage = 'cutover' AND s.percent > 0))
             ORDER BY s.query_type",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// What a backfill would do: everything in one transaction, in one snapshot, rolled back, so
/// nothing changes.
async fn run_dry(client: &Client, table: &TableMap) -> Result<Summary, tokio_postgres::Error> {
    let started = Instant::now();
    let mut summary = Summary {
        dry_run: true,
        legacy_rows: legacy_rows(client, table).await?,
        ..Summary::default()
    };
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await?;
    let result = async {
        summary.quarantined = plan(client, table, PlanInto::DryRun).await?;
        summary.copied = client
            .query_one(
                "SELECT count(*) FROM pg_temp.backfill_plan p
                 WHERE NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized t WHERE t.affiliate_id = p.affiliate_id)",
                &[],
            )
            .await?
            .get(0);
        counter_drift(client, table, &mut summary).await
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    result?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn legacy_rows(client: &Client, table: &TableMap) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            &format!("SELECT count(*) FROM {}", table.legacy.quoted()),
            &[],
        )
        .await?
        .get(0))
}

/// A backfill, on `client` and, for the loads that run beside the rows', on `second`.
async fn run_unlocked(
    client: &Client,
    second: &Client,
    table: &TableMap,
    options: &Options,
) -> Result<Summary, tokio_postgres::Error> {
    let started = Instant::now();
    // The backfill's own writes on the target are not to be mirrored back into legacy.
    for c in [client, second] {
        c.batch_execute("SET cutover.mirroring = 'on'").await?;
    }
    let mut summary = Summary {
        legacy_rows: legacy_rows(client, table).await?,
        ..Summary::default()
    };

    let phase: Option<String> = client
        .query_opt("SELECT phase FROM cutover.backfill_progress", &[])
        .await?
        .map(|r| r.get(0));
    summary.resumed = matches!(phase.as_deref(), Some(p) if p != "done");
    let mut clock = Instant::now();
    let mut lap = |summary: &mut Summary, name: &str| {
        summary
            .phases
            .push((name.to_owned(), clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    if !summary.resumed {
        plan(client, table, PlanInto::Commit).await?;
        lap(&mut summary, "plan");
    }
    summary.quarantined = quarantined(client).await?;

    for c in [client, second] {
        // Room for the batches' sorts and hashes in memory; each index built by one process:
        // the two connections already build two at a time (measured on two cores: the GiST
        // index took 6.5 s alone, 11.6 s beside parallel B-tree builds, and the whole backfill
        // 40.6 → 35.8 s).
        c.batch_execute(
            "SET cutover.bulk_load = 'on'; SET work_mem = '64MB';
             SET max_parallel_maintenance_workers = 0",
        )
        .await?;
    }
    let batches = AtomicU64::new(0);
    let phase = current_phase(client).await?;
    if phase == "rows" {
        // The rows and the closure are loaded at the same time, one connection each: the
        // closure is made from the plan's paths alone, and with its keys aside it needs no
        // row of v2 to be in first. Everything the two loads would maintain row by row is
        // set aside first and put back once after (by both connections, the longest first).
        set_aside(
            client,
            "fature_v2.affiliates_optimized",
            Aside::IndexesKeysTriggers,
        )
        .await?;
        closure_aside(client).await?;
        let rows = copy_rows(client, table, options, &batches);
        // The closure loads faster than the rows: its indexes are built while the rows
        // still load.
        let closure = async {
            build_closure(second, options, &batches).await?;
            restore_set_aside(second, Some(HIERARCHY_INDEX)).await
        };
        let (present, ()) = tokio::try_join!(rows, closure)?;
        summary.already_present += present;
        restore_set_aside_on(client, second).await?;
        closure_restore(client).await?;
        set_phase(client, "counters").await?;
        lap(&mut summary, "rows and closure");
    }
    if current_phase(client).await? == "closure" {
        // A backfill of an earlier version stopped between its rows and its closure.
        closure_aside(client).await?;
        build_closure(client, options, &batches).await?;
        restore_set_aside_on(client, second).await?;
        closure_restore(client).await?;
        set_phase(client, "counters").await?;
        lap(&mut summary, "closure");
    }
    if current_phase(client).await? == "counters" {
        let exact: bool = client
            .query_one("SELECT counters_exact FROM cutover.backfill_progress", &[])
            .await?
            .get(0);
        // With v2 empty at the plan and nothing found in it since, the rows went in with
        // the plan's counts (children and descendants of the same tree the closure is made
        // of) and legacy's own counter as of the plan: there is nothing to correct, and
        // what the application wrote since is replayed by the catch-up, triggers on.
        let correct = if exact {
            ""
        } else {
            "-- Each count aggregated once, then joined (one hash join per count, not a
             -- group per affiliate with a look-up of its pending deltas each).
             UPDATE fature_v2.affiliates_optimized t SET direct_referrals_count = c.n
             FROM (SELECT a.affiliate_id, coalesce(ch.n, 0)::int AS n
                   FROM fature_v2.affiliates_optimized a
                   LEFT JOIN (SELECT parent_affiliate_id, count(*) AS n
                              FROM fature_v2.affiliates_optimized
                              WHERE parent_affiliate_id IS NOT NULL GROUP BY 1) ch
                          ON ch.parent_affiliate_id = a.affiliate_id) c
             WHERE t.affiliate_id = c.affiliate_id AND t.direct_referrals_count IS DISTINCT FROM c.n;
             UPDATE fature_v2.affiliates_optimized t SET total_network_size = c.n
             FROM (SELECT a.affiliate_id, (coalesce(h.n, 0) - coalesce(d.n, 0))::int AS n
                   FROM fature_v2.affiliates_optimized a
                   LEFT JOIN (SELECT ancestor_id, count(*) AS n
                              FROM fature_v2.hierarchy_index GROUP BY 1) h
                          ON h.ancestor_id = a.affiliate_id
                   LEFT JOIN (SELECT affiliate_id, sum(delta) AS n
                              FROM fature_v2.network_size_deltas GROUP BY 1) d
                          ON d.affiliate_id = a.affiliate_id) c
             WHERE t.affiliate_id = c.affiliate_id AND t.total_network_size IS DISTINCT FROM c.n;
             SELECT cutover.carry_legacy_counters(NULL);"
        };
        client
            .batch_execute(&format!(
                "BEGIN;
                 {correct}
                 UPDATE cutover.backfill_progress SET phase = 'catchup', updated_at = now();
                 COMMIT;"
            ))
            .await?;
        lap(&mut summary, "counters");
    }
    for c in [client, second] {
        c.batch_execute(
            "RESET cutover.bulk_load; RESET work_mem; RESET max_parallel_maintenance_workers",
        )
        .await?;
    }
    if current_phase(client).await? == "catchup" {
        summary.caught_up = catch_up(client, options.batch).await?;
        lap(&mut summary, "catch-up");
        // Fresh statistics and visibility maps for the tables just loaded: the planner
        // otherwise judges v2's reads (and its own triggers' lookups) on an empty table's
        // estimates until autovacuum comes by, and no index-only scan is possible.
        client
            .batch_execute(
                "VACUUM (ANALYZE) fature_v2.affiliates_optimized, fature_v2.hierarchy_index",
            )
            .await?;
        lap(&mut summary, "vacuum");
    }
    client
        .batch_execute("DROP TABLE IF EXISTS cutover.backfill_plan")
        .await?;

    counter_drift(client, table, &mut summary).await?;
    summary.copied = client
        .query_one("SELECT rows_copied FROM cutover.backfill_progress", &[])
        .await?
        .get(0);
    summary.closure_rows = client
        .query_one("SELECT count(*) FROM fature_v2.hierarchy_index", &[])
        .await?
        .get(0);
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The keys dual-write handed over while the backfill ran (`cutover.backfill_catchup`),
/// synced now through v2's own triggers, in batches; the last batch under an exclusive lock
/// on the table, in the transaction that marks the backfill done, so that no key is handed
/// over after the last look. A key that cannot be synced is recorded in
/// `cutover.write_divergences`, as dual-write records it.
async fn catch_up(client: &Client, batch: i64) -> Result<i64, tokio_postgres::Error> {
    let drain = client
        .prepare(
            "WITH d AS (
                 DELETE FROM cutover.backfill_catchup
                 WHERE affiliate_id IN (SELECT affiliate_id FROM cutover.backfill_catchup
                                        ORDER BY affiliate_id LIMIT $1)
                 RETURNING affiliate_id
             )
             SELECT coalesce(array_agg(affiliate_id), '{}') FROM d",
        )
        .await?;
    let sync = client
        .prepare("SELECT cutover.sync_isolated($1, NULL, true)")
        .await?;
    let mut synced = 0;
    loop {
        client.batch_execute("BEGIN").await?;
        let keys: Vec<i64> = client.query_one(&drain, &[&batch]).await?.get(0);
        if keys.is_empty() {
            client
                .batch_execute("LOCK TABLE cutover.backfill_catchup IN EXCLUSIVE MODE")
                .await?;
            let last: Vec<i64> = client.query_one(&drain, &[&i64::MAX]).await?.get(0);
            if !last.is_empty() {
                client.execute(&sync, &[&last]).await?;
            }
            synced += last.len() as i64;
            client
                .batch_execute(
                    "UPDATE cutover.backfill_progress SET phase = 'done', updated_at = now(); COMMIT",
                )
                .await?;
            return Ok(synced);
        }
        client.execute(&sync, &[&keys]).await?;
        client.batch_execute("COMMIT").await?;
        synced += keys.len() as i64;
    }
}

async fn current_phase(client: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT phase FROM cutover.backfill_progress", &[])
        .await?
        .get(0))
}

async fn set_phase(client: &Client, phase: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE cutover.backfill_progress
             SET phase = $1, last_level = 0, last_id = 0, closure_level = 0, closure_id = 0, updated_at = now()",
            &[&phase],
        )
        .await?;
    Ok(())
}

/// Legacy counters that differ from the real number of children.
async fn counter_drift(
    client: &Client,
    table: &TableMap,
    summary: &mut Summary,
) -> Result<(), tokio_postgres::Error> {
    let Some(counter) = table.columns.iter().find(|c| c.derived) else {
        return Ok(());
    };
    let legacy = table.legacy.quoted();
    let key = quote_ident(&table.key);
    let rows = client
        .query(
            &format!(
                "SELECT a.{key}::int8, a.{col}, count(c.{key})::int8 AS truth
                 FROM {legacy} a LEFT JOIN {legacy} c ON c.parent_affiliate_id = a.{key}
                 GROUP BY a.{key}, a.{col}
                 HAVING a.{col} IS DISTINCT FROM count(c.{key})
                 ORDER BY a.{key}",
                col = quote_ident(&counter.legacy)
            ),
            &[],
        )
        .await?;
    summary.counter_drift = rows.len() as i64;
    summary.counter_drift_sample = rows
        .iter()
        .take(10)
        .map(|r| (r.get(0), r.get::<_, Option<i32>>(1).unwrap_or(0), r.get(2)))
        .collect();
    Ok(())
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would copy" } else { "copied" };
        writeln!(
            f,
            "backfill{}: {} legacy rows; {verb} {}{}; {} closure rows; {:.1} s",
            if self.resumed { " (resumed)" } else { "" },
            self.legacy_rows,
            self.copied,
            if self.already_present > 0 {
                format!(" ({} already in the target, kept)", self.already_present)
            } else {
                String::new()
            },
            self.closure_rows,
            self.seconds
        )?;
        if self.caught_up > 0 {
            writeln!(
                f,
                "written by the application during the backfill and synced at its end: {}",
                self.caught_up
            )?;
        }
        writeln!(
            f,
            "quarantined: {} (cutover.backfill_quarantine)",
            self.quarantined.len()
        )?;
        for q in self.quarantined.iter().take(20) {
            writeln!(f, "  {}: {}", q.affiliate_id, q.reason)?;
        }
        write!(
            f,
            "legacy level_1_referrals drifted from the real count: {}{}",
            self.counter_drift,
            if self.counter_drift_sample.is_empty() {
                String::new()
            } else {
                format!(
                    " (e.g. {})",
                    self.counter_drift_sample
                        .iter()
                        .map(|(id, stored, truth)| format!("{id}: {stored} stored, {truth} real"))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        )
    }
}
