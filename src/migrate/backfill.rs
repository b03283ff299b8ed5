//! `cutover backfill`: every legacy row into the target, set-based, batched and resumable.
//! Until it is done it owns v2: dual-write hands it every key (`cutover.backfill_running()`),
//! so its bulk phases may set v2's keys, indexes and triggers aside.
//!
//! 1. **plan**: a recursive walk from the roots (over a narrow copy of the parent links)
//!    gives every reachable row its level, path and counters (`cutover.backfill_plan`). Rows
//!    it cannot reach are quarantined with their reason (`cutover.backfill_quarantine`): an
//!    orphan (its parent does not exist), a member of a parent cycle, or a row under one of
//!    those.
//! 2. **rows**: batches in key order, inserted complete (path, level, counters, legacy's own
//!    counter), v2's parent key, secondary indexes and user triggers aside. A row already in
//!    the target is skipped (and a batch that races with one falls back to `ON CONFLICT DO
//!    NOTHING`).
//! 3. **closure**: batches in (level, id) order, each row's ancestors from its path, the
//!    closure's indexes and keys aside and built once after.
//! 4. **counters**: direct referrals and network sizes checked and corrected, each count
//!    aggregated once.
//!
//! Each batch commits with its checkpoint (`cutover.backfill_progress`): a backfill killed at
//! any point and run again continues after the last committed batch. Legacy's drifted
//! `level_1_referrals` are reported; the target holds the recomputed truth.

use std::{collections::HashMap, time::Instant};

use serde::Serialize;
use tokio_postgres::Client;

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

