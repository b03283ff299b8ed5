//! The report as JSON, Markdown (fit to paste into a pull request) or one self-contained HTML
//! file (no external assets; charts in inline SVG; real tables and headings).

use std::fmt::Write;

use serde_json::Value;

use super::{Example, Lang, Latency, QueryTypeReport, Report, TrendPoint, text::OUTCOMES};

mod html;

pub use html::html;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Html,
    Markdown,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "html" => Ok(Format::Html),
            "md" | "markdown" => Ok(Format::Markdown),
            "json" => Ok(Format::Json),
            other => Err(format!("format {other:?}: html, md or json")),
        }
    }
}

pub fn render(report: &Report, format: Format, lang: Lang) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(report).unwrap_or_default() + "\n",
        Format::Markdown => markdown(report, lang),
        Format::Html => html(report, lang, None),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.2}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn le_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("≤ {v}"))
}

fn outcome_values(q: &QueryTypeReport) -> [i64; 11] {
    let o = &q.outcomes;
    [
        o.matched,
        o.expected,
        o.confirmed,
        o.drift,
        o.rewrite_bug,
        o.error,
        o.undetermined,
        o.transient,
        o.nondeterministic,
        o.skipped,
        o.dropped,
    ]
}

fn verdict_line(q: &QueryTypeReport, lang: Lang) -> String {
    let t = lang.text();
    let line = match &q.verdict.next {
        None => t.final_stage.to_owned(),
        Some(next) if q.verdict.ready => format!("{} {next}", t.ready_for),
        Some(next) if q.kind == "write" => {
            format!("{} {next} — {}", t.not_ready_for, t.writes_by_verify)
        }
        Some(next) => format!(
            "{} {next} — {}: {}",
            t.not_ready_for,
            t.needs,
            q.verdict
                .missing
                .iter()
                .map(|m| m.text(lang))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    q.verdict
        .causes
        .iter()
        .fold(line, |line, cause| format!("{line}. {}", cause.text(lang)))
}

fn overall_rows(r: &Report, lang: Lang) -> Vec<(String, String)> {
    let t = lang.text();
    let o = &r.overall;
    vec![
        (t.success_rate.into(), pct(o.success_rate)),
        (t.improvement.into(), pct(o.performance_improvement)),
        (t.samples.into(), o.samples.to_string()),
        (
            t.write_divergences.into(),
            format!(
                "{} {}, {} {}",
                o.write_divergences.pending,
                t.pending_repair,
                o.write_divergences.repaired,
                t.repaired
            ),
        ),
        (
            t.backfill.into(),
            o.backfill.as_ref().map_or(t.none.into(), |b| {
                if b.rows_copied == 0 && b.state == "completed" {
                    format!("{} ({})", t.nothing_to_copy, b.updated_at)
                } else {
                    format!(
                        "{} ({} {}, {})",
                        super::text::backfill_state(lang, &b.state),
                        b.rows_copied,
                        t.rows,
                        b.updated_at
                    )
                }
            }),
        ),
        (
            t.last_verify.into(),
            o.last_verify
                .as_ref()
                .map_or(t.none.into(), |v| super::text::verify_line(lang, v)),
        ),
    ]
}

/// One behaviour change's cells: name, kind, times seen, acceptance, query types, meaning.
fn behaviour_row(c: &crate::control::behaviour::Status, lang: Lang) -> [String; 6] {
    let t = lang.text();
    [
        c.name.clone().unwrap_or_else(|| "–".into()),
        c.kind.to_string(),
        c.observed.to_string(),
        match (&c.name, &c.accepted) {
            (None, _) => t.undeclared.into(),
            (Some(_), None) => t.not_accepted.into(),
            (Some(_), Some(a)) => format!(
                "{} — {} ({}): {}",
                a.accepted_at, a.accepted_by, a.via, a.reason
            ),
        },
        c.query_types.join(", "),
        c.description.clone().unwrap_or_default(),
    ]
}

fn latency_row(l: &Latency) -> [String; 4] {
    [
        ms(l.mean_ms),
        le_ms(l.p50_ms),
        le_ms(l.p95_ms),
        le_ms(l.p99_ms),
    ]
}

/// A value of a diff row as text.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The differing rows of an example: (key, column, legacy, target, differs) for changed
/// rows, and whole rows present on one side only. A one-row answer on each side (an
/// aggregate: `count`) is shown column by column, "44319 vs 44315", not as two rows.
fn diff_rows(e: &Example, lang: Lang) -> Vec<(String, String, String, String, bool)> {
    let t = lang.text();
    let mut out = Vec::new();
    if let (Some([legacy]), Some([target])) = (
        e.diff["only_legacy"].as_array().map(Vec::as_slice),
        e.diff["only_target"].as_array().map(Vec::as_slice),
    ) && e.diff["changed"].as_array().is_none_or(Vec::is_empty)
        && let (Some(l), Some(tg)) = (legacy.as_object(), target.as_object())
    {
        for (col, lv) in l {
            let tv = &tg[col];
            out.push(("–".into(), col.clone(), cell(lv), cell(tv), lv != tv));
        }
        return out;
    }
    for c in e.diff["changed"].as_array().into_iter().flatten() {
        let key = cell(&c["key"]);
        let differing: Vec<&str> = c["columns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if let Some(legacy) = c["legacy"].as_object() {
            for (col, lv) in legacy {
                let tv = &c["target"][col];
                out.push((
                    key.clone(),
                    col.clone(),
                    cell(lv),
                    cell(tv),
                    differing.contains(&col.as_str()),
                ));
            }
        }
    }
    for (side, rows) in [
        ("legacy", &e.diff["only_legacy"]),
        ("target", &e.diff["only_target"]),
    ] {
        for row in rows.as_array().into_iter().flatten() {
            let text = row
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| format!("{k}={}", cell(v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let (l, r) = if side == "legacy" {
                (text, t.absent.to_owned())
            } else {
                (t.absent.to_owned(), text)
            };
            out.push(("–".into(), t.whole_row.into(), l, r, true));
        }
    }
    out
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn markdown(r: &Report, lang: Lang) -> String {
    let t = lang.text();
    let mut m = String::new();
    let _ = writeln!(m, "# {}\n", t.title);
    let _ = writeln!(
        m,
        "{}: {} → {} ({:.1} h); {} {}\n",
        t.window, r.window.since, r.window.until, r.window.hours, t.generated, r.generated_at
    );
    let _ = writeln!(m, "## {}\n\n| | |\n|---|---|", t.overall);
    for (k, v) in overall_rows(r, lang) {
        let _ = writeln!(m, "| {k} | {} |", md_escape(&v));
    }
    let _ = writeln!(
        m,
        "\n## {}\n\n| {} | {} | {} | {} | {} |\n|---|---|---:|---:|---|",
        t.query_types, t.query_type, t.stage, t.samples, t.match_rate, t.verdict
    );
    for q in &r.query_types {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} |",
            q.query_type,
            q.stage,
            q.samples,
            pct(q.match_rate),
            md_escape(&verdict_line(q, lang))
        );
    }
    if r.overall.samples == 0 {
        let _ = writeln!(m, "\n> {}", t.empty);
    }
    for q in &r.query_types {
        let _ = writeln!(m, "\n### {} — {}\n", q.query_type, q.stage);
        let _ = writeln!(m, "**{}**: {}\n", t.verdict, verdict_line(q, lang));
        let _ = writeln!(m, "| {} | {} |\n|---|---:|", t.outcome, t.count);
        for (name, n) in t.outcome_names.iter().zip(outcome_values(q)) {
            let _ = writeln!(m, "| {} | {n} |", name.trim_start());
        }
        let _ = writeln!(
            m,
            "\n| {} | {} | p50 | p95 | p99 |\n|---|---:|---:|---:|---:|",
            t.side, t.mean
        );
        for (side, l) in [(t.legacy, &q.legacy), (t.target, &q.target)] {
            let [mean, p50, p95, p99] = latency_row(l);
            let _ = writeln!(m, "| {side} (ms) | {mean} | {p50} | {p95} | {p99} |");
        }
        if let Some(i) = q.improvement {
            let _ = writeln!(m, "\n{}: {:.1}%", t.improvement, i * 100.0);
        }
        if let Some(p) = &q.plans {
            let _ = writeln!(
                m,
                "\n**{}**\n\n- {}: `{}`\n- {}: `{}`",
                t.slower_plans, t.legacy, p.legacy, t.target, p.target
            );
        }
        if !q.expected.is_empty() {
            let _ = writeln!(
                m,
                "\n**{}**\n\n| class | {} | {} | {} |\n|---|---|---|---|",
                t.expected, t.columns, t.note, t.source
            );
            for e in &q.expected {
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} |",
                    e.class,
                    e.columns.join(", "),
                    md_escape(&e.note),
                    e.source
                );
            }
        }
        if !q.examples.is_empty() {
            let _ = writeln!(m, "\n**{}**", t.examples);
        }
        for e in &q.examples {
            let _ = writeln!(
                m,
                "\n- {} — **{}**{} — {}: {}\n\n  ```sql\n  -- legacy\n  {}\n  -- target\n  {}\n  ```",
                e.found_at,
                e.kind,
                e.expected_class
                    .as_ref()
                    .map_or(String::new(), |c| format!(" ({})", c)),
                t.params,
                e.params,
                e.legacy_sql.replace('\n', "\n  "),
                e.target_sql.replace('\n', "\n  ")
            );
            for err in [&e.legacy_error, &e.target_error].into_iter().flatten() {
                let _ = writeln!(m, "  {}: `{err}`", t.error);
            }
            let rows = diff_rows(e, lang);
            if !rows.is_empty() {
                let _ = writeln!(
                    m,
                    "\n  | {} | {} | {} | {} |\n  |---|---|---|---|",
                    t.key, t.column, t.legacy, t.target
                );
                for (k, c, l, tv, differs) in rows {
                    let (l, tv) = if differs {
                        (
                            format!("**{}**", md_escape(&l)),
                            format!("**{}**", md_escape(&tv)),
                        )
                    } else {
                        (md_escape(&l), md_escape(&tv))
                    };
                    let _ = writeln!(m, "  | {k} | {c} | {l} | {tv} |");
                }
            }
        }
    }
    if !r.behaviour_changes.is_empty() {
        let _ = writeln!(
            m,
            "\n## {}\n\n{}\n\n| {} | {} | {} | {} | {} | {} |\n|---|---|---:|---|---|---|",
            t.behaviour_changes,
            t.behaviour_intro,
            t.behaviour_change,
            t.kind,
            t.seen,
            t.accepted,
            t.query_types,
            t.note
        );
        for c in &r.behaviour_changes {
            let [name, kind, seen, accepted, types, what] = behaviour_row(c, lang);
            let _ = writeln!(
                m,
                "| {} | {kind} | {seen} | {} | {} | {} |",
                md_escape(&name),
                md_escape(&accepted),
                md_escape(&types),
                md_escape(&what)
            );
        }
    }
    let _ = writeln!(
        m,
        "\n## {}\n\n| {} | {} | {} | {} | {} |\n|---|---|---|---|---|",
        t.audit, t.when, t.query_type, t.change, t.by, t.why
    );
    for a in &r.audit {
        let _ = writeln!(
            m,
            "| {} | {} | {} → {}{} | {} ({}) | {} |",
            a.changed_at,
            a.query_type,
            a.from.as_deref().unwrap_or("–"),
            a.to,
            if a.forced {
                format!(" ({})", t.forced)
            } else {
                String::new()
            },
            a.changed_by,
            a.via,
            md_escape(&a.reason)
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(diff: Value) -> Example {
        Example {
            found_at: String::new(),
            kind: "undetermined".into(),
            expected_class: None,
            columns: vec!["(rows)".into()],
            legacy_sql: String::new(),
            target_sql: String::new(),
            params: Value::Null,
            diff,
            legacy_error: None,
            target_error: None,
        }
    }

    /// A count that differs reads "44319 vs 44315" in one row (issue 20, item 8), and the
    /// words of a whole row on one side follow the report's language.
    #[test]
    fn a_count_divergence_reads_as_one_value_against_the_other() {
        let count = example(serde_json::json!({
            "changed": [],
            "only_legacy": [{"count": "44319"}],
            "only_target": [{"count": "44315"}],
        }));
        assert_eq!(
            diff_rows(&count, Lang::En),
            vec![(
                "–".into(),
                "count".into(),
                "44319".into(),
                "44315".into(),
                true
            )]
        );
        let missing = example(serde_json::json!({
            "changed": [],
            "only_legacy": [{"affiliate_id": "7"}, {"affiliate_id": "8"}],
            "only_target": [],
        }));
        let rows = diff_rows(&missing, Lang::PtBr);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].1.as_str(), rows[0].3.as_str()),
            ("(linha)", "(ausente)")
        );
    }
}
