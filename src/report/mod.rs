//! `cutover report` and `/status`: what reviewers read to decide whether a query type may
//! move — gathered from the shared state (so it covers every replica), rendered as JSON
//! (the schema is `docs/report.md`), Markdown or one self-contained HTML file, in English or
//! Portuguese.
//!
//! [`gather`] reads; [`render`] writes; nothing here changes the database.

pub mod plans;
pub mod render;
mod text;

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::{
    control::{GATE_MAX_P99_RATIO, GATE_MIN_MATCH_RATE, GATE_MIN_SAMPLES, slower_than_the_bar},
    divergence::percentile,
    rules::RuleSet,
};

pub use text::Lang;

/// Examples kept per query type.
const EXAMPLES: i64 = 5;
/// Audit entries shown.
const AUDIT: i64 = 50;
/// Points of a trend at most.
const TREND_POINTS: i64 = 48;

#[derive(Debug, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub window: Window,
    pub overall: Overall,
    pub query_types: Vec<QueryTypeReport>,
    /// Declared behaviour changes (and undeclared kinds that happened): how often, accepted
    /// or not. Empty without rules.
    pub behaviour_changes: Vec<crate::control::behaviour::Status>,
    pub audit: Vec<crate::control::AuditEntry>,
}

#[derive(Debug, Serialize)]
pub struct Window {
    pub since: String,
    pub until: String,
    pub hours: f64,
}

#[derive(Debug, Serialize)]
pub struct Overall {
    /// Comparisons with a verdict (matched, expected, confirmed) over every query type.
    pub samples: i64,
    /// The customer's "success rate": agreeing (matched or expected) / samples.
    pub success_rate: Option<f64>,
    pub legacy_mean_ms: Option<f64>,
    pub target_mean_ms: Option<f64>,
    /// The customer's "performance improvement": 1 - target mean / legacy mean.
    pub performance_improvement: Option<f64>,
    pub write_divergences: WriteDivergences,
    pub backfill: Option<Backfill>,
    pub last_verify: Option<VerifyRun>,
}

#[derive(Debug, Serialize)]
pub struct WriteDivergences {
    /// Waiting for `cutover repair`.
    pub pending: i64,
    pub repaired: i64,
}

#[derive(Debug, Serialize)]
pub struct Backfill {
    pub state: String,
    pub updated_at: String,
    pub rows_copied: i64,
}

#[derive(Debug, Serialize)]
pub struct VerifyRun {
    pub ran_at: String,
    pub ok: bool,
    pub legacy_rows: i64,
    pub target_rows: i64,
    pub missing: i64,
    pub extra: i64,
    pub different: i64,
    pub quarantined: i64,
    pub failed_checks: i32,
    /// Performance criteria not met (timing, apart from the data verdict `ok`).
    pub slow_timings: i32,
}

#[derive(Debug, Default, Serialize)]
pub struct Outcomes {
    pub matched: i64,
    pub expected: i64,
    pub confirmed: i64,
    pub drift: i64,
    pub rewrite_bug: i64,
    pub error: i64,
    pub undetermined: i64,
    pub transient: i64,
    pub nondeterministic: i64,
    pub skipped: i64,
    pub dropped: i64,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub mean_ms: Option<f64>,
    /// Upper bounds of the histogram buckets the percentiles fall in.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    /// The next stage (e.g. `cutover 10%`), or `None` at `complete`.
    pub next: Option<String>,
    pub ready: bool,
    /// What is missing (empty when ready); serialized in English words.
    pub missing: Vec<Missing>,
    /// Why it is not ready, where the evidence says (serialized in English words).
    pub causes: Vec<Cause>,
}

/// What explains a query type's divergences, next to its verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// The backfill set `rows` legacy rows aside (orphans, cycles) that v2 does not have, and
    /// the answers differ by `difference` (a count, or rows only legacy returned): no more
    /// than those rows explain.
    Quarantined { rows: i64, difference: i64 },
}

impl Cause {
    /// In the report's language.
    pub fn text(&self, lang: text::Lang) -> String {
        match self {
            Cause::Quarantined { rows, difference } if lang == text::Lang::PtBr => format!(
                "linhas em quarentena explicam a diferença: o backfill separou {rows} linhas do legado (órfãs, ciclos) que o v2 não tem, e as respostas diferem em {difference}; aceite a mudança de comportamento `quarantined_rows` (cutover ctl accept), ou corrija as linhas no legado e rode `cutover backfill` de novo"
            ),
            Cause::Quarantined { rows, difference } => format!(
                "quarantined rows explain the difference: the backfill set {rows} legacy rows aside (orphans, cycles) that v2 does not have, and the answers differ by {difference}; accept the `quarantined_rows` behaviour change (cutover ctl accept), or fix those rows in legacy and run `cutover backfill` again"
            ),
        }
    }

