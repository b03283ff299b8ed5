//! `cutover backfill`: every legacy row into the target, set-based, batched and resumable.
//! Until it is done it owns v2: dual-write hands it every key (`cutover.backfill_running()`),
//! so its bulk phases may set v2's keys, indexes and triggers aside.
//!
//! 1. **plan**: the parent links read out in one snapshot and walked in memory
//!    ([`super::tree`]) give every reachable row its level, path and counters; the rows join
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

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use serde::Serialize;
use tokio_postgres::{Client, error::SqlState};

use crate::rules::{TableMap, quote_ident};

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
    Connect(#[from] crate::connect::ConnectError),
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub batch: i64,
    pub dry_run: bool,
    /// What to show while it works (a bar, lines, nothing).
    pub progress: super::progress::Show,
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
        Ok(_) => match crate::connect::connect_as(helper, "cutover backfill").await {
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
    let result = dry_run(client, table, &mut summary).await;
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

/// Where a plan goes. A run commits it (`cutover.backfill_plan`, the quarantine and the
/// progress row) for the phases after it; a dry run, already inside a transaction that is
/// rolled back, keeps it in a temporary table and its quarantine in memory, and writes
/// nothing a real run or dual-write would read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanInto {
    Commit,
    DryRun,
}

impl PlanInto {
    fn table(self) -> &'static str {
        match self {
            PlanInto::Commit => "cutover.backfill_plan",
            PlanInto::DryRun => "pg_temp.backfill_plan",
        }
    }
}

/// The plan: levels and paths of reachable rows, and the quarantine of the others (returned).
async fn plan(
    client: &Client,
    table: &TableMap,
    into: PlanInto,
) -> Result<Vec<Quarantined>, tokio_postgres::Error> {
    let legacy = table.legacy.quoted();
    let key = quote_ident(&table.key);
    let plan = into.table();
    let (open, create) = match into {
        PlanInto::Commit => (
            "BEGIN ISOLATION LEVEL REPEATABLE READ;
             DROP TABLE IF EXISTS cutover.backfill_plan;",
            "CREATE UNLOGGED TABLE",
        ),
        PlanInto::DryRun => ("", "CREATE TEMP TABLE"),
    };
    // The rows themselves, as of one snapshot: the copy reads them from the plan, so v2 is
    // legacy as of this instant, consistent (every parent with its children), whatever the
    // application does meanwhile; what it does is handed over by dual-write
    // (cutover.backfill_catchup) and replayed at the end. The walk (levels, paths,
    // counters, what no root reaches) is done here from the parent links alone
    // (`migrate::tree`); the rows join it after, in the same snapshot.
    client.batch_execute(open).await?;
    let links = read_links(client, &legacy, &key).await?;
    let walk = super::tree::Walk::new(&links);
    drop(links);
    client
        .batch_execute(
            "CREATE TEMP TABLE backfill_tree (
                 affiliate_id int8, parent int8, level int, path ltree, direct int, network int
             ) ON COMMIT DROP",
        )
        .await?;
    let sink = client.copy_in("COPY backfill_tree FROM STDIN").await?;
    futures_util::pin_mut!(sink);
    let mut at = 0;
    loop {
        let mut out = Vec::with_capacity(COPY_CHUNK + 256);
        at = walk.write_copy_rows(at, &mut out, COPY_CHUNK);
        if out.is_empty() {
            break;
        }
        futures_util::SinkExt::send(&mut sink, bytes::Bytes::from(out)).await?;
    }
    sink.as_mut().finish().await?;
    client
        .batch_execute(&format!(
            "ANALYZE backfill_tree;
             -- In key order, the order the rows are copied in: each batch then reads
             -- its rows from adjacent pages, already sorted.
             SET LOCAL work_mem = '256MB';
             {create} {plan} AS
             SELECT l.*, t.level, t.path, t.direct, t.network
             FROM backfill_tree t JOIN {legacy} l ON l.{key} = t.affiliate_id
             ORDER BY l.{key};
             CREATE UNIQUE INDEX ON {plan} (level, affiliate_id);
             CREATE UNIQUE INDEX ON {plan} (affiliate_id);
             ANALYZE {plan};"
        ))
        .await?;
    // The unreachable rows are few; their reasons are found by following their parents.
    // From the plan's snapshot: rows the application adds meanwhile are not unreachable,
    // and a plan is never committed without its quarantine.
    let parents: HashMap<i64, Option<i64>> = walk.unreachable().iter().copied().collect();
    let existing: std::collections::HashSet<i64> = parents.keys().copied().collect();
    let mut ids: Vec<i64> = parents.keys().copied().collect();
    ids.sort();
    let quarantine: Vec<Quarantined> = ids
        .into_iter()
        .map(|id| Quarantined {
            affiliate_id: id,
            parent_affiliate_id: parents[&id],
            reason: reason_for(id, &parents, &existing),
        })
        .collect();
    if into == PlanInto::DryRun {
        return Ok(quarantine);
    }
    client
        .batch_execute(
            "DELETE FROM cutover.backfill_quarantine;
             DELETE FROM cutover.backfill_progress;
             INSERT INTO cutover.backfill_progress (phase, counters_exact)
             SELECT 'rows', NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized)
                        AND NOT EXISTS (SELECT 1 FROM fature_v2.hierarchy_index)
                        AND NOT EXISTS (SELECT 1 FROM fature_v2.network_size_deltas);",
        )
        .await?;
    for q in &quarantine {
        client
            .execute(
                "INSERT INTO cutover.backfill_quarantine (affiliate_id, parent_affiliate_id, reason)
                 VALUES ($1, $2, $3)",
                &[&q.affiliate_id, &q.parent_affiliate_id, &q.reason],
            )
            .await?;
    }
    client.batch_execute("COMMIT").await?;
    Ok(quarantine)
}

