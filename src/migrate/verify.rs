//! `cutover verify`: proof that the target holds what legacy holds.
//!
//! In one `REPEATABLE READ READ ONLY` snapshot: every mapped column of every key compared
//! both ways, chunked by key range so it scales (missing in the target, extra in the target,
//! different, per column); the seed's integrity checks ([`super::integrity`]); and the seed's
//! post-migration checks — counts, parent links, top performers, and its performance criteria
//! measured (level-1 query < 10 ms, level-5 query < 50 ms).
//!
//! Derived columns (legacy's `level_1_referrals`) are compared too, but a difference there is
//! legacy's counter drifting from the truth the target recomputes: reported apart, it does not
//! fail verification. A legacy parent that no longer exists matches a target root recorded in
//! `fature_v2.detached_affiliates` (the children of a deleted affiliate).

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use super::integrity;
use crate::routing::rules::{TableMap, quote_ident};

/// Keys compared per query.
pub const DEFAULT_CHUNK: i64 = 50_000;

/// Differing keys kept per problem, to show.
const SAMPLE: usize = 10;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub legacy_table: String,
    pub target_table: String,
    pub legacy_rows: i64,
    pub target_rows: i64,
    /// Keys in legacy but not in the target.
    pub missing: Problem,
    /// Keys in the target but not in legacy.
    pub extra: Problem,
    /// Legacy rows the backfill quarantined (orphans, cycles): known, not drift.
    pub quarantined: i64,
    /// Keys on both sides whose mapped, non-derived columns differ.
    pub different: Problem,
    /// Per column (legacy name): how many keys differ there.
    pub columns: Vec<(String, i64)>,
    /// Derived columns: legacy's value differs from the target's (informational).
    pub derived: Vec<(String, Problem)>,
    pub checks: Vec<Check>,
    pub performance: Vec<Timing>,
    /// Dual-write's queues, when dual-write is installed (informational: what they hold
    /// shows as drift above until repaired or replayed).
    pub dual_write: Option<DualWriteQueues>,
    /// The data agree and every check passed (the timings are apart: a loaded server is
    /// slower, its data are not wrong).
    pub ok: bool,
    /// Every performance criterion met.
    pub timing_ok: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct DualWriteQueues {
    /// Write divergences not repaired yet (`cutover.write_divergences`).
    pub pending_repair: i64,
    /// Keys handed to a backfill that has not completed (`cutover.backfill_catchup`).
    pub handed_to_backfill: i64,
}

#[derive(Debug, Default, Serialize)]
pub struct Problem {
    pub count: i64,
    pub sample_keys: Vec<i64>,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub group: String,
    pub name: String,
    pub value: String,
    pub passed: bool,
}

#[derive(Debug, Serialize)]
pub struct Timing {
    pub name: String,
    pub millis: f64,
    pub limit_millis: f64,
    pub passed: bool,
}

impl Problem {
    fn add(&mut self, key: i64) {
        self.count += 1;
        if self.sample_keys.len() < SAMPLE {
            self.sample_keys.push(key);
        }
    }
}

/// Runs every comparison and check in one snapshot.
/// Records a run in `cutover.verify_runs` (what the report shows as the last verify); a
/// database without the table (migrations older than 0012) records nothing.
pub async fn record(client: &Client, report: &Report) -> Result<(), tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('cutover.verify_runs') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(());
    }
    let failed = report.checks.iter().filter(|c| !c.passed).count() as i32;
    let slow = report.performance.iter().filter(|p| !p.passed).count() as i32;
    client
        .execute(
            "INSERT INTO cutover.verify_runs
                 (ok, legacy_rows, target_rows, missing, extra, different, quarantined, failed_checks,
                  slow_timings)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &report.ok,
                &report.legacy_rows,
                &report.target_rows,
                &report.missing.count,
                &report.extra.count,
                &report.different.count,
                &report.quarantined,
                &failed,
                &slow,
            ],
        )
        .await
        .map(drop)
}