    /// Whether the rows the backfill set aside can explain an example: a one-row answer
    /// (an aggregate) whose numbers differ by no more than `rows`, or rows only legacy
    /// returned, no more than `rows` of them. The difference, if so.
    fn quarantine_explains(example: &Example, rows: i64) -> Option<i64> {
        let side = |k: &str| example.diff[k].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let (legacy, target, changed) = (side("only_legacy"), side("only_target"), side("changed"));
        if !changed.is_empty() || rows <= 0 {
            return None;
        }
        let number = |v: &serde_json::Value| {
            v.as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse::<f64>().ok()))
        };
        let difference = match (legacy, target) {
            ([l], [t]) => {
                let (l, t) = (l.as_object()?, t.as_object()?);
                let mut most = 0.0f64;
                for (column, lv) in l {
                    if lv == &t[column] {
                        continue;
                    }
                    let d = (number(lv)? - number(&t[column])?).abs();
                    if d.fract() != 0.0 {
                        return None;
                    }
                    most = most.max(d);
                }
                most as i64
            }
            (only, []) => only.len() as i64,
            _ => return None,
        };
        (difference > 0 && difference <= rows).then_some(difference)
    }
}

impl Serialize for Cause {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.text(text::Lang::En))
    }
}

/// One thing a query type lacks to be ready for its next stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Missing {
    Samples {
        more: i64,
        has: i64,
    },
    MatchRate {
        has: f64,
    },
    NoComparisons,
    /// The target's p99 is past the latency bar.
    Latency {
        target_ms: String,
        legacy_ms: String,
    },
    /// A write type's evidence: a clean verify in the last hour.
    Verify,
}

impl Missing {
    /// In the report's language.
    pub fn text(&self, lang: text::Lang) -> String {
        let pt = lang == text::Lang::PtBr;
        match self {
            Missing::Samples { more, has } if pt => {
                format!("mais {more} amostras comparadas (tem {has} de {GATE_MIN_SAMPLES})")
            }
            Missing::Samples { more, has } => {
                format!("{more} more compared samples (has {has} of {GATE_MIN_SAMPLES})")
            }
            Missing::MatchRate { has } if pt => format!(
                "uma taxa de concordância confirmada de {:.1}% (tem {:.2}%)",
                GATE_MIN_MATCH_RATE * 100.0,
                has * 100.0
            ),
            Missing::MatchRate { has } => format!(
                "a confirmed-match rate of {:.1}% (has {:.2}%)",
                GATE_MIN_MATCH_RATE * 100.0,
                has * 100.0
            ),
            Missing::NoComparisons if pt => "comparações (nenhuma ainda)".to_owned(),
            Missing::NoComparisons => "comparisons (none yet)".to_owned(),
            Missing::Latency {
                target_ms,
                legacy_ms,
            } if pt => format!(
                "um p99 no v2 de no máximo {GATE_MAX_P99_RATIO}× o do legado (tem {target_ms} ms contra {legacy_ms} ms): um índice ou um SQL melhor para o v2, ou uma mudança forçada"
            ),
            Missing::Latency {
                target_ms,
                legacy_ms,
            } => format!(
                "a target p99 at most {GATE_MAX_P99_RATIO}× legacy's (has {target_ms} ms against {legacy_ms} ms): an index or a better target SQL for v2, or a forced change"
            ),
            Missing::Verify if pt => lang.text().writes_by_verify.to_owned(),
            Missing::Verify => WRITES_BY_VERIFY.to_owned(),
        }
    }
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text(text::Lang::En))
    }
}