/// How much `COPY` text is sent at a time.
const COPY_CHUNK: usize = 1 << 20;

/// Legacy's parent links (key, parent key), read out with `COPY` in the caller's snapshot.
async fn read_links(
    client: &Client,
    legacy: &str,
    key: &str,
) -> Result<Vec<(i64, Option<i64>)>, tokio_postgres::Error> {
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT {key}::int8, parent_affiliate_id::int8 FROM {legacy}) TO STDOUT"
        ))
        .await?;
    futures_util::pin_mut!(stream);
    let mut links = Vec::new();
    let mut rest: Vec<u8> = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        rest.extend_from_slice(&chunk?);
        let complete = rest.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in rest[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            links.push(parse_link(line));
        }
        rest.drain(..complete);
    }
    Ok(links)
}

/// One `COPY` text row of two int8 columns, the second possibly `\N`. PostgreSQL writes
/// them, so they are well formed.
fn parse_link(line: &[u8]) -> (i64, Option<i64>) {
    let number = |field: &[u8]| -> i64 {
        std::str::from_utf8(field)
            .ok()
            .and_then(|f| f.parse().ok())
            .expect("PostgreSQL writes int8 in decimal")
    };
    let tab = line
        .iter()
        .position(|b| *b == b'\t')
        .expect("two columns were asked for");
    let parent = &line[tab + 1..];
    (
        number(&line[..tab]),
        (parent != b"\\N").then(|| number(parent)),
    )
}

/// Why an unreachable row cannot be placed: follow its parents among the unreachable rows.
fn reason_for(
    id: i64,
    parents: &HashMap<i64, Option<i64>>,
    unreachable: &std::collections::HashSet<i64>,
) -> String {
    let mut seen = vec![id];
    let mut at = id;
    loop {
        match parents.get(&at).copied().flatten() {
            // Only unreachable rows are in the map: a parent outside it does not exist.
            Some(p) if !unreachable.contains(&p) => {
                return if at == id {
                    format!("orphan: its parent {p} does not exist")
                } else {
                    format!("under orphan {at}, whose parent {p} does not exist")
                };
            }
            Some(p) => {
                if p == id {
                    return "cycle: following its parents comes back to it".into();
                }
                if seen.contains(&p) {
                    return format!("under the parent cycle through {p}");
                }
                seen.push(p);
                at = p;
            }
            None => return "unreachable from any root".into(),
        }
    }
}

