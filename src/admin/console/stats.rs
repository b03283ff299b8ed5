//! `SHOW STATS`: the process's own metrics (what `/metrics` exports), per query type. Read
//! from the recorder's rendered text, so the console and Prometheus never disagree.

use std::collections::BTreeMap;

/// One query type's line.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TypeStats {
    pub served_legacy: u64,
    pub served_target: u64,
    /// `cutover_comparisons_total` by outcome label.
    pub comparisons: BTreeMap<String, u64>,
    /// Seconds, as the shadow measured each side: (p50, p99).
    pub legacy: Option<(f64, f64)>,
    pub target: Option<(f64, f64)>,
}

/// A series' labels: (key, unescaped value).
type Labels<'a> = Vec<(&'a str, String)>;

/// One sample line of Prometheus text: its name, its labels, its value.
fn sample(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, labels)) = series.split_once('{') else {
        return Some((series, Vec::new(), value));
    };
    let mut out = Vec::new();
    let mut rest = labels.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        out.push((key, value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name, out, value))
}

fn label<'a>(labels: &'a [(&str, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.as_str())
}

/// Per query type, from rendered Prometheus text.
pub fn per_query_type(text: &str) -> BTreeMap<String, TypeStats> {
    let mut out: BTreeMap<String, TypeStats> = BTreeMap::new();
    let mut quantiles: BTreeMap<(String, String), (Option<f64>, Option<f64>)> = BTreeMap::new();
    for line in text.lines() {
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        let Some(query_type) = label(&labels, "query_type") else {
            continue;
        };
        let count = if value.is_finite() && value > 0.0 {
            value as u64
        } else {
            0
        };
        match name {
            "cutover_queries_total" => {
                let entry = out.entry(query_type.to_owned()).or_default();
                match label(&labels, "served_by") {
                    Some("target") => entry.served_target += count,
                    _ => entry.served_legacy += count,
                }
            }
            "cutover_comparisons_total" => {
                if let Some(outcome) = label(&labels, "outcome") {
                    *out.entry(query_type.to_owned())
                        .or_default()
                        .comparisons
                        .entry(outcome.to_owned())
                        .or_default() += count;
                }
            }
            "cutover_shadow_duration_seconds" => {
                let (Some(side), Some(q)) = (label(&labels, "side"), label(&labels, "quantile"))
                else {
                    continue;
                };
                out.entry(query_type.to_owned()).or_default();
                let slot = quantiles
                    .entry((query_type.to_owned(), side.to_owned()))
                    .or_default();
                match q {
                    "0.5" => slot.0 = Some(value),
                    "0.99" => slot.1 = Some(value),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    for ((query_type, side), (p50, p99)) in quantiles {
        let (Some(p50), Some(p99)) = (p50, p99) else {
            continue;
        };
        if !(p50.is_finite() && p99.is_finite()) {
            continue;
        }
        if let Some(entry) = out.get_mut(&query_type) {
            match side.as_str() {
                "legacy" => entry.legacy = Some((p50, p99)),
                "target" => entry.target = Some((p50, p99)),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_is_read_per_query_type() {
        let text = r#"# TYPE cutover_queries_total counter
cutover_queries_total{query_type="top_referrers",served_by="legacy"} 12
cutover_queries_total{query_type="top_referrers",served_by="target"} 3
cutover_queries_total{query_type="passthrough",served_by="legacy"} 40
cutover_comparisons_total{query_type="top_referrers",outcome="match"} 9
cutover_comparisons_total{query_type="top_referrers",outcome="diverged"} 1
cutover_shadow_duration_seconds{query_type="top_referrers",side="legacy",quantile="0.5"} 0.002
cutover_shadow_duration_seconds{query_type="top_referrers",side="legacy",quantile="0.99"} 0.01
cutover_shadow_duration_seconds{query_type="top_referrers",side="target",quantile="0.5"} NaN
cutover_shadow_duration_seconds_sum{query_type="top_referrers",side="legacy"} 0.5
cutover_admin_auth_failures_total{surface="console"} 2
cutover_queries_total{query_type="a \"quoted\", name",served_by="legacy"} 1
"#;
        let stats = per_query_type(text);
        let t = &stats["top_referrers"];
        assert_eq!((t.served_legacy, t.served_target), (12, 3));
        assert_eq!(t.comparisons["match"], 9);
        assert_eq!(t.comparisons["diverged"], 1);
        assert_eq!(t.legacy, Some((0.002, 0.01)));
        assert_eq!(t.target, None);
        assert_eq!(stats["passthrough"].served_legacy, 40);
        assert!(stats.contains_key("a \"quoted\", name"));
        assert_eq!(stats.len(), 3);
    }
}
