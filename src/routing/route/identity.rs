//! Legacy's identities on the target's errors: a statement served by the target that fails
//! must fail as legacy would have said it — schema, table, constraint and column fields, and
//! the message text that names them (applications map constraint names to user-facing
//! errors). The map is read from the catalogs when the proxy's own connection first comes
//! up: each unique index of the target (primary key included) is paired with legacy's unique
//! index on the same columns, and each target column with its legacy name (the rules'
//! column map).
//!
//! Never touches an error that does not name the target table.

use std::collections::HashMap;

use bytes::Bytes;

use crate::{routing::rules::TableMap, wire::messages};

/// How the target's names read on legacy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identities {
    target_schema: String,
    target_table: String,
    legacy_schema: String,
    legacy_table: String,
    /// Target constraint or index name → legacy's.
    constraints: HashMap<String, String>,
    /// Target column → legacy column (only those that differ).
    columns: HashMap<String, String>,
    /// Both tables' columns in their order, for a "Failing row contains (…)" DETAIL: the
    /// target's as legacy names (`None`: no legacy column, or a derived one whose legacy
    /// value is carried in another column), and legacy's.
    target_row: Vec<Option<String>>,
    legacy_row: Vec<String>,
}

/// A table's columns in order (what a "Failing row contains" DETAIL lists).
const COLUMNS: &str = "
    SELECT attname::text FROM pg_attribute
    WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum";

/// Unique indexes of a table with their columns (sorted, as legacy names).
const UNIQUE_INDEXES: &str = "
    SELECT c.relname::text,
           ARRAY(SELECT a.attname::text FROM unnest(i.indkey) k
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k
                 ORDER BY 1)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL";