async fn quarantined(client: &Client) -> Result<Vec<Quarantined>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT affiliate_id, parent_affiliate_id, reason FROM cutover.backfill_quarantine ORDER BY affiliate_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| Quarantined {
            affiliate_id: r.get(0),
            parent_affiliate_id: r.get(1),
            reason: r.get(2),
        })
        .collect())
}

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
async fn copy_rows(
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
    let mut progress =
        super::progress::Phase::start(options.progress, "backfill", "rows", total as u64, "rows");
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

enum Keys {
    SetAside,
    Restore,
}

/// What [`set_aside`] takes off a table besides its plain indexes and its unique
/// constraints (but the primary key, and any a key of another table references).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aside {
    /// Its self-referencing (parent) key and its user triggers too.
    IndexesKeysTriggers,
    /// Nothing more.
    IndexesUnique,
}

/// Sets aside, on `table`, every index that backs no constraint, its unique constraints and
/// what `what` names besides — each recorded in
/// `cutover.backfill_set_aside` with the statement that puts it back, in the same
/// transaction as the drop.
async fn set_aside(client: &Client, table: &str, what: Aside) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("SET lock_timeout = '60s'; BEGIN")
        .await?;
    let mut aside: Vec<(String, String, String)> = client
        .query(
            "SELECT 'index ' || c.relname,
                    'DROP INDEX ' || i.indexrelid::regclass::text,
                    replace(pg_get_indexdef(i.indexrelid), 'CREATE INDEX ', 'CREATE INDEX IF NOT EXISTS ')
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE i.indrelid = $1::text::regclass
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
            &[&table],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // The unique constraints but the primary key (which the copy's anti-join and its
    // fallback rely on, and other tables' keys reference): a sorted build once after costs
    // less than a million insertions at random places (ids that do not follow the tree give
    // `external_id` no order).
    {
        let unique = client
            .query(
                "SELECT 'constraint ' || conname,
                        format('ALTER TABLE %s DROP CONSTRAINT %I', $1::text, conname),
                        format('ALTER TABLE %s ADD CONSTRAINT %I %s', $1::text, conname,
                               pg_get_constraintdef(oid))
                 FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'u'
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint f
                                   WHERE f.contype = 'f' AND f.conindid = pg_constraint.conindid
                                     AND f.conrelid <> pg_constraint.conrelid)",
                &[&table],
            )
            .await?;
        aside.extend(unique.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
    }
    if what == Aside::IndexesKeysTriggers {
        // The parent key, checked once at the end (VALIDATE) instead of once per row; the
        // user triggers (v2's hierarchy upkeep, which the plan does in bulk, and the
        // dual-write mirror), not entered a million times.
        let more = client
            .query(
                "SELECT 'constraint ' || conname,
                        format('ALTER TABLE %s DROP CONSTRAINT %I', $1::text, conname),
                        format('ALTER TABLE %s ADD CONSTRAINT %I %s NOT VALID; ALTER TABLE %s VALIDATE CONSTRAINT %I',
                               $1::text, conname, pg_get_constraintdef(oid), $1::text, conname)
                 FROM pg_constraint
                 WHERE conrelid = $1::text::regclass AND contype = 'f' AND confrelid = conrelid
                 UNION ALL
                 SELECT 'trigger ' || tgname,
                        format('ALTER TABLE %s DISABLE TRIGGER %I', $1::text, tgname),
                        format('ALTER TABLE %s ENABLE TRIGGER %I', $1::text, tgname)
                 FROM pg_trigger
                 WHERE tgrelid = $1::text::regclass AND NOT tgisinternal AND tgenabled <> 'D'",
                &[&table],
            )
            .await?;
        aside.extend(more.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
    }
    for (name, drop, restore) in aside {
        client
            .execute(
                "INSERT INTO cutover.backfill_set_aside (name, restore, relation) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &restore, &table],
            )
            .await?;
        client.batch_execute(&drop).await?;
    }
    client.batch_execute("COMMIT; RESET lock_timeout").await?;
    Ok(())
}

/// Puts back everything set aside (by any backfill run, this one or a killed one), on both
/// connections at once: see [`restore_set_aside`].
async fn restore_set_aside_on(
    client: &Client,
    second: &Client,
) -> Result<(), tokio_postgres::Error> {
    tokio::try_join!(
        restore_set_aside(client, None),
        restore_set_aside(second, None)
    )?;
    Ok(())
}

/// Puts back what was set aside on `relation` (everything with `None`). Several connections
/// may do it at once: each takes the next item nobody has taken (index builds first, the GiST
/// one, the longest, before all), puts it back and strikes it off in one transaction. Two
/// indexes of one table build side by side; a constraint or a trigger waits for the builds on
/// its table.
async fn restore_set_aside(
    client: &Client,
    relation: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    loop {
        client.batch_execute("BEGIN").await?;
        let Some(row) = client
            .query_opt(
                "SELECT name, restore FROM cutover.backfill_set_aside
                 WHERE $1::text IS NULL OR relation = $1
                 ORDER BY name LIKE 'index %' DESC, restore LIKE '% USING gist %' DESC, name
                 LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&relation],
            )
            .await?
        else {
            client.batch_execute("COMMIT").await?;
            return Ok(());
        };
        let (name, restore): (String, String) = (row.get(0), row.get(1));
        client.batch_execute(&restore).await?;
        client
            .execute(
                "DELETE FROM cutover.backfill_set_aside WHERE name = $1",
                &[&name],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
    }
}

/// Sets the closure's keys, indexes and unique pair aside for its bulk load, noting first the
/// affiliates that already have their pairs.
async fn closure_aside(client: &Client) -> Result<(), tokio_postgres::Error> {
    // The closure's two foreign keys would be checked row by row (a FOR KEY SHARE lock on an
    // affiliate per check: most of the load's time). Every pair the backfill inserts holds
    // by construction, so they are set aside and validated once at the end. A backfill
    // killed here leaves them aside until it is run again.
    closure_keys(client, Keys::SetAside).await?;
    // Its indexes, the unique pair among them, are built once at the end (a sorted build
    // each, instead of an insertion per pair into indexes in random order: 19 s against 7 s
    // for a million affiliates' 2.3 million pairs). Nobody else writes the closure
    // meanwhile: until the backfill is done dual-write hands it every key
    // (`cutover.backfill_running()`). The affiliates that already had their pairs (a
    // backfill run again over v2's rows) are noted first and skipped; putting the unique
    // pair back would refuse a duplicate, loudly.
    client
        .batch_execute(
            "CREATE UNLOGGED TABLE IF NOT EXISTS cutover.backfill_closure_present AS
                 SELECT DISTINCT descendant_id AS affiliate_id FROM fature_v2.hierarchy_index;
             CREATE UNIQUE INDEX IF NOT EXISTS backfill_closure_present_key
                 ON cutover.backfill_closure_present (affiliate_id);
             ANALYZE cutover.backfill_closure_present;",
        )
        .await?;
    set_aside(client, HIERARCHY_INDEX, Aside::IndexesUnique).await
}

/// The closure's keys back (its indexes are back with everything else set aside), and the
/// note of the affiliates that had pairs before dropped.
async fn closure_restore(client: &Client) -> Result<(), tokio_postgres::Error> {
    closure_keys(client, Keys::Restore).await?;
    client
        .batch_execute("DROP TABLE cutover.backfill_closure_present")
        .await
}

const HIERARCHY_INDEX: &str = "fature_v2.hierarchy_index";

/// The closure's foreign keys, as created by migration 0001.
const CLOSURE_KEYS: [(&str, &str); 2] = [
    ("hierarchy_index_ancestor_id_fkey", "ancestor_id"),
    ("hierarchy_index_descendant_id_fkey", "descendant_id"),
];

async fn closure_keys(client: &Client, what: Keys) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("SET lock_timeout = '60s'").await?;
    for (name, column) in CLOSURE_KEYS {
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint
                                WHERE conname = $1 AND conrelid = 'fature_v2.hierarchy_index'::regclass)",
                &[&name],
            )
            .await?
            .get(0);
        match (&what, exists) {
            (Keys::SetAside, true) => {
                client
                    .batch_execute(&format!(
                        "ALTER TABLE fature_v2.hierarchy_index DROP CONSTRAINT {name}"
                    ))
                    .await?;
            }
            (Keys::Restore, false) => {
                let add = format!(
                    "ALTER TABLE fature_v2.hierarchy_index ADD CONSTRAINT {name}
                         FOREIGN KEY ({column}) REFERENCES fature_v2.affiliates_optimized (affiliate_id)
                         ON DELETE CASCADE NOT VALID;
                     ALTER TABLE fature_v2.hierarchy_index VALIDATE CONSTRAINT {name};"
                );
                match client.batch_execute(&format!("BEGIN; {add} COMMIT")).await {
                    Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                        // Pairs whose affiliate was deleted meanwhile (the cascade was aside
                        // too): rare, so looked for only when the validation finds one.
                        client.batch_execute("ROLLBACK").await?;
                        client
                            .batch_execute(&format!(
                                "BEGIN;
                                 DELETE FROM fature_v2.hierarchy_index h
                                 WHERE NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized a
                                                   WHERE a.affiliate_id = h.{column});
                                 {add}
                                 COMMIT"
                            ))
                            .await?;
                    }
                    Err(e) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                        return Err(e);
                    }
                    Ok(()) => {}
                }
            }
            _ => {}
        }
    }
    client.batch_execute("RESET lock_timeout").await?;
    Ok(())
}