pub async fn verify(
    client: &Client,
    table: &TableMap,
    chunk: i64,
) -> Result<Report, tokio_postgres::Error> {
    verify_showing(client, table, chunk, super::progress::Show::Nothing).await
}

/// [`verify`], showing its progress (`cutover verify`: a bar per phase on a terminal, a line
/// per phase elsewhere).
pub async fn verify_showing(
    client: &Client,
    table: &TableMap,
    chunk: i64,
    show: super::progress::Show,
) -> Result<Report, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let result = verify_in_snapshot(client, table, chunk.max(1), show).await;
    let _ = client.batch_execute("COMMIT").await;
    result
}

async fn verify_in_snapshot(
    client: &Client,
    table: &TableMap,
    chunk: i64,
    show: super::progress::Show,
) -> Result<Report, tokio_postgres::Error> {
    let legacy = table.legacy.quoted();
    let target = table.target.quoted();
    let key = quote_ident(&table.key);
    let mut report = Report {
        legacy_table: table.legacy.to_string(),
        target_table: table.target.to_string(),
        ..Report::default()
    };

    let bounds = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {legacy}), (SELECT count(*) FROM {target}),
                        LEAST((SELECT min({key}) FROM {legacy}), (SELECT min({key}) FROM {target}))::int8,
                        GREATEST((SELECT max({key}) FROM {legacy}), (SELECT max({key}) FROM {target}))::int8"
            ),
            &[],
        )
        .await?;
    report.legacy_rows = bounds.get(0);
    report.target_rows = bounds.get(1);
    let (lo, hi): (Option<i64>, Option<i64>) = (bounds.get(2), bounds.get(3));

    // One query per chunk: the keys that are missing, extra, or differ in some column.
    let plain: Vec<_> = table
        .columns
        .iter()
        .filter(|c| !c.derived && c.legacy != table.key)
        .collect();
    let derived: Vec<_> = table.columns.iter().filter(|c| c.derived).collect();
    let parent = plain
        .iter()
        .find(|c| c.legacy == "parent_affiliate_id")
        .map(|c| c.legacy.clone());
    let detached = client
        .query_one(
            "SELECT to_regclass('fature_v2.detached_affiliates') IS NOT NULL",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    let quarantine = client
        .query_one(
            "SELECT to_regclass('cutover.backfill_quarantine') IS NOT NULL",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    // Rows the backfill quarantined (orphans, cycles) are known to be missing.
    let not_quarantined = if quarantine {
        format!(
            " AND NOT EXISTS (SELECT 1 FROM cutover.backfill_quarantine q WHERE q.affiliate_id = l.{key})"
        )
    } else {
        String::new()
    };
    let queues = client
        .query_one(
            "SELECT CASE WHEN to_regclass('cutover.write_divergences') IS NOT NULL
                         AND to_regclass('cutover.backfill_catchup') IS NOT NULL THEN
                    ARRAY[(SELECT count(*) FROM cutover.write_divergences WHERE repaired_at IS NULL),
                          (SELECT count(*) FROM cutover.backfill_catchup)] END",
            &[],
        )
        .await?
        .get::<_, Option<Vec<i64>>>(0);
    report.dual_write = queues.map(|q| DualWriteQueues {
        pending_repair: q[0],
        handed_to_backfill: q[1],
    });
    if quarantine {
        report.quarantined = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM cutover.backfill_quarantine q
                     WHERE EXISTS (SELECT 1 FROM {legacy} l WHERE l.{key} = q.affiliate_id)"
                ),
                &[],
            )
            .await?
            .get(0);
    }
    let column_diff = |c: &crate::routing::rules::ColumnMap| -> String {
        let base = c.differs_sql();
        if Some(&c.legacy) == parent.as_ref() && detached {
            // A child of a deleted affiliate: legacy keeps the dangling id, the target made it
            // a root and recorded the former parent.
            format!(
                "({base} AND NOT (t.{} IS NULL AND EXISTS (SELECT 1 FROM fature_v2.detached_affiliates d
                   WHERE d.affiliate_id = t.{key} AND d.former_parent_id = l.{})
                   AND NOT EXISTS (SELECT 1 FROM {legacy} lp WHERE lp.{key} = l.{})))",
                quote_ident(&c.target),
                quote_ident(&c.legacy),
                quote_ident(&c.legacy)
            )
        } else {
            base
        }
    };
    let flags: Vec<String> = plain.iter().map(|c| column_diff(c)).collect();
    let derived_flags: Vec<String> = derived.iter().map(|c| c.differs_sql()).collect();
    let any = flags
        .iter()
        .chain(&derived_flags)
        .cloned()
        .collect::<Vec<_>>()
        .join(" OR ");
    let sql = format!(
        "SELECT coalesce(l.{key}, t.{key})::int8, l.{key} IS NULL, t.{key} IS NULL{}{}
         FROM (SELECT * FROM {legacy} WHERE {key} BETWEEN $1 AND $2) l
         FULL JOIN (SELECT * FROM {target} WHERE {key} BETWEEN $1 AND $2) t ON l.{key} = t.{key}
         WHERE l.{key} IS NULL OR (t.{key} IS NULL{not_quarantined})
            OR (l.{key} IS NOT NULL AND t.{key} IS NOT NULL AND ({}))",
        flags.iter().map(|f| format!(", {f}")).collect::<String>(),
        derived_flags
            .iter()
            .map(|f| format!(", {f}"))
            .collect::<String>(),
        if any.is_empty() {
            "false".to_owned()
        } else {
            any
        }
    );
    let statement = client.prepare(&sql).await?;
    let mut per_column = vec![0i64; plain.len()];
    let mut per_derived: Vec<Problem> = derived.iter().map(|_| Problem::default()).collect();
    // Chunks of at most `chunk` keys (of either side), so sparse keys cost nothing.
    let next_bound = client
        .prepare(&format!(
            "SELECT max(k)::int8 FROM (
                 SELECT k FROM (
                     (SELECT {key} AS k FROM {legacy} WHERE {key} >= $1 ORDER BY {key} LIMIT $2)
                     UNION
                     (SELECT {key} FROM {target} WHERE {key} >= $1 ORDER BY {key} LIMIT $2)
                 ) keys ORDER BY k LIMIT $2
             ) chunk"
        ))
        .await?;
    // Progress in key space: keys between the lowest and the highest, compared so far.
    let span = match (lo, hi) {
        (Some(lo), Some(hi)) => (hi - lo + 1).max(0) as u64,
        _ => 0,
    };
    let rows_phase = super::progress::Phase::start(show, "verify", "rows", span, "keys");
    if let (Some(lo), Some(_)) = (lo, hi) {
        let mut from = lo;
        loop {
            let to: Option<i64> = client
                .query_one(&next_bound, &[&from, &chunk])
                .await?
                .get(0);
            let Some(to) = to else { break };
            rows_phase.set((to - lo + 1).max(0) as u64);
            for row in client.query(&statement, &[&from, &to]).await? {
                let key_value: i64 = row.get(0);
                let (extra, missing): (bool, bool) = (row.get(1), row.get(2));
                if extra {
                    report.extra.add(key_value);
                    continue;
                }
                if missing {
                    report.missing.add(key_value);
                    continue;
                }
                let mut differs = false;
                for (i, count) in per_column.iter_mut().enumerate() {
                    if row.get::<_, bool>(3 + i) {
                        *count += 1;
                        differs = true;
                    }
                }
                if differs {
                    report.different.add(key_value);
                }
                for (j, problem) in per_derived.iter_mut().enumerate() {
                    if row.get::<_, bool>(3 + plain.len() + j) {
                        problem.add(key_value);
                    }
                }
            }
            match to.checked_add(1) {
                Some(next) => from = next,
                None => break,
            }
        }
    }
    report.columns = plain
        .iter()
        .zip(per_column)
        .filter(|(_, n)| *n > 0)
        .map(|(c, n)| (c.legacy.clone(), n))
        .collect();
    report.derived = derived
        .iter()
        .zip(per_derived)
        .map(|(c, p)| (c.legacy.clone(), p))
        .collect();

    rows_phase.finish();
    // The seed's IntegrityValidator, in the same snapshot.
    let checks_phase = super::progress::Phase::start(
        show,
        "verify",
        "integrity checks",
        integrity::CHECKS.len() as u64,
        "checks",
    );
    for check in integrity::CHECKS {
        checks_phase.inc(1);
        let offending: i64 = client.query_one(check.sql, &[]).await?.get(0);
        report.checks.push(Check {
            group: check.group.to_owned(),
            name: check.name.to_owned(),
            value: offending.to_string(),
            passed: offending == 0,
        });
    }
    checks_phase.finish();

    // Indexes a killed backfill left set aside (rebuilt when it is run again).
    let aside: Option<i64> = client
        .query_one(
            "SELECT CASE WHEN to_regclass('cutover.backfill_set_aside') IS NOT NULL
                    THEN (SELECT count(*) FROM cutover.backfill_set_aside) END",
            &[],
        )
        .await?
        .get(0);
    if let Some(aside) = aside {
        report.checks.push(Check {
            group: "schema".into(),
            name: "backfill_set_aside".into(),
            value: if aside == 0 {
                "all in place".into()
            } else {
                format!("{aside} indexes, keys or triggers set aside: run cutover backfill again to put them back")
            },
            passed: aside == 0,
        });
    }

    // The closure's foreign keys: a backfill killed while it had them set aside leaves
    // them missing until it is run again.
    let keys: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_constraint
             WHERE conrelid = 'fature_v2.hierarchy_index'::regclass AND contype = 'f' AND convalidated",
            &[],
        )
        .await?
        .get(0);
    report.checks.push(Check {
        group: "schema".into(),
        name: "closure_foreign_keys".into(),
        value: if keys == 2 {
            "2 validated".into()
        } else {
            format!("{keys} of 2: run cutover backfill again to restore them")
        },
        passed: keys == 2,
    });

    // The seed's PostMigrationValidator: counts and links.
    let counts = client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {legacy} l WHERE parent_affiliate_id IS NOT NULL{not_quarantined}),
                        (SELECT count(*) FROM {target} WHERE parent_affiliate_id IS NOT NULL)"
            ),
            &[],
        )
        .await;
    report.checks.push(Check {
        group: "post_migration".into(),
        name: "row_counts".into(),
        value: if report.quarantined > 0 {
            format!(
                "{} = {} + {} quarantined",
                report.legacy_rows, report.target_rows, report.quarantined
            )
        } else {
            format!("{} = {}", report.legacy_rows, report.target_rows)
        },
        passed: report.legacy_rows == report.target_rows + report.quarantined,
    });
    if let Ok(row) = counts {
        let (l, t): (i64, i64) = (row.get(0), row.get(1));
        let detached_count: i64 = if detached {
            client
                .query_one("SELECT count(*) FROM fature_v2.detached_affiliates", &[])
                .await?
                .get(0)
        } else {
            0
        };
        report.checks.push(Check {
            group: "post_migration".into(),
            name: "parent_links".into(),
            value: format!("{l} = {t} + {detached_count} detached"),
            passed: l == t + detached_count,
        });
    }
    if let Some(counter) = derived.first() {
        // Top performers: the target's ranking against legacy's truth (children counted),
        // since legacy's own counter may have drifted.
        let top = |sql: String| async move {
            client.query(&sql, &[]).await.map(|rows| {
                rows.iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
                    .collect::<Vec<_>>()
            })
        };
        let truth = top(format!(
            "SELECT p.{key}::int8, count(c.{key})::int8 AS n FROM {legacy} p JOIN {legacy} c ON c.parent_affiliate_id = p.{key}
             GROUP BY p.{key} ORDER BY n DESC, p.{key} LIMIT 10"
        ))
        .await?;
        let ours = top(format!(
            "SELECT {key}::int8, {}::int8 AS n FROM {target} WHERE {} > 0 ORDER BY n DESC, {key} LIMIT 10",
            quote_ident(&counter.target),
            quote_ident(&counter.target)
        ))
        .await?;
        report.checks.push(Check {
            group: "post_migration".into(),
            name: "top_performers".into(),
            value: if truth == ours {
                "same top 10".into()
            } else {
                format!("legacy {truth:?} vs target {ours:?}")
            },
            passed: truth == ours,
        });

        // Performance criteria of the plan, on the affiliate with the most referrals.
        if let Some(&(leader, _)) = ours.first() {
            for (name, depth, limit) in [("level-1 query", 1, 10.0), ("level-5 query", 5, 50.0)] {
                let stmt = client
                    .prepare(
                        "SELECT count(*) FROM fature_v2.hierarchy_index
                         WHERE ancestor_id = $1 AND level_distance <= $2 AND is_active",
                    )
                    .await?;
                let mut best = Duration::MAX;
                for _ in 0..5 {
                    let started = Instant::now();
                    client.query_one(&stmt, &[&leader, &depth]).await?;
                    best = best.min(started.elapsed());
                }
                let millis = best.as_secs_f64() * 1000.0;
                report.performance.push(Timing {
                    name: name.into(),
                    millis,
                    limit_millis: limit,
                    passed: millis < limit,
                });
            }
        }
    }

    report.ok = report.missing.count == 0
        && report.extra.count == 0
        && report.different.count == 0
        && report.checks.iter().all(|c| c.passed);
    report.timing_ok = report.performance.iter().all(|p| p.passed);
    Ok(report)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = |ok: bool| if ok { "ok" } else { "FAIL" };
        writeln!(
            f,
            "verify {} ↔ {} (one snapshot)",
            self.legacy_table, self.target_table
        )?;
        writeln!(
            f,
            "  rows         legacy {}  target {}",
            self.legacy_rows, self.target_rows
        )?;
        for (label, p) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("different", &self.different),
        ] {
            writeln!(
                f,
                "  {label:<12} {:>6}  {}{}",
                p.count,
                mark(p.count == 0),
                if p.sample_keys.is_empty() {
                    String::new()
                } else {
                    format!("  keys {:?}", p.sample_keys)
                }
            )?;
        }
        for (column, n) in &self.columns {
            writeln!(f, "    column {column}: {n} keys differ")?;
        }
        for (column, p) in &self.derived {
            writeln!(
                f,
                "  derived      {column}: {} legacy values differ from the target's recomputed ones (informational){}",
                p.count,
                if p.sample_keys.is_empty() {
                    String::new()
                } else {
                    format!("  keys {:?}", p.sample_keys)
                }
            )?;
        }
        for c in &self.checks {
            writeln!(
                f,
                "  {:<24} {:<30} {:>12}  {}",
                c.group,
                c.name,
                c.value,
                mark(c.passed)
            )?;
        }
        if let Some(q) = &self.dual_write {
            writeln!(
                f,
                "  dual-write   {} write divergences queued for repair (cutover repair), {} writes handed to a backfill not completed yet (informational)",
                q.pending_repair, q.handed_to_backfill
            )?;
        }
        for p in &self.performance {
            writeln!(
                f,
                "  performance  {:<16} {:>8.2} ms (< {} ms)  {}",
                p.name,
                p.millis,
                p.limit_millis,
                mark(p.passed)
            )?;
        }
        write!(
            f,
            "result: {}{}",
            if self.ok {
                "OK"
            } else {
                "DRIFT OR FAILED CHECKS"
            },
            if self.timing_ok {
                ""
            } else {
                " (performance criteria not met: timing, not drift — the data are as verified; a loaded server answers slower)"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slow server is not drift (issue 20): the data verdict stays OK, the timing is said
    /// apart, and that is what `verify_runs.ok` (the write gate) records.
    #[test]
    fn timing_is_not_drift() {
        let report = Report {
            ok: true,
            timing_ok: false,
            performance: vec![Timing {
                name: "level-1 query".into(),
                millis: 25.0,
                limit_millis: 10.0,
                passed: false,
            }],
            ..Report::default()
        };
        let text = report.to_string();
        assert!(
            text.contains("result: OK (performance criteria not met: timing, not drift"),
            "{text}"
        );
        assert!(!text.contains("DRIFT"), "{text}");
    }
}
