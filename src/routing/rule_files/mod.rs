//! Reading the rule files into a [`RuleSet`]: the raw TOML with its spans (`raw`),
//! validated whole with every problem reported as `file:line:column: message`, `cutover rules
//! check` against a database (`check`) and `cutover rules promote` ([`promote`]). The rule
//! set itself, and what it means, is [`crate::routing::rules`].

mod changes;
mod check;
pub mod promote;
mod raw;

pub use check::check_against_database;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use regex::Regex;
use rust_decimal::Decimal;
use toml::Spanned;

use crate::{
    config::line_col,
    routing::{fingerprint, rules::*},
};

impl RuleSet {
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
        let rewriter = crate::routing::rewrite::Rewriter::new(table);
        for qt in query_types {
            let (None, Some(example)) = (&qt.target_sql, &qt.example_sql) else {
                continue;
            };
            let crate::routing::rewrite::Rewrite::NotRoutable(reason) = rewriter.rewrite(example)
            else {
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
        } else if name.len() > MAX_QUERY_TYPE_NAME {
            // The proxy tags every write with it and the mirror's queue keeps it in a
            // bounded column (migration 0025): PostgreSQL's own bound for identifiers.
            self.at(
                path,
                text,
                &raw.name,
                format!("query type name {name:?} is longer than {MAX_QUERY_TYPE_NAME} characters"),
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

/// The longest query type name, PostgreSQL's bound for identifiers (NAMEDATALEN - 1).
const MAX_QUERY_TYPE_NAME: usize = 63;

pub(crate) fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
