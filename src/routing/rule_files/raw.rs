//! Rule files as written: serde structs with the spans of their values, so that every
//! diagnostic can point at `file:line:column`. Unknown keys are refused by the parser.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub table: Option<Spanned<RawTable>>,
    #[serde(default)]
    pub columns: std::collections::BTreeMap<Spanned<String>, RawColumn>,
    pub defaults: Option<RawDefaults>,
    #[serde(default)]
    pub query_type: Vec<Spanned<RawQueryType>>,
    #[serde(default)]
    pub behaviour_change: Vec<Spanned<RawBehaviourChange>>,
    pub redaction: Option<RawRedaction>,
    /// Expected classes for every query type (automatic ones too).
    #[serde(default)]
    pub expected: Vec<RawExpected>,
}

/// `[redaction]`: what divergence samples may show (rules/redaction.rs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedaction {
    #[serde(default)]
    pub sensitive: Vec<Spanned<String>>,
    #[serde(default)]
    pub shown: Vec<Spanned<String>>,
}

/// A `[[behaviour_change]]`: a difference v2 makes on purpose (rules/changes.rs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBehaviourChange {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    pub query_types: Spanned<Vec<Spanned<String>>>,
    pub description: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTable {
    pub legacy: Spanned<String>,
    pub target: Spanned<String>,
    pub key: Spanned<String>,
    /// The legacy table's columns, in table order.
    pub columns: Spanned<Vec<Spanned<String>>>,
    /// The key's default on legacy (its sequence), for writes served by the target.
    pub key_default: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawColumn {
    pub target: Spanned<String>,
    #[serde(default)]
    pub derived: bool,
    /// For a derived column: the target column that carries legacy's own value (written by
    /// the application's statements served from the target, copied back to legacy).
    pub legacy_copy: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub stage: Option<Spanned<String>>,
    pub percent: Option<Spanned<i64>>,
    pub bucket: Option<Spanned<String>>,
    pub sample_rate: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueryType {
    pub name: Spanned<String>,
    #[serde(rename = "match")]
    pub match_sql: Option<Spanned<String>>,
    pub pattern: Option<Spanned<String>>,
    pub target: Option<Spanned<String>>,
    pub stage: Option<Spanned<String>>,
    pub percent: Option<Spanned<i64>>,
    pub bucket: Option<Spanned<String>>,
    pub sample_rate: Option<Spanned<f64>>,
    #[serde(default)]
    pub strict: bool,
    pub compare: Option<RawCompare>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompare {
    pub ordered: Option<bool>,
    pub numeric_tolerance: Option<Spanned<String>>,
    pub float_tolerance: Option<Spanned<f64>>,
    #[serde(default)]
    pub ignore_columns: Vec<Spanned<String>>,
    #[serde(default)]
    pub expected: Vec<RawExpected>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpected {
    pub class: Spanned<String>,
    /// The kind of divergence expected: `drift` (default), `rewrite_bug` or `undetermined`.
    pub kind: Option<Spanned<String>>,
    #[serde(default)]
    pub columns: Vec<Spanned<String>>,
    pub note: Spanned<String>,
}
