//! What a divergence sample may show. The data holds names, e-mails, phone numbers and
//! documents; a sample keeps what a reviewer needs to reproduce a divergence and nothing
//! that identifies a person. One policy for both protocols, the rules' `[redaction]`
//! ([`Redaction`]: built-in sensitive name parts, more from the rules, columns shown):
//!
//! - statements are stored with every literal a `?` (their `$n` parameters kept), whether
//!   the values came inline (simple protocol) or inside a prepared statement's text;
//! - a parameter's value is shown only when the statement compares it with a column that is
//!   not sensitive; a parameter used anywhere else is redacted;
//! - in the differing rows, the values of sensitive columns are redacted;
//! - error messages keep their SQLSTATE and text with quoted values redacted.

use std::collections::BTreeMap;

use serde_json::{Value as Json, json};

use super::Param;
use crate::{
    routing::rules::redaction::Redaction,
    shadow::compare::{Diff, Value},
};

const REDACTED: &str = "[redacted]";
/// Longest text value shown.
const MAX_TEXT: usize = 200;

/// The SQL as a sample stores it: literals out, parameters in.
pub fn sql(sql: &str) -> String {
    crate::routing::fingerprint::literals_hidden(sql).unwrap_or_else(|_| {
        "[not stored: the statement could not be parsed to take its values out]".to_owned()
    })
}

/// The parameters as a sample stores them.
pub fn params(params: &[Param], bound: &BTreeMap<usize, String>, policy: &Redaction) -> Json {
    Json::Array(
        params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let column = bound.get(&(i + 1));
                let value = match (column, &p.value) {
                    (_, None) => Json::Null,
                    (Some(c), Some(_)) if !policy.sensitive(c) => Json::String(shown(p)),
                    _ => Json::String(REDACTED.into()),
                };
                json!({ "n": i + 1, "column": column, "value": value })
            })
            .collect(),
    )
}

fn shown(p: &Param) -> String {
    let Some(v) = &p.value else {
        return String::new();
    };
    if p.binary {
        // Binary text is its UTF-8 bytes; binary integers are rarely all printable.
        if let Ok(text) = std::str::from_utf8(v)
            && !text.is_empty()
            && text.chars().all(|c| !c.is_control())
        {
            return truncate(text);
        }
        return match integer(p) {
            Some(n) => n.to_string(),
            None => format!("[{} bytes, binary]", v.len()),
        };
    }
    truncate(&String::from_utf8_lossy(v))
}

/// A parameter's value as an integer, in text or binary (2, 4 or 8 bytes).
pub fn integer(p: &Param) -> Option<i64> {
    let v = p.value.as_ref()?;
    if p.binary && ![2, 4, 8].contains(&v.len()) {
        return None;
    }
    let text = crate::routing::route::key_text(p.binary, v);
    std::str::from_utf8(&text).ok()?.trim().parse().ok()
}