async fn build_closure(
    client: &Client,
    options: &Options,
    batches: &AtomicU64,
) -> Result<(), tokio_postgres::Error> {
    let total: i64 = client
        .query_one("SELECT count(*) FROM cutover.backfill_plan", &[])
        .await?
        .get(0);
    let progress = super::progress::Phase::start(
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
    let sink = client
        .copy_in(
            "COPY fature_v2.hierarchy_index (ancestor_id, descendant_id, level_distance) FROM STDIN",
        )
        .await?;
    futures_util::pin_mut!(sink);
    let mut out = Vec::with_capacity(COPY_CHUNK + 256);
    for row in &paths {
        super::tree::write_closure_rows(&mut out, row.get(0), row.get(1));
        if out.len() > COPY_CHUNK {
            let full = std::mem::replace(&mut out, Vec::with_capacity(COPY_CHUNK + 256));
            futures_util::SinkExt::send(&mut sink, bytes::Bytes::from(full)).await?;
        }
    }
    if !out.is_empty() {
        futures_util::SinkExt::send(&mut sink, bytes::Bytes::from(out)).await?;
    }
    sink.as_mut().finish().await?;
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

/// What a backfill would do, inside the caller's transaction (rolled back after).
async fn dry_run(
    client: &Client,
    table: &TableMap,
    summary: &mut Summary,
) -> Result<(), tokio_postgres::Error> {
    summary.quarantined = plan(client, table, PlanInto::DryRun).await?;
    let to_copy: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_temp.backfill_plan p
             WHERE NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized t WHERE t.affiliate_id = p.affiliate_id)",
            &[],
        )
        .await?
        .get(0);
    summary.copied = to_copy;
    counter_drift(client, table, summary).await
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
