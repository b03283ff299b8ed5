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
mod check;
pub mod promote;
mod raw;
pub mod redaction;

pub use check::check_against_database;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
};

use regex::Regex;
use rust_decimal::Decimal;
use toml::Spanned;

use crate::{
    classify::fingerprint::{self, Fingerprint},
    config::line_col,
};

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
    by_fingerprint: HashMap<String, usize>,
}

impl RuleSet {
    /// The query type a fingerprint belongs to, if a rule names it.
    /// Whether the named query type `name` writes (its example statement is not a single
    /// query); `None` when no rule names it or it has no example.
    pub fn writes(&self, name: &str) -> Option<bool> {
        let example = self.named(name)?.example_sql.as_deref()?;
        let statements = crate::classify::fingerprint::parse(example).ok()?;
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

    /// Loads every `*.toml` file of a directory (sorted by name).
    pub fn load_dir(dir: &Path) -> Result<Self, RulesError> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            RulesError(vec![Diagnostic {
                file: dir.to_owned(),
                line: 1,
                column: 1,
                message: format!("cannot read the rules directory: {e}"),
            }])
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut sources = Vec::new();
        let mut diagnostics = Vec::new();
        for path in files {
            match std::fs::read_to_string(&path) {
                Ok(text) => sources.push((path, text)),
                Err(e) => diagnostics.push(Diagnostic {
                    file: path,
                    line: 1,
                    column: 1,
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        if !diagnostics.is_empty() {
            return Err(RulesError(diagnostics));
        }
        Self::from_sources(&sources)
    }

    /// Validates rule files given as (path, text): the tests' entry point.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Self, RulesError> {
        Builder::default().build(sources)
    }
}

fn version_of(sources: &[(PathBuf, String)]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (path, text) in sources {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        hash.update(name.unwrap_or_default().as_bytes());
        hash.update([0]);
        hash.update(text.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..6])
}

/// Collects diagnostics while turning raw files into a rule set.
#[derive(Default)]
struct Builder {
    diagnostics: Vec<Diagnostic>,
}

impl Builder {
    fn at<T>(&mut self, file: &Path, text: &str, spanned: &Spanned<T>, message: impl Into<String>) {
        self.at_offset(file, text, spanned.span().start, message);
    }

    fn at_offset(&mut self, file: &Path, text: &str, offset: usize, message: impl Into<String>) {
        let (line, column) = line_col(text, offset);
        self.diagnostics.push(Diagnostic {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        });
    }

    fn location<T>(&self, file: &Path, text: &str, spanned: &Spanned<T>) -> Location {
        let (line, column) = line_col(text, spanned.span().start);
        Location {
            file: file.to_owned(),
            line,
            column,
        }
    }

    fn build(mut self, sources: &[(PathBuf, String)]) -> Result<RuleSet, RulesError> {
        let mut parsed = Vec::new();
        for (path, text) in sources {
            match toml::from_str::<raw::RawFile>(text) {
                Ok(file) => parsed.push((path.as_path(), text.as_str(), file)),
                Err(e) => {
                    let offset = e.span().map_or(0, |s| s.start);
                    self.at_offset(path, text, offset, e.message().to_owned());
                }
            }
        }

        // The table mapping: exactly one file has it.
        let mut table = None;
        for (path, text, file) in &parsed {
            if let Some(raw_table) = &file.table {
                if table.is_some() {
                    self.at(
                        path,
                        text,
                        raw_table,
                        "a second [table]: one rule set maps one table",
                    );
                } else {
                    let location = self.location(path, text, raw_table);
                    table = self.table(path, text, raw_table.get_ref(), &file.columns, location);
                }
            }
        }
        let unreadable = parsed.len() < sources.len();
        if !unreadable && table.is_none() && !parsed.iter().any(|(_, _, f)| f.table.is_some()) {
            let file = sources.first().map(|(p, _)| p.clone()).unwrap_or_default();
            self.diagnostics.push(Diagnostic {
                file,
                line: 1,
                column: 1,
                message: "no [table] in any rule file: name the legacy table, its target, its key and its columns".into(),
            });
        }

        let mut defaults = Defaults {
            stage: Stage::Legacy,
            bucket: Bucket::Session,
            sample_rate: 1.0,
        };
        for (path, text, file) in &parsed {
            if let Some(d) = &file.defaults {
                if let Some(stage) = self.stage(path, text, d.stage.as_ref(), d.percent.as_ref()) {
                    defaults.stage = stage;
                }
                if let (Some(b), Some(t)) = (&d.bucket, &table)
                    && let Some(bucket) = self.bucket(path, text, b, t)
                {
                    defaults.bucket = bucket;
                }
                if let Some(rate) = self.sample_rate(path, text, d.sample_rate.as_ref()) {
                    defaults.sample_rate = rate;
                }
            }
        }

        let mut query_types = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        let mut by_fingerprint: HashMap<String, usize> = HashMap::new();
        for (path, text, file) in &parsed {
            for raw_qt in &file.query_type {
                let Some(table) = &table else { continue };
                let Some(qt) = self.query_type(path, text, raw_qt, table, &defaults) else {
                    continue;
                };
                if !names.insert(qt.name.clone()) {
                    self.at(
                        path,
                        text,
                        &raw_qt.get_ref().name,
                        format!("duplicate query type name {:?}", qt.name),
                    );
                    continue;
                }
                if let Matcher::Fingerprint(fp) = &qt.matcher {
                    if let Some(&other) = by_fingerprint.get(&fp.text) {
                        let other: &QueryType = &query_types[other];
                        self.at(
                            path,
                            text,
                            raw_qt
                                .get_ref()
                                .match_sql
                                .as_ref()
                                .unwrap_or(&raw_qt.get_ref().name),
                            format!("matches the same statements as query type {:?}", other.name),
                        );
                        continue;
                    }
                    by_fingerprint.insert(fp.text.clone(), query_types.len());
                }
                query_types.push(qt);
            }
        }

        let mut behaviour_changes = Vec::new();
        for (path, text, file) in &parsed {
            self.behaviour_changes(
                path,
                text,
                &file.behaviour_change,
                &names,
                &mut behaviour_changes,
            );
        }

        if let Some(table) = &table {
            self.routability(table, &query_types);
        }
        let redaction = self.redaction(&parsed, table.as_ref());
        let mut expected = Vec::new();
        if let Some(table) = &table {
            for (path, text, file) in &parsed {
                let list = self.expected_list(path, text, &file.expected, table);
                expected.extend(list);
            }
        }
        match table {
            Some(table) if self.diagnostics.is_empty() => Ok(RuleSet {
                table,
                defaults,
                query_types,
                behaviour_changes,
                redaction,
                expected,
                version: version_of(sources),
                by_fingerprint,
            }),
            _ => Err(RulesError(self.diagnostics)),
        }
    }

    /// Expected classes (`[[query_type.compare.expected]]`, or the rule set's own
    /// `[[expected]]`, which holds for every query type, automatic ones too).
    fn expected_list(
        &mut self,
        path: &Path,
        text: &str,
        raws: &[raw::RawExpected],
        table: &TableMap,
    ) -> Vec<Expected> {
        let mut out = Vec::new();
        for e in raws {
            let columns = e
                .columns
                .iter()
                .filter_map(|col| self.legacy_column(path, text, col, table))
                .collect();
            if !is_identifier(e.class.get_ref()) {
                self.at(
                    path,
                    text,
                    &e.class,
                    "expected class: use lower-case letters, digits and _",
                );
            }
            if e.note.get_ref().trim().is_empty() {
                self.at(path, text, &e.note, "expected: say why in the note");
            }
            let kind = e.kind.as_ref().map_or("drift", |k| k.get_ref().as_str());
            if let Some(k) = &e.kind
                && !EXPECTED_KINDS.contains(&kind)
            {
                self.at(
                    path,
                    text,
                    k,
                    format!(
                        "expected kind {kind:?}: one of {} (errors are never expected by column)",
                        EXPECTED_KINDS.join(", ")
                    ),
                );
            }
            out.push(Expected {
                kind: kind.to_owned(),
                class: e.class.get_ref().clone(),
                columns,
                note: e.note.get_ref().clone(),
            });
        }
        out
    }

    /// Every file's `[redaction]`, together; a `shown` column must be one of the table's.
    fn redaction(
        &mut self,
        parsed: &[(&Path, &str, raw::RawFile)],
        table: Option<&TableMap>,
    ) -> redaction::Redaction {
        let (mut sensitive, mut shown) = (Vec::new(), Vec::new());
        for (path, text, file) in parsed {
            let Some(raw) = &file.redaction else { continue };
            for part in &raw.sensitive {
                if part.get_ref().trim().is_empty() {
                    self.at(
                        path,
                        text,
                        part,
                        "an empty name part would make every column sensitive",
                    );
                } else {
                    sensitive.push(part.get_ref().clone());
                }
            }
            for column in &raw.shown {
                let name = column.get_ref();
                let known = table.is_none_or(|t| {
                    t.columns.iter().any(|c| {
                        c.legacy.eq_ignore_ascii_case(name) || c.target.eq_ignore_ascii_case(name)
                    })
                });
                if known {
                    shown.push(name.clone());
                } else {
                    self.at(
                        path,
                        text,
                        column,
                        format!("column {name:?} is not in the table's columns"),
                    );
                }
            }
        }
        redaction::Redaction::new(&sensitive, &shown)
    }

    /// A query type past `legacy` must have somewhere to go on the target: its own target
    /// SQL, or a statement the rewriter can carry over. (Writes are mirrored row by row
    /// until `target`, so they need a route only from there on.)
    fn routability(&mut self, table: &TableMap, query_types: &[QueryType]) {
        let rewriter = crate::rewrite::Rewriter::new(table);
        for qt in query_types {
            let (None, Some(example)) = (&qt.target_sql, &qt.example_sql) else {
                continue;
            };
            let crate::rewrite::Rewrite::NotRoutable(reason) = rewriter.rewrite(example) else {
                continue;
            };
            let upper = example.trim_start().to_ascii_uppercase();
            let read = upper.starts_with("SELECT") || upper.starts_with("WITH");
            let needs_route = match qt.stage {
                Stage::Legacy => false,
                Stage::Shadow | Stage::Cutover(_) => read,
                Stage::Target | Stage::Complete => true,
            };
            if needs_route {
                let at = qt.match_location.as_ref().unwrap_or(&qt.location);
                self.diagnostics.push(at.diagnostic(format!(
                    "{}: stage {} needs a route to the target, but the statement is not routable ({reason}); give it a target",
                    qt.name, qt.stage
                )));
            }
        }
    }

    fn table(
        &mut self,
        path: &Path,
        text: &str,
        raw: &raw::RawTable,
        columns: &std::collections::BTreeMap<Spanned<String>, raw::RawColumn>,
        location: Location,
    ) -> Option<TableMap> {
        let legacy = self.table_name(path, text, &raw.legacy);
        let target = self.table_name(path, text, &raw.target);
        let mut seen = HashSet::new();
        let mut list = Vec::new();
        for c in raw.columns.get_ref() {
            let name = c.get_ref().to_ascii_lowercase();
            if !is_identifier(&name) {
                self.at(
                    path,
                    text,
                    c,
                    format!("{:?} is not a column name", c.get_ref()),
                );
            } else if !seen.insert(name.clone()) {
                self.at(path, text, c, format!("column {name:?} is listed twice"));
            } else {
                list.push(name);
            }
        }
        if list.is_empty() {
            self.at(
                path,
                text,
                &raw.columns,
                "columns: list the legacy table's columns, in table order",
            );
        }
        let key = raw.key.get_ref().to_ascii_lowercase();
        if !list.is_empty() && !list.contains(&key) {
            self.at(
                path,
                text,
                &raw.key,
                format!("key {key:?} is not one of the listed columns"),
            );
        }
        let mut maps: Vec<ColumnMap> = list
            .iter()
            .map(|c| ColumnMap {
                legacy: c.clone(),
                target: c.clone(),
                derived: false,
                legacy_copy: None,
            })
            .collect();
        for (name, mapping) in columns {
            let legacy_name = name.get_ref().to_ascii_lowercase();
            let Some(m) = maps.iter_mut().find(|m| m.legacy == legacy_name) else {
                let table = legacy
                    .as_ref()
                    .map_or("the legacy table".into(), ToString::to_string);
                self.at(
                    path,
                    text,
                    name,
                    format!("column {legacy_name:?} is not in {table}"),
                );
                continue;
            };
            let target_name = mapping.target.get_ref().to_ascii_lowercase();
            if !is_identifier(&target_name) {
                self.at(
                    path,
                    text,
                    &mapping.target,
                    format!("{:?} is not a column name", mapping.target.get_ref()),
                );
            }
            m.target = target_name;
            m.derived = mapping.derived;
            if let Some(copy) = &mapping.legacy_copy {
                let copy_name = copy.get_ref().to_ascii_lowercase();
                if !mapping.derived {
                    self.at(path, text, copy, "legacy_copy is only for a derived column");
                } else if !is_identifier(&copy_name) {
                    self.at(
                        path,
                        text,
                        copy,
                        format!("{:?} is not a column name", copy.get_ref()),
                    );
                } else {
                    m.legacy_copy = Some(copy_name);
                }
            }
        }
        if maps.iter().any(|m| m.legacy == key && m.derived) {
            self.at(path, text, &raw.key, "the key cannot be a derived column");
        }
        let key_default = raw.key_default.as_ref().and_then(|d| {
            match fingerprint::parse(&format!("SELECT {}", d.get_ref())) {
                Ok(_) => Some(d.get_ref().trim().to_owned()),
                Err(e) => {
                    self.at(
                        path,
                        text,
                        d,
                        format!("key_default is not an SQL expression: {e}"),
                    );
                    None
                }
            }
        });
        Some(TableMap {
            legacy: legacy?,
            target: target?,
            key,
            key_default,
            columns: maps,
            location,
        })
    }

    fn table_name(&mut self, path: &Path, text: &str, raw: &Spanned<String>) -> Option<TableName> {
        let parts: Vec<String> = raw
            .get_ref()
            .split('.')
            .map(|p| p.trim().to_ascii_lowercase())
            .collect();
        let (schema, name) = match parts.as_slice() {
            [name] => ("public".to_owned(), name.clone()),
            [schema, name] => (schema.clone(), name.clone()),
            _ => (String::new(), String::new()),
        };
        if is_identifier(&schema) && is_identifier(&name) {
            Some(TableName { schema, name })
        } else {
            self.at(
                path,
                text,
                raw,
                format!("{:?} is not a table name (schema.table)", raw.get_ref()),
            );
            None
        }
    }

    fn stage(
        &mut self,
        path: &Path,
        text: &str,
        stage: Option<&Spanned<String>>,
        percent: Option<&Spanned<i64>>,
    ) -> Option<Stage> {
        let percent_value = match percent {
            Some(p) => match Percent::new(*p.get_ref()) {
                Some(v) => Some(v),
                None => {
                    self.at(
                        path,
                        text,
                        p,
                        format!("percent {} is not between 0 and 100", p.get_ref()),
                    );
                    return None;
                }
            },
            None => None,
        };
        let stage_name = stage?;
        let parsed = match stage_name.get_ref().as_str() {
            "legacy" => Stage::Legacy,
            "shadow" => Stage::Shadow,
            "cutover" => match percent_value {
                Some(p) => Stage::Cutover(p),
                None => {
                    self.at(
                        path,
                        text,
                        stage_name,
                        "stage \"cutover\" needs a percent (0 to 100)",
                    );
                    return None;
                }
            },
            "target" => Stage::Target,
            "complete" => Stage::Complete,
            other => {
                self.at(
                    path,
                    text,
                    stage_name,
                    format!("unknown stage {other:?}: legacy, shadow, cutover, target or complete"),
                );
                return None;
            }
        };
        if let (Some(p), false) = (percent, matches!(parsed, Stage::Cutover(_))) {
            self.at(
                path,
                text,
                p,
                format!("percent applies only to stage \"cutover\", not {parsed}"),
            );
        }
        Some(parsed)
    }

    fn bucket(
        &mut self,
        path: &Path,
        text: &str,
        raw: &Spanned<String>,
        table: &TableMap,
    ) -> Option<Bucket> {
        let value = raw.get_ref().trim();
        if value == "session" {
            return Some(Bucket::Session);
        }
        if let Some(n) = value.strip_prefix('$') {
            return match n.parse::<usize>() {
                Ok(n) if n >= 1 => Some(Bucket::Param(n)),
                _ => {
                    self.at(
                        path,
                        text,
                        raw,
                        format!("bucket {value:?}: parameters are $1, $2, …"),
                    );
                    None
                }
            };
        }
        let column = value.to_ascii_lowercase();
        if table.column(&column).is_some() {
            Some(Bucket::Column(column))
        } else {
            self.at(
                path,
                text,
                raw,
                format!(
                    "bucket {value:?}: \"session\", a parameter ($1) or a column of {}",
                    table.legacy
                ),
            );
            None
        }
    }

    fn sample_rate(&mut self, path: &Path, text: &str, raw: Option<&Spanned<f64>>) -> Option<f64> {
        let raw = raw?;
        let rate = *raw.get_ref();
        if (0.0..=1.0).contains(&rate) {
            Some(rate)
        } else {
            self.at(
                path,
                text,
                raw,
                format!("sample_rate {rate} is not between 0 and 1"),
            );
            None
        }
    }

    fn legacy_column(
        &mut self,
        path: &Path,
        text: &str,
        raw: &Spanned<String>,
        table: &TableMap,
    ) -> Option<String> {
        let name = raw.get_ref().to_ascii_lowercase();
        if table.column(&name).is_some() {
            Some(name)
        } else {
            self.at(
                path,
                text,
                raw,
                format!("column {name:?} is not in {}", table.legacy),
            );
            None
        }
    }

    fn query_type(
        &mut self,
        path: &Path,
        text: &str,
        spanned: &Spanned<raw::RawQueryType>,
        table: &TableMap,
        defaults: &Defaults,
    ) -> Option<QueryType> {
        let raw = spanned.get_ref();
        let before = self.diagnostics.len();
        let name = raw.name.get_ref().clone();
        if !is_identifier(&name) {
            self.at(
                path,
                text,
                &raw.name,
                format!("query type name {name:?}: use lower-case letters, digits and _"),
            );
        }
        let matcher = match (&raw.match_sql, &raw.pattern) {
            (Some(sql), None) => match fingerprint::fingerprint(sql.get_ref()) {
                Ok(fp) => Some(Matcher::Fingerprint(fp)),
                Err(e) => {
                    self.at(
                        path,
                        text,
                        sql,
                        format!("match: the SQL does not parse: {e}"),
                    );
                    None
                }
            },
            (None, Some(pattern)) => match Regex::new(pattern.get_ref()) {
                Ok(re) => Some(Matcher::Pattern(re)),
                Err(e) => {
                    self.at(path, text, pattern, format!("pattern: {e}"));
                    None
                }
            },
            (Some(_), Some(pattern)) => {
                self.at(path, text, pattern, "give match or pattern, not both");
                None
            }
            (None, None) => {
                self.at(
                    path,
                    text,
                    spanned,
                    format!("query type {name:?}: give match (an example statement) or pattern"),
                );
                None
            }
        };
        if let Some(target) = &raw.target
            && let Err(e) = fingerprint::parse(target.get_ref())
        {
            self.at(
                path,
                text,
                target,
                format!("target: the SQL does not parse: {e}"),
            );
        }
        let stage = match &raw.stage {
            Some(_) => self.stage(path, text, raw.stage.as_ref(), raw.percent.as_ref()),
            None => {
                if let Some(p) = &raw.percent {
                    self.at(path, text, p, "percent without stage = \"cutover\"");
                }
                Some(defaults.stage)
            }
        };
        let bucket = match &raw.bucket {
            Some(b) => self.bucket(path, text, b, table),
            None => Some(defaults.bucket.clone()),
        };
        let sample_rate = match &raw.sample_rate {
            Some(_) => self.sample_rate(path, text, raw.sample_rate.as_ref()),
            None => Some(defaults.sample_rate),
        };
        let mut compare = CompareOptions::default();
        if let Some(c) = &raw.compare {
            compare.ordered = c.ordered;
            if let Some(t) = &c.numeric_tolerance {
                match t.get_ref().parse::<Decimal>() {
                    Ok(d) if d >= Decimal::ZERO => compare.numeric_tolerance = d,
                    _ => self.at(
                        path,
                        text,
                        t,
                        format!(
                            "numeric_tolerance {:?} is not a non-negative decimal",
                            t.get_ref()
                        ),
                    ),
                }
            }
            if let Some(t) = &c.float_tolerance {
                let v = *t.get_ref();
                if v.is_finite() && v >= 0.0 {
                    compare.float_tolerance = v;
                } else {
                    self.at(
                        path,
                        text,
                        t,
                        format!("float_tolerance {v} is not a non-negative number"),
                    );
                }
            }
            for col in &c.ignore_columns {
                if let Some(name) = self.legacy_column(path, text, col, table) {
                    compare.ignore_columns.push(name);
                }
            }
            compare.expected = self.expected_list(path, text, &c.expected, table);
        }
        if self.diagnostics.len() > before {
            return None;
        }
        Some(QueryType {
            name,
            location: self.location(path, text, &raw.name),
            match_location: raw.match_sql.as_ref().map(|m| self.location(path, text, m)),
            target_location: raw.target.as_ref().map(|t| self.location(path, text, t)),
            example_sql: raw
                .match_sql
                .as_ref()
                .map(|m| m.get_ref().trim().to_owned()),
            matcher: matcher?,
            target_sql: raw.target.as_ref().map(|t| t.get_ref().trim().to_owned()),
            stage: stage?,
            bucket: bucket?,
            sample_rate: sample_rate?,
            strict: raw.strict,
            compare,
        })
    }
}

pub(crate) fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
