//! The report read from the shared state, in one snapshot: every query type's outcomes,
//! latency, trend and examples, the audit trail, the behaviour changes, the writes' state.

use std::time::Duration;

use tokio_postgres::Client;

use super::{
    AUDIT, Backfill, Cause, EXAMPLES, Example, ExpectedClass, Latency, Missing, Outcomes, Overall,
    QueryTypeReport, Report, ReportError, TREND_POINTS, TrendPoint, VerifyRun, Window,
    WriteDivergences, plans, verdict,
};
use crate::{
    control::slower_than_the_bar, routing::rules::RuleSet, shadow::divergence::percentile,
};

/// Whether a query type reads or writes, from its rule's example statement.
fn kind_of(rules: Option<&RuleSet>, query_type: &str) -> &'static str {
    match rules.and_then(|r| r.writes(query_type)) {
        Some(true) => "write",
        Some(false) => "read",
        None => "unknown",
    }
}

fn ratio(a: i64, b: i64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Reads everything the report shows for the last `since`.
pub async fn gather(
    client: &Client,
    since: Duration,
    rules: Option<&RuleSet>,
) -> Result<Report, ReportError> {
    let needed = client
        .query_one(
            "SELECT to_regclass('cutover.comparison_stats') IS NOT NULL,
                    to_regclass('cutover.verify_runs') IS NOT NULL",
            &[],
        )
        .await?;
    let (stats, verify_runs): (bool, bool) = (needed.get(0), needed.get(1));
    if !stats || !verify_runs {
        return Err(ReportError::NotMigrated(
            "no cutover.comparison_stats or cutover.verify_runs".into(),
        ));
    }
    let secs = since.as_secs_f64();
    let bounds = client
        .query_one("SELECT now() - make_interval(secs => $1), now()", &[&secs])
        .await?;
    let (from, until): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        (bounds.get(0), bounds.get(1));

    let rows = client
        .query(
            "WITH s AS (
                 SELECT query_type,
                        sum(matched)::int8 m, sum(expected)::int8 e, sum(confirmed)::int8 c,
                        sum(drift)::int8 d, sum(rewrite_bug)::int8 rb, sum(errors)::int8 er,
                        sum(undetermined)::int8 u, sum(transient)::int8 t,
                        sum(nondeterministic)::int8 nd, sum(skipped)::int8 sk,
                        sum(dropped)::int8 dr, sum(timed)::int8 ti,
                        sum(legacy_us_sum)::int8 ls, sum(target_us_sum)::int8 ts,
                        cutover.hist_sum(legacy_us_hist) lh, cutover.hist_sum(target_us_hist) th
                 FROM cutover.comparison_stats WHERE minute >= $1
                 GROUP BY query_type)
             SELECT coalesce(q.query_type, s.query_type), q.stage, q.percent,
                    coalesce(m, 0), coalesce(e, 0), coalesce(c, 0), coalesce(d, 0),
                    coalesce(rb, 0), coalesce(er, 0), coalesce(u, 0), coalesce(t, 0),
                    coalesce(nd, 0), coalesce(sk, 0), coalesce(dr, 0), coalesce(ti, 0),
                    coalesce(ls, 0), coalesce(ts, 0),
                    coalesce(lh, '{}'), coalesce(th, '{}')
             FROM cutover.query_type_state q FULL JOIN s USING (query_type)
             ORDER BY 1",
            &[&from],
        )
        .await?;
    let step = (secs / TREND_POINTS as f64).max(60.0);
    let verified_recently = matches!(
        crate::control::window_verify(client).await?,
        Some((true, _))
    );
    // Legacy rows the backfill set aside, as the behaviour change `quarantined_rows` counts
    // them (0 before its migration).
    let behaviour = behaviour_tables(client).await?;
    let quarantined = if behaviour {
        crate::control::behaviour::observed(
            client,
            crate::routing::rules::changes::ChangeKind::QuarantinedRows,
        )
        .await?
    } else {
        0
    };
    let mut query_types = Vec::new();
    let (mut all_samples, mut all_agree, mut all_timed, mut all_l, mut all_t) = (0, 0, 0, 0, 0);
    for r in rows {
        let query_type: String = r.get(0);
        // No live state: the rules' stage (a rule's own, or the default stage automatic
        // types are compared in), not "legacy" while it is being compared.
        let (stage, percent): (String, i16) =
            match (r.get::<_, Option<String>>(1), r.get::<_, Option<i16>>(2)) {
                (Some(stage), percent) => (stage, percent.unwrap_or(0)),
                (None, _) => {
                    let from_rules = rules.map(|rules| {
                        rules
                            .named(&query_type)
                            .map_or(rules.defaults.stage, |q| q.stage)
                    });
                    let (stage, percent) = crate::routing::rules::stage_columns(
                        from_rules.unwrap_or(crate::routing::rules::Stage::Legacy),
                    );
                    (stage.to_owned(), percent)
                }
            };
        let o = Outcomes {
            matched: r.get(3),
            expected: r.get(4),
            confirmed: r.get(5),
            drift: r.get(6),
            rewrite_bug: r.get(7),
            error: r.get(8),
            undetermined: r.get(9),
            transient: r.get(10),
            nondeterministic: r.get(11),
            skipped: r.get(12),
            dropped: r.get(13),
        };
        let (timed, ls, ts): (i64, i64, i64) = (r.get(14), r.get(15), r.get(16));
        let (lh, th): (Vec<i64>, Vec<i64>) = (r.get(17), r.get(18));
        let samples = o.matched + o.expected + o.confirmed;
        let agree = o.matched + o.expected;
        all_samples += samples;
        all_agree += agree;
        all_timed += timed;
        all_l += ls;
        all_t += ts;
        let mean = |sum: i64| ratio(sum, timed).map(|us| us / 1000.0);
        let match_rate = ratio(agree, samples);
        let legacy = Latency {
            mean_ms: mean(ls),
            p50_ms: percentile(&lh, 0.50),
            p95_ms: percentile(&lh, 0.95),
            p99_ms: percentile(&lh, 0.99),
        };
        let target = Latency {
            mean_ms: mean(ts),
            p50_ms: percentile(&th, 0.50),
            p95_ms: percentile(&th, 0.95),
            p99_ms: percentile(&th, 0.99),
        };
        let improvement = match (legacy.mean_ms, target.mean_ms) {
            (Some(l), Some(t)) if l > 0.0 => Some(1.0 - t / l),
            _ => None,
        };
        let trend = trend(client, &query_type, from, step).await?;
        let examples = examples(client, &query_type, from).await?;
        let expected = expected(client, rules, &query_type, from).await?;
        let kind = kind_of(rules, &query_type);
        let slower = |l: Option<f64>, t: Option<f64>| matches!((l, t), (Some(l), Some(t)) if t > l);
        let plans = match rules {
            Some(rules)
                if kind == "read"
                    && (slower(legacy.p99_ms, target.p99_ms)
                        || slower(legacy.mean_ms, target.mean_ms)) =>
            {
                plans::of(client, rules, &query_type).await
            }
            _ => None,
        };
        let mut verdict = verdict(&stage, percent, samples, match_rate);
        // The gate's latency bar (control::set_stage): a read type whose target p99 is more
        // than twice legacy's goes no further unless forced.
        if kind != "write"
            && stage != "legacy"
            && verdict.next.is_some()
            && let Some((l, t)) = slower_than_the_bar(&lh, &th)
        {
            verdict.ready = false;
            verdict.missing.push(Missing::Latency {
                target_ms: t.to_string(),
                legacy_ms: l.to_string(),
            });
        }
        if !verdict.ready
            && let Some(difference) = examples
                .iter()
                .filter(|e| e.kind != "error" && e.expected_class.is_none())
                .find_map(|e| Cause::quarantine_explains(e, quarantined))
        {
            verdict.causes.push(Cause::Quarantined {
                rows: quarantined,
                difference,
            });
        }
        if kind == "write" && stage != "legacy" && verdict.next.is_some() {
            // The gate of a write type: a clean verify in the gate's window.
            verdict.ready = verified_recently;
            verdict.missing = if verified_recently {
                Vec::new()
            } else {
                vec![Missing::Verify]
            };
        }
        query_types.push(QueryTypeReport {
            kind,
            verdict,
            stage: crate::routing::rules::stage_label(&stage, percent),
            query_type,
            percent,
            samples,
            outcomes: o,
            match_rate,
            legacy,
            target,
            improvement,
            plans,
            trend,
            examples,
            expected,
        });
    }
    let legacy_mean_ms = ratio(all_l, all_timed).map(|us| us / 1000.0);
    let target_mean_ms = ratio(all_t, all_timed).map(|us| us / 1000.0);
    let overall = Overall {
        samples: all_samples,
        success_rate: ratio(all_agree, all_samples),
        performance_improvement: match (legacy_mean_ms, target_mean_ms) {
            (Some(l), Some(t)) if l > 0.0 => Some(1.0 - t / l),
            _ => None,
        },
        legacy_mean_ms,
        target_mean_ms,
        write_divergences: write_divergences(client).await?,
        backfill: backfill(client).await?,
        last_verify: last_verify(client).await?,
    };
    Ok(Report {
        generated_at: time(until),
        window: Window {
            since: time(from),
            until: time(until),
            hours: secs / 3600.0,
        },
        overall,
        query_types,
        behaviour_changes: match rules {
            Some(rules) if behaviour => crate::control::behaviour::status(client, rules).await?,
            _ => Vec::new(),
        },
        audit: crate::control::history(client, AUDIT).await?,
    })
}

