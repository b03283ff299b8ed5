//! The report as one self-contained HTML file: no external assets, charts in inline SVG,
//! real tables and headings.

use std::fmt::Write;

use super::{
    Lang, OUTCOMES, Report, TrendPoint, behaviour_row, diff_rows, latency_row, outcome_values,
    overall_rows, pct, verdict_line,
};

/// Text for HTML: escaped, and `code` in backticks (as the prose of the texts writes
/// commands) set as code rather than shown with its backticks.
fn esc(s: &str) -> String {
    let escaped = s
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    if !escaped.matches('`').count().is_multiple_of(2) {
        return escaped;
    }
    let mut out = String::with_capacity(escaped.len() + 16);
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("<code>");
            out.push_str(part);
            out.push_str("</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

const CSS: &str = "body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1b1b1b;background:#fff;max-width:1100px;margin:0 auto;padding:1.5rem}
h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:2px solid #ddd}h3{margin-top:1.6rem}
table{border-collapse:collapse;margin:.6rem 0;width:100%}th,td{border:1px solid #bbb;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ready{color:#0a6b2a;font-weight:600}.blocked{color:#a10000;font-weight:600}
mark{background:#ffe08a;color:#000}pre{background:#f6f6f6;padding:.5rem;overflow-x:auto;white-space:pre-wrap}
.charts{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0}figcaption{font-size:.85rem;color:#333}
section.qt{border-top:1px solid #ccc}";

/// One line of a chart: its name, how to read its value at a point, its SVG stroke.
type Series<'a> = (&'a str, fn(&TrendPoint) -> Option<f64>, &'a str);

/// A line chart of `series` (each a list of optional values, one per point) in inline SVG.
fn chart(title: &str, points: &[TrendPoint], series: &[Series<'_>], max: Option<f64>) -> String {
    let (w, h, pad) = (480.0, 160.0, 34.0);
    let values: Vec<f64> = series
        .iter()
        .flat_map(|(_, f, _)| points.iter().filter_map(f))
        .collect();
    let top = max.unwrap_or_else(|| values.iter().copied().fold(0.0, f64::max).max(0.001) * 1.1);
    let n = points.len().max(2) as f64 - 1.0;
    let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / n;
    let y = |v: f64| h - pad + -(h - 2.0 * pad) * (v / top);
    let mut svg = format!(
        "<figure><svg role=\"img\" aria-label=\"{t}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\"><title>{t}</title>\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#fff\"/>\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#555\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"#555\"/>\
         <text x=\"2\" y=\"{ty}\" font-size=\"10\">{top:.1}</text><text x=\"2\" y=\"{b}\" font-size=\"10\">0</text>",
        t = esc(title),
        b = h - pad,
        r = w - pad,
        ty = pad + 4.0,
    );
    if let (Some(first), Some(last)) = (points.first(), points.last()) {
        let _ = write!(
            svg,
            "<text x=\"{pad}\" y=\"{}\" font-size=\"10\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
            h - 8.0,
            esc(&first.at),
            w - pad,
            h - 8.0,
            esc(&last.at)
        );
    }
    for (_, f, style) in series {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| f(p).map(|v| (x(i), y(v))))
            .collect();
        let line: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        if !pts.is_empty() {
            let _ = write!(
                svg,
                "<polyline fill=\"none\" stroke-width=\"2\" {style} points=\"{}\"/>",
                line.join(" ")
            );
        }
        for (a, b) in &pts {
            let _ = write!(
                svg,
                "<circle cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"2.5\" {style} fill=\"#fff\"/>"
            );
        }
    }
    let _ = write!(
        svg,
        "</svg><figcaption>{}</figcaption></figure>",
        esc(title)
    );
    svg
}

/// Opens an HTML table: its caption, a header row of column headers, the body.
fn table_head(h: &mut String, caption: Option<&str>, columns: &[&str]) {
    h.push_str("<table>");
    if let Some(caption) = caption {
        let _ = write!(h, "<caption>{}</caption>", esc(caption));
    }
    h.push_str("<thead><tr>");
    for column in columns {
        let _ = write!(h, "<th scope=\"col\">{}</th>", esc(column));
    }
    h.push_str("</tr></thead><tbody>");
}

/// The HTML report; `refresh` (seconds) makes the page reload itself (`/status`).
pub fn html(r: &Report, lang: Lang, refresh: Option<u32>) -> String {
    let t = lang.text();
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"{}\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{}<title>{}</title><style>{CSS}</style></head><body><main>",
        t.lang,
        refresh.map_or(String::new(), |s| format!(
            "<meta http-equiv=\"refresh\" content=\"{s}\">"
        )),
        esc(t.title)
    );
    let _ = write!(
        h,
        "<h1>{}</h1><p>{}: {} → {} ({:.1} h); {} {}</p>",
        esc(t.title),
        t.window,
        esc(&r.window.since),
        esc(&r.window.until),
        r.window.hours,
        t.generated,
        esc(&r.generated_at)
    );
    let _ = write!(h, "<h2>{}</h2><table><tbody>", t.overall);
    for (k, v) in overall_rows(r, lang) {
        let _ = write!(
            h,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            esc(&k),
            esc(&v)
        );
    }
    h.push_str("</tbody></table>");
    let _ = write!(h, "<h2>{}</h2>", t.query_types);
    table_head(
        &mut h,
        None,
        &[t.query_type, t.stage, t.samples, t.match_rate, t.verdict],
    );
    for q in &r.query_types {
        let class = if q.verdict.ready { "ready" } else { "blocked" };
        let _ = write!(
            h,
            "<tr><td><a href=\"#qt-{0}\">{0}</a></td><td>{1}</td><td class=\"n\">{2}</td><td class=\"n\">{3}</td><td class=\"{class}\">{4}</td></tr>",
            esc(&q.query_type),
            esc(&q.stage),
            q.samples,
            pct(q.match_rate),
            esc(&verdict_line(q, lang))
        );
    }
    h.push_str("</tbody></table>");
    if r.overall.samples == 0 {
        let _ = write!(h, "<p>{}</p>", esc(t.empty));
    }
    for q in &r.query_types {
        let _ = write!(
            h,
            "<section class=\"qt\" id=\"qt-{0}\"><h3>{0} — {1}</h3><p class=\"{2}\">{3}: {4}</p>",
            esc(&q.query_type),
            esc(&q.stage),
            if q.verdict.ready { "ready" } else { "blocked" },
            t.verdict,
            esc(&verdict_line(q, lang))
        );
        table_head(&mut h, Some(t.outcomes), &[t.outcome, t.count]);
        for ((key, name), n) in OUTCOMES.iter().zip(t.outcome_names).zip(outcome_values(q)) {
            let _ = write!(
                h,
                "<tr data-outcome=\"{key}\"><td>{}</td><td class=\"n\">{n}</td></tr>",
                esc(name.trim_start())
            );
        }
        h.push_str("</tbody></table>");
        table_head(
            &mut h,
            Some(t.latency),
            &[t.side, t.mean, "p50", "p95", "p99"],
        );
        for (side, l) in [(t.legacy, &q.legacy), (t.target, &q.target)] {
            let [mean, p50, p95, p99] = latency_row(l);
            let _ = write!(
                h,
                "<tr><th scope=\"row\">{side}</th><td class=\"n\">{mean}</td><td class=\"n\">{p50}</td><td class=\"n\">{p95}</td><td class=\"n\">{p99}</td></tr>"
            );
        }
        h.push_str("</tbody></table>");
        if let Some(i) = q.improvement {
            let _ = write!(h, "<p>{}: {:.1}%</p>", t.improvement, i * 100.0);
        }
        if let Some(p) = &q.plans {
            let _ = write!(
                h,
                "<p>{}</p><ul><li>{}: <code>{}</code></li><li>{}: <code>{}</code></li></ul>",
                esc(t.slower_plans),
                t.legacy,
                esc(&p.legacy),
                t.target,
                esc(&p.target)
            );
        }
        if q.trend.is_empty() {
            let _ = write!(h, "<p>{}: {}</p>", t.trend, t.no_samples);
        } else {
            let _ = write!(
                h,
                "<div class=\"charts\">{}{}</div>",
                chart(
                    t.match_rate_chart,
                    &q.trend,
                    &[(
                        "rate",
                        |p| p.match_rate.map(|r| r * 100.0),
                        "stroke=\"#0a6b2a\""
                    )],
                    Some(100.0)
                ),
                chart(
                    t.latency_chart,
                    &q.trend,
                    &[
                        ("legacy", |p| p.legacy_ms, "stroke=\"#1f4e9c\""),
                        (
                            "target",
                            |p| p.target_ms,
                            "stroke=\"#b35900\" stroke-dasharray=\"6 4\""
                        ),
                    ],
                    None
                )
            );
        }
        if !q.expected.is_empty() {
            table_head(
                &mut h,
                Some(t.expected),
                &["class", t.columns, t.note, t.source],
            );
            for e in &q.expected {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&e.class),
                    esc(&e.columns.join(", ")),
                    esc(&e.note),
                    esc(&e.source)
                );
            }
            h.push_str("</tbody></table>");
        }
        let _ = write!(h, "<h4>{}</h4>", t.examples);
        if q.examples.is_empty() {
            let _ = write!(h, "<p>{}</p>", t.no_examples);
        }
        for e in &q.examples {
            let _ = write!(
                h,
                "<article><p><strong>{}</strong>{} — {} — {}: <code>{}</code></p><pre>-- {}\n{}\n-- {}\n{}</pre>",
                esc(&e.kind),
                e.expected_class
                    .as_ref()
                    .map_or(String::new(), |c| format!(" ({})", esc(c))),
                esc(&e.found_at),
                t.params,
                esc(&e.params.to_string()),
                t.legacy,
                esc(&e.legacy_sql),
                t.target,
                esc(&e.target_sql)
            );
            for err in [&e.legacy_error, &e.target_error].into_iter().flatten() {
                let _ = write!(h, "<p>{}: <code>{}</code></p>", t.error, esc(err));
            }
            let rows = diff_rows(e, lang);
            if !rows.is_empty() {
                table_head(
                    &mut h,
                    Some(t.differing_rows),
                    &[t.key, t.column, t.legacy, t.target],
                );
                for (k, c, l, tv, differs) in rows {
                    let (l, tv) = if differs {
                        (
                            format!("<mark>{}</mark>", esc(&l)),
                            format!("<mark>{}</mark>", esc(&tv)),
                        )
                    } else {
                        (esc(&l), esc(&tv))
                    };
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td>{l}</td><td>{tv}</td></tr>",
                        esc(&k),
                        esc(&c)
                    );
                }
                h.push_str("</tbody></table>");
            }
            h.push_str("</article>");
        }
        h.push_str("</section>");
    }
    if !r.behaviour_changes.is_empty() {
        let _ = write!(
            h,
            "<h2>{}</h2><p>{}</p>",
            t.behaviour_changes, t.behaviour_intro
        );
        table_head(
            &mut h,
            None,
            &[
                t.behaviour_change,
                t.kind,
                t.seen,
                t.accepted,
                t.query_types,
                t.note,
            ],
        );
        for c in &r.behaviour_changes {
            h.push_str("<tr>");
            for v in behaviour_row(c, lang) {
                let _ = write!(h, "<td>{}</td>", esc(&v));
            }
            h.push_str("</tr>");
        }
        h.push_str("</tbody></table>");
    }
    let _ = write!(h, "<h2>{}</h2>", t.audit);
    table_head(&mut h, None, &[t.when, t.query_type, t.change, t.by, t.why]);
    for a in &r.audit {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{} → {}{}</td><td>{} ({})</td><td>{}</td></tr>",
            esc(&a.changed_at),
            esc(&a.query_type),
            esc(a.from.as_deref().unwrap_or("–")),
            esc(&a.to),
            if a.forced {
                format!(" <strong>({})</strong>", t.forced)
            } else {
                String::new()
            },
            esc(&a.changed_by),
            esc(&a.via),
            esc(&a.reason)
        );
    }
    h.push_str("</tbody></table></main></body></html>\n");
    h
}