impl Identities {
    /// Reads the map for `table` from the catalogs.
    pub async fn load(
        client: &tokio_postgres::Client,
        table: &TableMap,
    ) -> Result<Self, tokio_postgres::Error> {
        let columns: HashMap<String, String> = table
            .columns
            .iter()
            .flat_map(|c| {
                std::iter::once((c.target.clone(), c.legacy.clone())).chain(
                    c.legacy_copy
                        .as_ref()
                        .map(|copy| (copy.clone(), c.legacy.clone())),
                )
            })
            .filter(|(t, l)| t != l)
            .collect();
        let as_legacy = |cols: Vec<String>| {
            let mut cols: Vec<String> = cols
                .into_iter()
                .map(|c| columns.get(&c).cloned().unwrap_or(c))
                .collect();
            cols.sort();
            cols
        };
        let legacy: Vec<(String, Vec<String>)> = client
            .query(UNIQUE_INDEXES, &[&table.legacy.quoted()])
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut constraints = HashMap::new();
        for row in client
            .query(UNIQUE_INDEXES, &[&table.target.quoted()])
            .await?
        {
            let (name, cols): (String, Vec<String>) = (row.get(0), row.get(1));
            let cols = as_legacy(cols);
            if let Some((legacy_name, _)) = legacy.iter().find(|(_, l)| *l == cols) {
                constraints.insert(name, legacy_name.clone());
            }
        }
        let names = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
            rows.iter().map(|r| r.get(0)).collect()
        };
        let legacy_row = names(client.query(COLUMNS, &[&table.legacy.quoted()]).await?);
        // A derived column's legacy value is its carried copy, when it has one.
        let derived_with_copy: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| c.legacy_copy.is_some())
            .map(|c| c.target.as_str())
            .collect();
        let target_row = names(client.query(COLUMNS, &[&table.target.quoted()]).await?)
            .into_iter()
            .map(|t| {
                if derived_with_copy.contains(&t.as_str()) {
                    return None;
                }
                let legacy = columns.get(&t).cloned().unwrap_or(t);
                legacy_row.contains(&legacy).then_some(legacy)
            })
            .collect();
        Ok(Self {
            target_row,
            legacy_row,
            target_schema: table.target.schema.clone(),
            target_table: table.target.name.clone(),
            legacy_schema: table.legacy.schema.clone(),
            legacy_table: table.legacy.name.clone(),
            constraints,
            columns,
        })
    }

    /// An ErrorResponse body that names the target table, as legacy would have sent it;
    /// `None` when it does not name it (forwarded as it is).
    pub fn error_as_legacy(&self, body: &[u8]) -> Option<Bytes> {
        let names = |kind: u8, name: &str| {
            messages::error_field_list(body).any(|(k, v)| k == kind && v == name.as_bytes())
        };
        if !names(b't', &self.target_table) || !names(b's', &self.target_schema) {
            return None;
        }
        let fields: Vec<(u8, String)> = messages::error_field_list(body)
            .map(|(kind, value)| {
                let value = String::from_utf8_lossy(value).into_owned();
                let value = match kind {
                    b's' => self.legacy_schema.clone(),
                    b't' => self.legacy_table.clone(),
                    b'n' => self.constraints.get(&value).cloned().unwrap_or(value),
                    b'c' => self.columns.get(&value).cloned().unwrap_or(value),
                    b'D' => self
                        .failing_row(&value)
                        .unwrap_or_else(|| self.text(&value)),
                    b'M' => self.text(&value),
                    _ => value,
                };
                (kind, value)
            })
            .collect();
        Some(messages::error_frame(
            fields.iter().map(|(kind, value)| (*kind, value.as_bytes())),
        ))
    }

    /// A "Failing row contains (…)" DETAIL (NOT NULL and CHECK violations) listing the
    /// target's row, as legacy's row: its columns, in its order. The values are split at
    /// ", "; when that does not give one value per target column (a value holds ", "), or a
    /// legacy column has no value, `None` (the DETAIL is left as it is).
    fn failing_row(&self, detail: &str) -> Option<String> {
        let inner = detail
            .strip_prefix("Failing row contains (")?
            .strip_suffix(").")?;
        let values: Vec<&str> = inner.split(", ").collect();
        if values.len() != self.target_row.len() || self.legacy_row.is_empty() {
            return None;
        }
        let by_legacy: HashMap<&str, &str> = self
            .target_row
            .iter()
            .zip(&values)
            .filter_map(|(name, value)| Some((name.as_deref()?, *value)))
            .collect();
        let legacy: Option<Vec<&str>> = self
            .legacy_row
            .iter()
            .map(|c| by_legacy.get(c.as_str()).copied())
            .collect();
        Some(format!("Failing row contains ({}).", legacy?.join(", ")))
    }

    /// A message naming the target's objects in quotes, with legacy's names.
    fn text(&self, text: &str) -> String {
        let mut text = text.replace(
            &format!("relation \"{}\"", self.target_table),
            &format!("relation \"{}\"", self.legacy_table),
        );
        text = text.replace(
            &format!("\"{}\".\"{}\"", self.target_schema, self.target_table),
            &format!("\"{}\".\"{}\"", self.legacy_schema, self.legacy_table),
        );
        for (target, legacy) in &self.constraints {
            text = text.replace(&format!("\"{target}\""), &format!("\"{legacy}\""));
        }
        for (target, legacy) in &self.columns {
            text = text.replace(
                &format!("column \"{target}\""),
                &format!("column \"{legacy}\""),
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in fields {
            b.push(*k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    fn identities() -> Identities {
        Identities {
            target_schema: "fature_v2".into(),
            target_table: "affiliates_optimized".into(),
            legacy_schema: "public".into(),
            legacy_table: "affiliates".into(),
            constraints: [(
                "affiliates_optimized_external_id_key".to_owned(),
                "affiliates_external_id_key".to_owned(),
            )]
            .into(),
            columns: [
                (
                    "direct_referrals_count".to_owned(),
                    "level_1_referrals".to_owned(),
                ),
                (
                    "legacy_level_1_referrals".to_owned(),
                    "level_1_referrals".to_owned(),
                ),
            ]
            .into(),
            // v2: id, name, derived count, path, carried count; legacy: id, count, name.
            target_row: vec![
                Some("affiliate_id".into()),
                Some("name".into()),
                None,
                None,
                Some("level_1_referrals".into()),
            ],
            legacy_row: vec![
                "affiliate_id".into(),
                "level_1_referrals".into(),
                "name".into(),
            ],
        }
    }

    #[test]
    fn a_failing_row_on_the_target_reads_as_legacy_s_row() {
        let ids = identities();
        assert_eq!(
            ids.failing_row("Failing row contains (7, null, 3, 1.7, 2).")
                .as_deref(),
            Some("Failing row contains (7, 2, null).")
        );
        // A value with ", " in it: left as it is.
        assert_eq!(
            ids.failing_row("Failing row contains (7, a, b, 3, 1.7, 2)."),
            None
        );
        assert_eq!(ids.failing_row("Key (x)=(1) already exists."), None);
    }

    #[test]
    fn a_unique_violation_on_the_target_reads_as_legacy_s() {
        let v2 = body(&[
            (b'S', "ERROR"),
            (b'C', "23505"),
            (
                b'M',
                "duplicate key value violates unique constraint \"affiliates_optimized_external_id_key\"",
            ),
            (b'D', "Key (external_id)=(x) already exists."),
            (b's', "fature_v2"),
            (b't', "affiliates_optimized"),
            (b'n', "affiliates_optimized_external_id_key"),
        ]);
        let frame = identities().error_as_legacy(&v2).unwrap();
        let expected = body(&[
            (b'S', "ERROR"),
            (b'C', "23505"),
            (
                b'M',
                "duplicate key value violates unique constraint \"affiliates_external_id_key\"",
            ),
            (b'D', "Key (external_id)=(x) already exists."),
            (b's', "public"),
            (b't', "affiliates"),
            (b'n', "affiliates_external_id_key"),
        ]);
        assert_eq!(&frame[5..], &expected[..]);
    }

    #[test]
    fn errors_that_do_not_name_the_target_are_left_alone() {
        let other = body(&[(b'C', "23505"), (b's', "public"), (b't', "affiliates")]);
        assert_eq!(identities().error_as_legacy(&other), None);
        assert_eq!(identities().error_as_legacy(b"Cx"), None);
    }
}