/// Whether the database has the behaviour change tables (migration 0016).
async fn behaviour_tables(client: &Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT to_regclass('cutover.behaviour_acceptances') IS NOT NULL",
            &[],
        )
        .await?
        .get(0))
}

async fn trend(
    client: &Client,
    query_type: &str,
    from: chrono::DateTime<chrono::Utc>,
    step: f64,
) -> Result<Vec<TrendPoint>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT date_bin(make_interval(secs => $3), minute, $2) AS at,
                    sum(matched + expected + confirmed)::int8,
                    sum(matched + expected)::int8,
                    sum(timed)::int8, sum(legacy_us_sum)::int8, sum(target_us_sum)::int8
             FROM cutover.comparison_stats
             WHERE query_type = $1 AND minute >= $2
             GROUP BY 1 ORDER BY 1",
            &[&query_type, &from, &step],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let (samples, agree, timed, l, t): (i64, i64, i64, i64, i64) =
                (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            TrendPoint {
                at: time(r.get(0)),
                samples,
                match_rate: ratio(agree, samples),
                legacy_ms: ratio(l, timed).map(|us| us / 1000.0),
                target_ms: ratio(t, timed).map(|us| us / 1000.0),
            }
        })
        .collect())
}

async fn examples(
    client: &Client,
    query_type: &str,
    from: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Example>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT found_at, kind, expected_class, columns, legacy_sql, target_sql, params, diff,
                    legacy_error, target_error
             FROM cutover.divergences
             WHERE query_type = $1 AND found_at >= $2
             ORDER BY (expected_class IS NOT NULL), found_at DESC LIMIT $3",
            &[&query_type, &from, &EXAMPLES],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Example {
            found_at: time(r.get(0)),
            kind: r.get(1),
            expected_class: r.get(2),
            columns: r.get(3),
            legacy_sql: r.get(4),
            target_sql: r.get(5),
            params: r.get(6),
            diff: r.get(7),
            legacy_error: r.get(8),
            target_error: r.get(9),
        })
        .collect())
}

