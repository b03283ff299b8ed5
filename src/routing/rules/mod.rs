//! Rules: the reviewed baseline of a migration, read from the TOML files of `rules/`.
//!
//! A rule set names the legacy table and its target, maps every legacy column (a column
//! mapped to a differently named target column, or marked *derived* — readable on the target,
//! never written by the application), and names query types: how statements are matched to
//! them (an example statement's fingerprint, or a regular expression over fingerprints), an
//! optional hand-written target SQL taking the same parameters, the stage and percentage,
//! the bucket key, and comparison options. The format is documented in `docs/rules.md`.
//!
//! Loading never stops at the first problem: every diagnostic is collected and reported as
//! `file:line:column: message`. A rule set with any diagnostic is refused whole.

pub mod changes;
pub mod redaction;

use std::{collections::HashMap, fmt, path::PathBuf};

use regex::Regex;
use rust_decimal::Decimal;

use crate::routing::fingerprint::Fingerprint;

/// One problem in a rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every diagnostic of a rule set that was refused.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in the rules:\n{}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct RulesError(pub Vec<Diagnostic>);

/// A percentage, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(u8);

impl Percent {
    pub fn new(value: i64) -> Option<Self> {
        u8::try_from(value).ok().filter(|v| *v <= 100).map(Self)
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

/// Where a query type stands in the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Legacy only.
    Legacy,
    /// Legacy serves; the target is compared.
    Shadow,
    /// This share of buckets is served by the target; both are compared.
    Cutover(Percent),
    /// The target serves; legacy is compared (and still written).
    Target,
    /// Target only.
    Complete,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Legacy => f.write_str("legacy"),
            Stage::Shadow => f.write_str("shadow"),
            Stage::Cutover(p) => write!(f, "cutover {}%", p.get()),
            Stage::Target => f.write_str("target"),
            Stage::Complete => f.write_str("complete"),
        }
    }
}

/// The stage name and percent stored for a stage.
pub fn stage_columns(stage: Stage) -> (&'static str, i16) {
    match stage {
        Stage::Legacy => ("legacy", 0),
        Stage::Shadow => ("shadow", 0),
        Stage::Cutover(p) => ("cutover", i16::from(p.get())),
        Stage::Target => ("target", 100),
        Stage::Complete => ("complete", 100),
    }
}

/// A stored stage as people read it (`cutover 10%`, `target`); the stored text when it does
/// not make a stage.
pub fn stage_label(stage: &str, percent: i16) -> String {
    let percent = (stage == "cutover").then_some(i64::from(percent));
    stage_of(stage, percent).map_or_else(|_| stage.to_owned(), |s| s.to_string())
}

/// The stage of stored columns (or a request's), if they make one.
pub fn stage_of(name: &str, percent: Option<i64>) -> Result<Stage, String> {
    match (name, percent) {
        ("legacy", None | Some(0)) => Ok(Stage::Legacy),
        ("shadow", None | Some(0)) => Ok(Stage::Shadow),
        ("cutover", Some(p)) => Percent::new(p)
            .map(Stage::Cutover)
            .ok_or_else(|| format!("percent {p} is not between 0 and 100")),
        ("cutover", None) => Err("stage cutover needs a percent (0 to 100)".into()),
        ("target", None | Some(100)) => Ok(Stage::Target),
        ("complete", None | Some(100)) => Ok(Stage::Complete),
        ("legacy" | "shadow" | "target" | "complete", Some(p)) => {
            Err(format!("a percent ({p}) goes only with stage cutover"))
        }
        (other, _) => Err(format!(
            "unknown stage {other:?}: legacy, shadow, cutover, target or complete"
        )),
    }
}

/// What decides a statement's bucket, so that the same key always goes to the same side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bucket {
    /// The session: all of a connection's statements go one way.
    Session,
    /// The value of parameter `$n` (1-based).
    Param(usize),
    /// The value compared with this legacy column in the statement (literal or parameter).
    Column(String),
}

/// A `schema.name` pair, lower-cased as PostgreSQL folds unquoted names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// `"schema"."name"`, ready for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// An identifier quoted for SQL (`"name"`, inner quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A legacy column and what it is on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    pub legacy: String,
    pub target: String,
    /// Maintained by the target itself: read from it, never written by the application.
    pub derived: bool,
    /// For a derived column: the target column carrying legacy's own value, which the
    /// application's writes served by the target read and write instead (so that the way
    /// back to legacy gives legacy's counter exactly).
    pub legacy_copy: Option<String>,
}

/// The legacy table and its target.
#[derive(Debug, Clone)]
pub struct TableMap {
    pub legacy: TableName,
    pub target: TableName,
    pub key: String,
    /// SQL for the key's value when an INSERT leaves it to legacy's default (its sequence,
    /// e.g. `nextval('public.affiliates_affiliate_id_seq')`): the target uses the same
    /// sequence, so ids never collide, whichever side is written first.
    pub key_default: Option<String>,
    /// Every legacy column, in table order.
    pub columns: Vec<ColumnMap>,
    /// Where `[table]` is written.
    pub location: Location,
}

impl ColumnMap {
    /// `l.<legacy> IS DISTINCT FROM t.<target>`: the column differs between a legacy row
    /// aliased `l` and a target row aliased `t`.
    pub fn differs_sql(&self) -> String {
        format!(
            "l.{} IS DISTINCT FROM t.{}",
            quote_ident(&self.legacy),
            quote_ident(&self.target)
        )
    }
}

/// Whether any of `columns` differs between rows aliased `l` and `t` (SQL).
pub fn any_differs_sql<'a>(columns: impl IntoIterator<Item = &'a ColumnMap>) -> String {
    columns
        .into_iter()
        .map(ColumnMap::differs_sql)
        .collect::<Vec<_>>()
        .join(" OR ")
}