pub async fn run(
    client: &Client,
    table: &TableMap,
    options: &Options,
) -> Result<Summary, BackfillError> {
    if options.dry_run {
        return Ok(run_unlocked(client, table, options).await?);
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
        Ok(_) => run_unlocked(client, table, options)
            .await
            .map_err(Into::into),
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

async fn run_unlocked(
    client: &Client,
    table: &TableMap,
    options: &Options,
) -> Result<Summary, tokio_postgres::Error> {
    let started = Instant::now();
    // The backfill's own writes on the target are not to be mirrored back into legacy.
    client.batch_execute("SET cutover.mirroring = 'on'").await?;
    let legacy = table.legacy.quoted();
    let mut summary = Summary {
        dry_run: options.dry_run,
        ..Summary::default()
    };
    summary.legacy_rows = client
        .query_one(&format!("SELECT count(*) FROM {legacy}"), &[])
        .await?
        .get(0);

    if options.dry_run {
        // Everything in one transaction, in one snapshot, rolled back: nothing changes.
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            .await?;
        let result = dry_run(client, table, &mut summary).await;
        client.batch_execute("ROLLBACK").await?;
        result?;
        summary.seconds = started.elapsed().as_secs_f64();
        return Ok(summary);
    }

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

    client.batch_execute("SET cutover.bulk_load = 'on'").await?;
    let mut batches = 0u64;
    let phase = current_phase(client).await?;
    if phase == "rows" {
        // The rows' secondary indexes (the GiST and B-tree on the path among them), parent
        // key and per-row triggers are set aside and put back once the rows are in.
        set_aside(
            client,
            "fature_v2.affiliates_optimized",
            &[],
            Aside::IndexesKeysTriggers,
        )
        .await?;
        copy_rows(client, table, options, &mut summary, &mut batches).await?;
        restore_set_aside(client).await?;
        set_phase(client, "closure").await?;
        lap(&mut summary, "rows");
    }
    if current_phase(client).await? == "closure" {
        // The closure's two foreign keys would be checked row by row (a FOR KEY SHARE lock
        // on an affiliate per check: most of this phase's time). Every pair the backfill
        // inserts holds by construction, so they are set aside and validated once at the
        // end. A backfill killed here leaves them aside until it is run again.
        closure_keys(client, Keys::SetAside).await?;
        // Its indexes, the unique pair among them, are built once at the end (a sorted
        // build each, instead of an insertion per pair into indexes in random order: 19 s
        // against 7 s for a million affiliates' 2.3 million pairs). Nobody else writes the
        // closure meanwhile: until the backfill is done dual-write hands it every key
        // (`cutover.backfill_running()`). The affiliates that already had their pairs (a
        // backfill run again over v2's rows) are noted first and skipped; putting the
        // unique pair back would refuse a duplicate, loudly.
        client
            .batch_execute(
                "CREATE UNLOGGED TABLE IF NOT EXISTS cutover.backfill_closure_present AS
                     SELECT DISTINCT descendant_id AS affiliate_id FROM fature_v2.hierarchy_index;
                 CREATE UNIQUE INDEX IF NOT EXISTS backfill_closure_present_key
                     ON cutover.backfill_closure_present (affiliate_id);
                 ANALYZE cutover.backfill_closure_present;",
            )
            .await?;
        set_aside(
            client,
            "fature_v2.hierarchy_index",
            &[],
            Aside::IndexesUnique,
        )
        .await?;
        build_closure(client, options, &mut summary, &mut batches).await?;
        restore_set_aside(client).await?;
        closure_keys(client, Keys::Restore).await?;
        client
            .batch_execute("DROP TABLE cutover.backfill_closure_present")
            .await?;
        set_phase(client, "counters").await?;
        lap(&mut summary, "closure");
    }
    if current_phase(client).await? == "counters" {
        client
            .batch_execute(
                "BEGIN;
                 -- Each count aggregated once, then joined (one hash join per count, not a
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
                 SELECT cutover.carry_legacy_counters(NULL);
                 UPDATE cutover.backfill_progress SET phase = 'catchup', updated_at = now();
                 COMMIT;",
            )
            .await?;
        lap(&mut summary, "counters");
    }
    client.batch_execute("RESET cutover.bulk_load").await?;
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
            "UPDATE cutover.backfill_progress SET phase = $1, last_level = 0, last_id = 0, updated_at = now()",
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
    client
        .batch_execute(&format!(
            "{open}
             -- The rows themselves, as of one snapshot: the copy reads them from here, so
             -- v2 is legacy as of this instant, consistent (every parent with its
             -- children), whatever the application does meanwhile; what it does is handed
             -- over by dual-write (cutover.backfill_catchup) and replayed at the end.
             -- (The walk carries keys only; the rows join it after, in the same snapshot.)
             -- It walks a narrow copy of the parent links: each level of the walk scans
             -- them again (legacy has no index on the parent), and 16 bytes a row scan
             -- far faster than legacy's whole rows.
             CREATE TEMP TABLE backfill_links ON COMMIT DROP AS
                 SELECT {key}::int8 AS id, parent_affiliate_id::int8 AS parent FROM {legacy};
             ANALYZE backfill_links;
             CREATE TEMP TABLE backfill_tree ON COMMIT DROP AS
             WITH RECURSIVE tree(affiliate_id, parent, level, path) AS (
                 SELECT id, NULL::int8, 1, id::text::ltree FROM backfill_links WHERE parent IS NULL
                 UNION ALL
                 SELECT c.id, c.parent, t.level + 1, t.path || c.id::text
                 FROM backfill_links c JOIN tree t ON c.parent = t.affiliate_id
             )
             SELECT * FROM tree;
             ANALYZE backfill_tree;
             -- The rows with their counters, counted from the walk (each counter aggregated
             -- once and joined: the rows go in complete, nothing is written twice).
             {create} {plan} AS
             SELECT l.*, t.level, t.path, coalesce(d.n, 0)::int AS direct,
                    coalesce(w.n, 0)::int AS network
             FROM backfill_tree t
             JOIN {legacy} l ON l.{key} = t.affiliate_id
             LEFT JOIN (SELECT parent, count(*) AS n FROM backfill_tree
                        WHERE parent IS NOT NULL GROUP BY 1) d ON d.parent = t.affiliate_id
             LEFT JOIN (SELECT a.label::int8 AS id, count(*) AS n
                        FROM backfill_tree, unnest(string_to_array(path::text, '.'))
                             WITH ORDINALITY AS a(label, ord)
                        WHERE a.ord < level GROUP BY 1) w ON w.id = t.affiliate_id;
             CREATE UNIQUE INDEX ON {plan} (level, affiliate_id);
             CREATE UNIQUE INDEX ON {plan} (affiliate_id);
             ANALYZE {plan};"
        ))
        .await?;
    // The unreachable rows are few; their reasons are found by following their parents. In
    // the plan's transaction and snapshot: rows the application adds meanwhile are not
    // unreachable, and a plan is never committed without its quarantine.
    let rows = client
        .query(
            &format!(
                "SELECT l.{key}::int8, l.parent_affiliate_id::int8 FROM {legacy} l
                 WHERE NOT EXISTS (SELECT 1 FROM {plan} p WHERE p.affiliate_id = l.{key})"
            ),
            &[],
        )
        .await?;
    let parents: HashMap<i64, Option<i64>> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
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
             INSERT INTO cutover.backfill_progress (phase) VALUES ('rows');",
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

async fn checkpoint(client: &Client) -> Result<(i32, i64), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT last_level, last_id FROM cutover.backfill_progress",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

fn maybe_abort(options: &Options, batches: &mut u64) {
    *batches += 1;
    if options.abort_after_batches == Some(*batches) {
        // A test of resumption: die like a kill -9 would, with no cleanup.
        std::process::abort();
    }
}

async fn copy_rows(
    client: &Client,
    table: &TableMap,
    options: &Options,
    summary: &mut Summary,
    batches: &mut u64,
) -> Result<(), tokio_postgres::Error> {
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
    let mut from = match checkpoint(client).await? {
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
        client
            .execute(
                "UPDATE cutover.backfill_progress
                 SET last_level = 0, last_id = $1, rows_copied = rows_copied + $2, updated_at = now()",
                &[&end, &inserted],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        summary.already_present += in_batch - inserted;
        progress.inc(in_batch as u64);
        from = end;
        maybe_abort(options, batches);
    }
    progress.finish();
    Ok(())
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
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
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

/// What [`set_aside`] takes off a table besides its plain indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aside {
    /// Its self-referencing (parent) key and its user triggers too.
    IndexesKeysTriggers,
    /// Its unique constraints too.
    IndexesUnique,
}

/// Sets aside, on `table`, every index that backs no constraint (except `keep`), and with
/// `with_triggers` its parent key and its per-row triggers too — each recorded in
/// `cutover.backfill_set_aside` with the statement that puts it back, in the same
/// transaction as the drop.
async fn set_aside(
    client: &Client,
    table: &str,
    keep: &[&str],
    what: Aside,
) -> Result<(), tokio_postgres::Error> {
    let keep: Vec<String> = keep.iter().map(|k| (*k).to_owned()).collect();
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
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
               AND c.relname::text <> ALL ($2)",
            &[&table, &keep],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    if what == Aside::IndexesUnique {
        let unique = client
            .query(
                "SELECT 'constraint ' || conname,
                        format('ALTER TABLE %s DROP CONSTRAINT %I', $1::text, conname),
                        format('ALTER TABLE %s ADD CONSTRAINT %I %s', $1::text, conname,
                               pg_get_constraintdef(oid))
                 FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'u'",
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
                "INSERT INTO cutover.backfill_set_aside (name, restore) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &restore],
            )
            .await?;
        client.batch_execute(&drop).await?;
    }
    client.batch_execute("COMMIT; RESET lock_timeout").await?;
    Ok(())
}

/// Puts back everything set aside (by any backfill run, this one or a killed one).
async fn restore_set_aside(client: &Client) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT name, restore FROM cutover.backfill_set_aside ORDER BY name",
            &[],
        )
        .await?;
    for row in rows {
        let (name, restore): (String, String) = (row.get(0), row.get(1));
        client.batch_execute(&format!("BEGIN; {restore}")).await?;
        client
            .execute(
                "DELETE FROM cutover.backfill_set_aside WHERE name = $1",
                &[&name],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
    }
    Ok(())
}

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
                // Pairs whose affiliate was deleted meanwhile (the cascade was aside too).
                client
                    .batch_execute(&format!(
                        "DELETE FROM fature_v2.hierarchy_index h
                         WHERE NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized a WHERE a.affiliate_id = h.{column});
                         ALTER TABLE fature_v2.hierarchy_index ADD CONSTRAINT {name}
                             FOREIGN KEY ({column}) REFERENCES fature_v2.affiliates_optimized (affiliate_id)
                             ON DELETE CASCADE NOT VALID;
                         ALTER TABLE fature_v2.hierarchy_index VALIDATE CONSTRAINT {name};"
                    ))
                    .await?;
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
    _summary: &mut Summary,
    batches: &mut u64,
) -> Result<(), tokio_postgres::Error> {
    // Descendants that already had their pairs are skipped whole (the closure's indexes
    // are aside: no conflict to fall back on, and none to expect).
    let insert = client
        .prepare(
            "WITH ins AS (
                 INSERT INTO fature_v2.hierarchy_index (ancestor_id, descendant_id, level_distance)
                 SELECT a.label::int8, p.affiliate_id, p.level - a.ord::int
                 FROM cutover.backfill_plan p,
                      unnest(string_to_array(p.path::text, '.')) WITH ORDINALITY AS a(label, ord)
                 WHERE (p.level, p.affiliate_id) > ($1, $2) AND (p.level, p.affiliate_id) <= ($3, $4)
                   AND a.ord < p.level
                   AND NOT EXISTS (SELECT 1 FROM cutover.backfill_closure_present h
                                   WHERE h.affiliate_id = p.affiliate_id)
                 RETURNING 1
             )
             SELECT count(*) FROM ins",
        )
        .await?;
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
    let mut from = checkpoint(client).await?;
    while let Some(end) = batch_end(client, from, options.batch).await? {
        client.batch_execute("BEGIN").await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&from.0, &from.1, &end.0, &end.1];
        client.query_one(&insert, &params).await?;
        client
            .execute(
                "UPDATE cutover.backfill_progress SET last_level = $1, last_id = $2, updated_at = now()",
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