fn truncate(text: &str) -> String {
    match text.char_indices().nth(MAX_TEXT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// An error as a sample stores it: SQLSTATE, then the message with quoted parts redacted
/// (PostgreSQL quotes the offending value: `invalid input syntax for type bigint: "…"`).
pub fn error(code: &str, message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for ch in message.chars() {
        if ch == '"' {
            if !quoted {
                out.push_str("\"[redacted]");
            }
            quoted = !quoted;
        }
        if !quoted {
            out.push(ch);
        }
    }
    format!("{code}: {out}")
}

/// The differing rows, by column name, sensitive values redacted.
pub fn diff(diff: &Diff, columns: &[String], ignored: &[String], policy: &Redaction) -> Json {
    let kept: Vec<&String> = columns.iter().filter(|c| !ignored.contains(c)).collect();
    let row = |values: &[Value]| -> Json {
        Json::Object(
            kept.iter()
                .zip(values)
                .map(|(c, v)| {
                    let v = if policy.sensitive(c) && *v != Value::Null {
                        Json::String(REDACTED.into())
                    } else {
                        value(v)
                    };
                    ((*c).clone(), v)
                })
                .collect(),
        )
    };
    json!({
        "shape": diff.shape,
        "legacy_rows": diff.legacy_rows,
        "target_rows": diff.target_rows,
        "order_differs": diff.order_differs,
        "changed": diff.changed.iter().map(|c| json!({
            "key": value(&c.key),
            "columns": c.columns,
            "legacy": row(&c.legacy),
            "target": row(&c.target),
        })).collect::<Vec<_>>(),
        "only_legacy": diff.only_legacy.iter().map(|r| row(r)).collect::<Vec<_>>(),
        "only_target": diff.only_target.iter().map(|r| row(r)).collect::<Vec<_>>(),
    })
}

/// A canonical value as JSON (numbers as text, to keep their precision).
fn value(v: &Value) -> Json {
    let epoch = chrono::NaiveDate::from_ymd_opt(2000, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0));
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Number(d) => Json::String(d.to_string()),
        Value::Float(_) => v.as_f64().map_or(Json::Null, |f| json!(f)),
        Value::Text(t) => Json::String(truncate(t)),
        Value::Timestamp(us) => epoch
            .and_then(|e| e.checked_add_signed(chrono::TimeDelta::microseconds(*us)))
            .map_or(Json::Null, |t| Json::String(t.to_string())),
        Value::Date(days) => epoch
            .and_then(|e| e.checked_add_signed(chrono::TimeDelta::days((*days).into())))
            .map_or(Json::Null, |t| Json::String(t.date().to_string())),
        Value::Json(text) => serde_json::from_str(text).unwrap_or(Json::Null),
        Value::Bytes(b) | Value::Raw(b) => Json::String(format!("\\x{}", hex::encode(b))),
        Value::Array(_, items) => Json::Array(items.iter().map(value).collect()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn text(v: &str) -> Param {
        Param {
            binary: false,
            value: Some(Bytes::copy_from_slice(v.as_bytes())),
        }
    }

    #[test]
    fn only_parameters_of_plain_columns_are_shown() {
        let bound: BTreeMap<usize, String> = [(1, "affiliate_id".into()), (2, "email".into())]
            .into_iter()
            .collect();
        let shown = params(
            &[
                text("42"),
                text("ana@example.com"),
                text("12345678901"),
                Param {
                    binary: true,
                    value: Some(Bytes::copy_from_slice(&7i64.to_be_bytes())),
                },
            ],
            &bound,
            &Redaction::default(),
        );
        let values: Vec<&Json> = shown
            .as_array()
            .unwrap()
            .iter()
            .map(|p| &p["value"])
            .collect();
        assert_eq!(values[0], "42");
        assert_eq!(values[1], REDACTED);
        // Bound to no column: a document number passed to a function, say.
        assert_eq!(values[2], REDACTED);
        assert_eq!(values[3], REDACTED);
        assert!(!shown.to_string().contains("ana@"));
    }

    #[test]
    fn inline_values_errors_and_rows_are_redacted() {
        let s = sql("SELECT * FROM affiliates WHERE email = 'ana@example.com'");
        assert!(!s.contains("ana@"), "{s}");
        // A prepared statement's own literals go too; its parameters stay.
        let s = sql("SELECT * FROM affiliates WHERE name = 'Ana Souza' AND affiliate_id = $1");
        assert_eq!(
            s,
            "SELECT * FROM affiliates WHERE name = ? AND affiliate_id = $1"
        );
        assert_eq!(
            error(
                "22P02",
                "invalid input syntax for type bigint: \"ana@example.com\""
            ),
            "22P02: invalid input syntax for type bigint: \"[redacted]\""
        );
        let d = Diff {
            only_legacy: vec![vec![
                Value::Number(1.into()),
                Value::Text("ana@example.com".into()),
                Value::Text("Ana Souza".into()),
            ]],
            ..Diff::default()
        };
        let columns = ["affiliate_id".into(), "email".into(), "name".into()];
        let j = diff(&d, &columns, &[], &Redaction::default());
        assert!(
            !j.to_string().contains("ana@") && !j.to_string().contains("Souza"),
            "{j}"
        );
        assert_eq!(j["only_legacy"][0]["affiliate_id"], "1");
        // The rules may show a column.
        let j = diff(&d, &columns, &[], &Redaction::new(&[], &["name".into()]));
        assert_eq!(j["only_legacy"][0]["name"], "Ana Souza");
    }
}