impl Serialize for Missing {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Debug, Serialize)]
pub struct TrendPoint {
    pub at: String,
    pub samples: i64,
    pub match_rate: Option<f64>,
    pub legacy_ms: Option<f64>,
    pub target_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Example {
    pub found_at: String,
    pub kind: String,
    pub expected_class: Option<String>,
    pub columns: Vec<String>,
    pub legacy_sql: String,
    pub target_sql: String,
    pub params: serde_json::Value,
    pub diff: serde_json::Value,
    pub legacy_error: Option<String>,
    pub target_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ExpectedClass {
    pub class: String,
    pub kind: Option<String>,
    pub columns: Vec<String>,
    pub note: String,
    /// `rules` or who marked it.
    pub source: String,
    /// Sampled divergences of this class in the window.
    pub sampled: i64,
}

#[derive(Debug, Serialize)]
pub struct QueryTypeReport {
    pub query_type: String,
    /// `read`, `write`, or `unknown` (no rule names it).
    pub kind: &'static str,
    pub stage: String,
    pub percent: i16,
    /// Comparisons with a verdict: matched + expected + confirmed.
    pub samples: i64,
    pub outcomes: Outcomes,
    /// (matched + expected) / samples.
    pub match_rate: Option<f64>,
    pub legacy: Latency,
    pub target: Latency,
    /// 1 - target mean / legacy mean.
    pub improvement: Option<f64>,
    /// For a read type slower on the target (p99 or mean): both sides' plan shapes, which
    /// say why (a sequential scan, a sort) and what v2 needs.
    pub plans: Option<plans::Plans>,
    pub verdict: Verdict,
    pub trend: Vec<TrendPoint>,
    pub examples: Vec<Example>,
    pub expected: Vec<ExpectedClass>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "the database has no cutover schema, or an older one ({0}): run `cutover migrate` against it"
    )]
    NotMigrated(String),
    #[error("reading the report's data: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// The next stage and whether the gate lets a query type reach it.
pub fn verdict(stage: &str, percent: i16, samples: i64, rate: Option<f64>) -> Verdict {
    let next = match stage {
        "legacy" => Some("shadow".to_owned()),
        "shadow" => Some("cutover 10%".to_owned()),
        "cutover" if percent < 10 => Some("cutover 10%".to_owned()),
        "cutover" if percent < 50 => Some("cutover 50%".to_owned()),
        "cutover" => Some("target".to_owned()),
        "target" => Some("complete".to_owned()),
        _ => None,
    };
    // Moving to shadow serves nothing from the target: no evidence needed.
    if stage == "legacy" || next.is_none() {
        return Verdict {
            ready: next.is_some(),
            next,
            missing: Vec::new(),
            causes: Vec::new(),
        };
    }
    let mut missing = Vec::new();
    if samples < GATE_MIN_SAMPLES {
        missing.push(Missing::Samples {
            more: GATE_MIN_SAMPLES - samples,
            has: samples,
        });
    }
    match rate {
        Some(r) if r >= GATE_MIN_MATCH_RATE => {}
        Some(r) => missing.push(Missing::MatchRate { has: r }),
        None => missing.push(Missing::NoComparisons),
    }
    Verdict {
        ready: missing.is_empty(),
        next,
        missing,
        causes: Vec::new(),
    }
}

const WRITES_BY_VERIFY: &str =
    "a clean `cutover verify` in the last hour (writes are not compared by the shadow)";

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
            crate::rules::changes::ChangeKind::QuarantinedRows,
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
                    let (stage, percent) = crate::control::stage_columns(
                        from_rules.unwrap_or(crate::rules::Stage::Legacy),
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
            stage: crate::control::stage_label(&stage, percent),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn example(diff: serde_json::Value) -> Example {
        Example {
            found_at: String::new(),
            kind: "drift".into(),
            expected_class: None,
            columns: Vec::new(),
            legacy_sql: String::new(),
            target_sql: String::new(),
            params: serde_json::Value::Null,
            diff,
            legacy_error: None,
            target_error: None,
        }
    }

    #[test]
    fn quarantined_rows_explain_only_what_they_can() {
        use serde_json::json;
        let count = example(
            json!({"only_legacy": [{"count": 44319}], "only_target": [{"count": "44315"}]}),
        );
        assert_eq!(Cause::quarantine_explains(&count, 4), Some(4));
        assert_eq!(
            Cause::quarantine_explains(&count, 3),
            None,
            "more than they can"
        );
        assert_eq!(Cause::quarantine_explains(&count, 0), None);
        let rows = example(json!({"only_legacy": [{"affiliate_id": 1}, {"affiliate_id": 2}]}));
        assert_eq!(Cause::quarantine_explains(&rows, 5), Some(2));
        let both = example(json!({"only_legacy": [{"a": 1}, {"a": 2}], "only_target": [{"a": 3}]}));
        assert_eq!(Cause::quarantine_explains(&both, 5), None);
        let changed = example(json!({"changed": [{"key": 1}]}));
        assert_eq!(Cause::quarantine_explains(&changed, 5), None);
        let text = example(json!({"only_legacy": [{"name": "a"}], "only_target": [{"name": "b"}]}));
        assert_eq!(Cause::quarantine_explains(&text, 5), None, "not a number");
        let cause = Cause::Quarantined {
            rows: 4,
            difference: 4,
        };
        assert!(
            cause
                .text(text::Lang::PtBr)
                .starts_with("linhas em quarentena")
        );
    }

    #[test]
    fn verdicts_follow_the_gate() {
        let v = verdict("shadow", 0, 1200, Some(0.99));
        assert!(v.ready && v.next.as_deref() == Some("cutover 10%"));
        let v = verdict("shadow", 0, 300, Some(0.99));
        assert!(!v.ready && v.missing[0].to_string().contains("700 more"));
        assert!(
            v.missing[0]
                .text(text::Lang::PtBr)
                .contains("mais 700 amostras")
        );
        let v = verdict("cutover", 10, 5000, Some(0.90));
        assert!(!v.ready && v.next.as_deref() == Some("cutover 50%"));
        assert!(
            v.missing[0].to_string().contains("95.0%"),
            "{:?}",
            v.missing
        );
        assert!(verdict("legacy", 0, 0, None).ready);
        assert!(verdict("complete", 100, 0, None).next.is_none());
    }
}