async fn expected(
    client: &Client,
    rules: Option<&RuleSet>,
    query_type: &str,
    from: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<ExpectedClass>, tokio_postgres::Error> {
    let sampled = |class: String| async move {
        client
            .query_one(
                "SELECT count(*) FROM cutover.divergences
                 WHERE query_type = $1 AND expected_class = $2 AND found_at >= $3",
                &[&query_type, &class, &from],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
    };
    let mut out = Vec::new();
    for e in rules.map(|r| r.expected_of(query_type)).unwrap_or_default() {
        out.push(ExpectedClass {
            sampled: sampled(e.class.clone()).await?,
            class: e.class,
            kind: Some(e.kind),
            columns: e.columns,
            note: e.note,
            source: "rules".into(),
        });
    }
    for r in client
        .query(
            "SELECT class, kind, columns, note, marked_by FROM cutover.divergence_marks
             WHERE query_type = $1 ORDER BY class",
            &[&query_type],
        )
        .await?
    {
        let class: String = r.get(0);
        out.push(ExpectedClass {
            sampled: sampled(class.clone()).await?,
            class,
            kind: Some(r.get(1)),
            columns: r.get(2),
            note: r.get(3),
            source: r.get(4),
        });
    }
    Ok(out)
}

async fn write_divergences(client: &Client) -> Result<WriteDivergences, tokio_postgres::Error> {
    let r = client
        .query_one(
            "SELECT count(*) FILTER (WHERE repaired_at IS NULL), count(*) FILTER (WHERE repaired_at IS NOT NULL)
             FROM cutover.write_divergences",
            &[],
        )
        .await?;
    Ok(WriteDivergences {
        pending: r.get(0),
        repaired: r.get(1),
    })
}

async fn backfill(client: &Client) -> Result<Option<Backfill>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT CASE WHEN phase = 'done' THEN 'completed' ELSE 'in progress: ' || phase END,
                    updated_at, rows_copied
             FROM cutover.backfill_progress",
            &[],
        )
        .await?;
    Ok(row.map(|r| Backfill {
        state: r.get(0),
        updated_at: time(r.get(1)),
        rows_copied: r.get(2),
    }))
}

async fn last_verify(client: &Client) -> Result<Option<VerifyRun>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT ran_at, ok, legacy_rows, target_rows, missing, extra, different, quarantined,
                    failed_checks, slow_timings
             FROM cutover.verify_runs ORDER BY ran_at DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| VerifyRun {
            ran_at: time(r.get(0)),
            ok: r.get(1),
            legacy_rows: r.get(2),
            target_rows: r.get(3),
            missing: r.get(4),
            extra: r.get(5),
            different: r.get(6),
            quarantined: r.get(7),
            failed_checks: r.get(8),
            slow_timings: r.get(9),
        }))
}