impl TableMap {
    pub fn column(&self, legacy: &str) -> Option<&ColumnMap> {
        self.columns.iter().find(|c| c.legacy == legacy)
    }

    /// The columns the target stores as they are (every one but the derived ones).
    pub fn stored_columns(&self) -> impl Iterator<Item = &ColumnMap> {
        self.columns.iter().filter(|c| !c.derived)
    }

    /// The stored columns as SQL lists: the target's names, and legacy's qualified by
    /// `alias` — for `INSERT INTO target (…) SELECT … FROM legacy alias`.
    pub fn stored_column_lists(&self, alias: &str) -> (String, String) {
        let target = self
            .stored_columns()
            .map(|c| quote_ident(&c.target))
            .collect::<Vec<_>>();
        let legacy = self
            .stored_columns()
            .map(|c| format!("{alias}.{}", quote_ident(&c.legacy)))
            .collect::<Vec<_>>();
        (target.join(", "), legacy.join(", "))
    }
}

/// A divergence class reviewers expect, counted apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub class: String,
    /// The kind of confirmed divergence it covers (`drift`, `rewrite_bug`, `undetermined`):
    /// a class of drift never hides a rewrite bug in the same columns.
    pub kind: String,
    pub columns: Vec<String>,
    pub note: String,
}

/// How a query type's two answers are compared.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompareOptions {
    /// Compare rows in order (`Some(true)`), as a multiset (`Some(false)`), or decide from
    /// the statement's ORDER BY (`None`).
    pub ordered: Option<bool>,
    pub numeric_tolerance: Decimal,
    /// Largest absolute difference between floating-point values still counted equal.
    pub float_tolerance: f64,
    pub ignore_columns: Vec<String>,
    pub expected: Vec<Expected>,
}

/// How statements are matched to a query type.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// The fingerprint of an example statement.
    Fingerprint(Fingerprint),
    /// A regular expression over fingerprint texts.
    Pattern(Regex),
}

/// Where something was written in a rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// A diagnostic at this place.
    pub fn diagnostic(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

/// A named query type.
#[derive(Debug, Clone)]
pub struct QueryType {
    pub name: String,
    /// Where the query type's name, example statement and target SQL are written.
    pub location: Location,
    pub match_location: Option<Location>,
    pub target_location: Option<Location>,
    /// The example statement of `match`, as written.
    pub example_sql: Option<String>,
    pub matcher: Matcher,
    /// Hand-written target SQL taking the same parameters as the legacy statement.
    pub target_sql: Option<String>,
    pub stage: Stage,
    pub bucket: Bucket,
    /// Share of executions compared on the other side (0.0 to 1.0).
    pub sample_rate: f64,
    /// A failure on the target side of a write fails the statement instead of being recorded.
    pub strict: bool,
    pub compare: CompareOptions,
}

/// Defaults for query types that do not say, and for automatic ones.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub stage: Stage,
    pub bucket: Bucket,
    pub sample_rate: f64,
}

/// The kinds of confirmed divergence a rule's `compare.expected` may name.
pub const EXPECTED_KINDS: &[&str] = &["drift", "rewrite_bug", "undetermined"];

/// A validated rule set.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub table: TableMap,
    pub defaults: Defaults,
    pub query_types: Vec<QueryType>,
    /// Differences v2 makes on purpose, declared for reviewers to accept.
    pub behaviour_changes: Vec<changes::BehaviourChange>,
    /// What divergence samples may show.
    pub redaction: redaction::Redaction,
    /// Expected classes for every query type, automatic ones included (`[[expected]]`).
    pub expected: Vec<Expected>,
    /// 12 hex digits of the SHA-256 of the files' names and texts: which rules a divergence
    /// was found under.
    pub version: String,
    pub(crate) by_fingerprint: HashMap<String, usize>,
}

impl RuleSet {
    /// The query type a fingerprint belongs to, if a rule names it.
    /// Whether the named query type `name` writes (its example statement is not a single
    /// query); `None` when no rule names it or it has no example.
    pub fn writes(&self, name: &str) -> Option<bool> {
        let example = self.named(name)?.example_sql.as_deref()?;
        let statements = crate::routing::fingerprint::parse(example).ok()?;
        Some(!matches!(
            statements.as_slice(),
            [sqlparser::ast::Statement::Query(_)]
        ))
    }

    /// The declared behaviour changes the application may see through query type `name`.
    pub fn changes_of<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a changes::BehaviourChange> + 'a {
        self.behaviour_changes
            .iter()
            .filter(move |c| c.query_types.iter().any(|q| q == name))
    }

    /// The classes reviewers expect of a query type's divergences: its rule's, then the rule
    /// set's own (`[[expected]]`), which hold for automatic types too.
    pub fn expected_of(&self, query_type: &str) -> Vec<Expected> {
        let mut out = self
            .named(query_type)
            .map(|q| q.compare.expected.clone())
            .unwrap_or_default();
        out.extend(self.expected.iter().cloned());
        out
    }

    /// The named query type called `name`.
    pub fn named(&self, name: &str) -> Option<&QueryType> {
        self.query_types.iter().find(|q| q.name == name)
    }

    pub fn query_type_for(&self, fp: &Fingerprint) -> Option<&QueryType> {
        if let Some(&i) = self.by_fingerprint.get(&fp.text) {
            return Some(&self.query_types[i]);
        }
        self.query_types.iter().find(|qt| match &qt.matcher {
            Matcher::Pattern(re) => re.is_match(&fp.text),
            Matcher::Fingerprint(_) => false,
        })
    }
}
