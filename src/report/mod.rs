//! `cutover report` and `/status`: what reviewers read to decide whether a query type may
//! move — gathered from the shared state (so it covers every replica), rendered as JSON
//! (the schema is `docs/report.md`), Markdown or one self-contained HTML file, in English or
//! Portuguese.
//!
//! [`gather`] reads; [`render`] writes; nothing here changes the database.

mod gather;
pub mod plans;
pub mod render;
mod text;

pub use gather::gather;

use serde::Serialize;

use crate::control::{GATE_MAX_P99_RATIO, GATE_MIN_MATCH_RATE, GATE_MIN_SAMPLES};

pub use text::Lang;

const WRITES_BY_VERIFY: &str =
    "a clean `cutover verify` in the last hour (writes are not compared by the shadow)";

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
