//! Classification: which statements concern the legacy table, and what kind of query each
//! one is.
//!
//! Every Query and Parse goes through the cheap pre-check first: a case-insensitive search
//! for the legacy table's name in the SQL text. Statements that fail it are passthrough and
//! are never parsed — they must cost next to nothing. The others are parsed once per
//! distinct SQL text (a bounded cache keeps the result): a statement that really names the
//! table gets its fingerprint, its query type (the rule that matches it, or an automatic
//! type named after the fingerprint with the default stage) and its route — the target SQL
//! (the rule's own, or the rewritten statement) or the reason it is not routable. SQL the
//! parser cannot read is relayed to legacy untouched and counted, never failed.

pub mod determinism;
pub mod params;

use std::sync::Arc;

use determinism::Determinism;
use quick_cache::sync::Cache;

use crate::routing::fingerprint::{self, Fingerprint};

use crate::{
    routing::rewrite::{Rewrite, Rewriter},
    routing::rules::{Bucket, RuleSet, Stage},
};

/// The pre-check for one legacy table name.
#[derive(Debug, Clone)]
pub struct Precheck {
    /// The table's name, lower case (`affiliates`).
    needle: Vec<u8>,
    /// Where in the name its rarest byte in SQL text is (`f` in `affiliates`): the search
    /// jumps between occurrences of that byte, which are few, rather than of the first
    /// (every `a` of `SELECT abalance FROM pgbench_accounts`).
    rare: usize,
}

/// Letters from the most to the least frequent in SQL text (keywords, English names);
/// anything else (digits, `_`) counts as rarer than all of them.
const LETTER_FREQUENCY: &[u8] = b"etaoinsrlcdhumfpgywbvkxjqz";

impl Precheck {
    pub fn new(table: &str) -> Self {
        let needle = table.to_ascii_lowercase().into_bytes();
        let rank = |b: u8| {
            LETTER_FREQUENCY
                .iter()
                .position(|&l| l == b)
                .unwrap_or(LETTER_FREQUENCY.len())
        };
        let rare = (0..needle.len())
            .max_by_key(|&i| rank(needle[i]))
            .unwrap_or(0);
        Self { needle, rare }
    }

    /// Whether `sql` may mention the table (any case, quoted or not, qualified or not).
    pub fn mentions_table(&self, sql: &[u8]) -> bool {
        let n = self.needle.len();
        if n == 0 {
            return false;
        }
        let b = self.needle[self.rare];
        let mut from = self.rare;
        while from < sql.len() {
            let Some(i) = memchr::memchr2(b, b.to_ascii_uppercase(), &sql[from..]) else {
                return false;
            };
            let start = from + i - self.rare;
            if start + n > sql.len() {
                return false;
            }
            if sql[start..start + n].eq_ignore_ascii_case(&self.needle) {
                return true;
            }
            from += i + 1;
        }
        false
    }
}

/// How a session's unqualified table names are watched: the question that asks the server
/// whether the legacy table's bare name is the legacy table for this session, and the
/// statements after which the answer may have changed.
#[derive(Debug, Clone)]
pub struct Names {
    /// `SELECT to_regclass('name') IS NOT DISTINCT FROM to_regclass('schema.name')`, as a
    /// simple Query frame.
    question: bytes::Bytes,
    /// [`NAME_WORDS`] and the table's name, lower case; a word's index is its bit.
    words: Vec<Box<[u8]>>,
    /// Bit `n` set: some word is `n` bytes long.
    lengths: u64,
    /// Bit `b % 64` set: some word starts with byte `b` (lower case).
    firsts: u64,
    /// Whether the table's name is one word of identifier bytes (a quoted name may not be:
    /// then it is searched for apart).
    table_is_word: bool,
}

/// Bytes of an unquoted identifier, as [`Names::may_change`] splits words.
const IDENT: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
        b += 1;
    }
    table
};

/// The words [`Names::may_change`] looks for, in this order (their indexes below).
const NAME_WORDS: &[&str] = &[
    "search_path",
    "discard",
    "authorization",
    "role",
    "set",
    "reset",
    "temp",
    "temporary",
    "pg_temp",
    "create",
    "alter",
    "drop",
];

impl Names {
    pub fn new(table: &crate::routing::rules::TableName) -> Self {
        let literal = |s: &str| s.replace('\'', "''");
        let question = format!(
            "SELECT pg_catalog.to_regclass('{}') IS NOT DISTINCT FROM pg_catalog.to_regclass('{}')",
            literal(&crate::routing::rules::quote_ident(&table.name)),
            literal(&table.quoted()),
        );
        let mut words: Vec<Box<[u8]>> = NAME_WORDS.iter().map(|w| w.as_bytes().into()).collect();
        let name = table.name.to_ascii_lowercase().into_bytes();
        let table_is_word = !name.is_empty() && name.iter().all(|&b| IDENT[usize::from(b)]);
        words.push(name.into());
        let lengths = words
            .iter()
            .filter(|w| w.len() < 64)
            .fold(0u64, |mask, w| mask | 1 << w.len());
        let firsts = words
            .iter()
            .filter_map(|w| w.first())
            .fold(0u64, |mask, b| mask | 1 << (b % 64));
        Self {
            question: crate::wire::messages::query_frame(&question),
            words,
            lengths,
            firsts,
            table_is_word,
        }
    }

    /// The question, as a simple Query frame (its answer is one row, `t` or `f`).
    pub fn question(&self) -> bytes::Bytes {
        self.question.clone()
    }

    /// Whether `sql` may change how its session resolves the table's bare name: a
    /// `search_path` (SET, set_config, RESET, a function's), `DISCARD`, a role change
    /// (`SET ROLE`, `SESSION AUTHORIZATION`: `"$user"`), or a temporary table or DDL that
    /// names the table. Words, not substrings (`created_at` is not `create`); one pass.
    ///
    /// The text is split into words of identifier bytes and each is looked up: a whole word
    /// is exactly such a run. It runs at every Query and Parse; an overlapping Aho-Corasick
    /// search did the same in ~1.2k instructions per `pgbench -S` statement (callgrind).
    pub fn may_change(&self, sql: &[u8]) -> bool {
        let seen = self.words_seen(sql);
        let any = |indexes: &[u32]| indexes.iter().any(|i| seen & (1 << i) != 0);
        let table = 1 << NAME_WORDS.len() as u32;
        any(&[0, 1, 2])
            || (any(&[3]) && any(&[4, 5]))
            || (seen & table != 0 && any(&[6, 7, 8, 9, 10, 11]))
    }

    /// The words that stand whole in `sql`: bit `n` for word `n`.
    fn words_seen(&self, sql: &[u8]) -> u32 {
        let mut seen = 0u32;
        let mut i = 0;
        while i < sql.len() {
            if !IDENT[usize::from(sql[i])] {
                i += 1;
                continue;
            }
            let start = i;
            while i < sql.len() && IDENT[usize::from(sql[i])] {
                i += 1;
            }
            let word = &sql[start..i];
            if word.len() >= 64 || self.lengths & (1 << word.len()) == 0 {
                continue;
            }
            let first = word[0].to_ascii_lowercase();
            if self.firsts & (1 << (first % 64)) == 0 {
                continue;
            }
            for (n, known) in self.words.iter().enumerate() {
                // The first byte before the call: most words share a length with one.
                if known.len() == word.len()
                    && known[0] == first
                    && word.eq_ignore_ascii_case(known)
                {
                    seen |= 1 << n;
                }
            }
        }
        if !self.table_is_word && self.mentions_odd_name(sql) {
            seen |= 1 << NAME_WORDS.len();
        }
        seen
    }

    /// Whether a table name that is not one word of identifier bytes stands in `sql`, in
    /// any case, with no identifier byte on either side.
    fn mentions_odd_name(&self, sql: &[u8]) -> bool {
        let name = &self.words[NAME_WORDS.len()];
        let ident = |i: Option<&u8>| i.is_some_and(|&b| IDENT[usize::from(b)]);
        !name.is_empty()
            && sql.windows(name.len()).enumerate().any(|(at, window)| {
                window.eq_ignore_ascii_case(name)
                    && !ident(at.checked_sub(1).and_then(|b| sql.get(b)))
                    && !ident(sql.get(at + name.len()))
            })
    }
}

/// What a statement is, for the proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum Classification {
    /// Does not concern the legacy table: relayed unchanged.
    Passthrough,
    /// Names the legacy table, but the parser cannot read it: relayed to legacy untouched.
    Unparsable { reason: String },
    /// A statement on the legacy table.
    Typed(Typed),
}

/// A statement on the legacy table.
#[derive(Debug, Clone, PartialEq)]
pub struct Typed {
    /// The rule's name, or the automatic `fp_…` name.
    pub query_type: String,
    /// A rule names this query type (otherwise it is automatic).
    pub named: bool,
    pub fingerprint: Fingerprint,
    pub stage: Stage,
    pub bucket: Bucket,
    /// Where the bucketing key of an execution is (from the rule's `bucket`).
    pub bucket_key: BucketKey,
    /// Share of executions the shadow compares (0.0 to 1.0).
    pub sample_rate: f64,
    /// Where it goes on the target, or why it cannot.
    pub route: Rewrite,
    /// The target SQL is the rule's own (not rewritten).
    pub explicit_target: bool,
    /// For a statement that writes (INSERT, UPDATE, DELETE, MERGE, COPY, TRUNCATE): the
    /// comment the proxy appends for the dual-write trigger (query type and fingerprint),
    /// made once per SQL text with the classification.
    pub write_tag: Option<Arc<str>>,
    /// For a single read (one query): what the shadow needs to compare its answers.
    pub read: Option<Arc<ReadPlan>>,
    /// A locking read (`FOR UPDATE`, `FOR SHARE`, …): served by the side that serves the
    /// transaction's writes, never by bucket; compared without its locking clause.
    pub locking: bool,
    /// It names the table without its schema: which table that is depends on the session's
    /// search_path (and temporary tables), so it is the legacy table's only in sessions that
    /// resolve the name to it ([`Names`]).
    pub unqualified: bool,
}

/// Where an execution's bucketing key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketKey {
    /// The session's: all its statements of this type go one way.
    Session,
    /// The value bound to `$n` (1-based) at each execution.
    Param(usize),
    /// A value written in the statement itself.
    Literal(String),
}

/// The key of a statement under its rule's bucket: a parameter or literal compared with the
/// named column (or the rule's `$n`, found by the column the rule's example compares it
/// with when the statement carries its values inline); the session when there is none.
fn bucket_key(
    bucket: &Bucket,
    statements: &[sqlparser::ast::Statement],
    example: Option<&str>,
) -> BucketKey {
    let column = match bucket {
        Bucket::Session => return BucketKey::Session,
        Bucket::Column(c) => c.clone(),
        Bucket::Param(n) => {
            let bound = params::bound_columns(statements);
            if bound.contains_key(n) || has_placeholders(statements) {
                return BucketKey::Param(*n);
            }
            let example = example.and_then(|e| fingerprint::parse(e).ok());
            match example.and_then(|e| params::bound_columns(&e).remove(n)) {
                Some(c) => c,
                None => return BucketKey::Session,
            }
        }
    };
    if let Some((&n, _)) = params::bound_columns(statements)
        .iter()
        .find(|(_, c)| **c == column)
    {
        return BucketKey::Param(n);
    }
    params::bound_literals(statements)
        .remove(&column)
        .map_or(BucketKey::Session, BucketKey::Literal)
}

fn has_placeholders(statements: &[sqlparser::ast::Statement]) -> bool {
    statements.iter().any(|s| s.to_string().contains('$'))
}

/// What comparing a read's two answers needs, worked out once per SQL text.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadPlan {
    /// Whether its answer is determined, and in what order to compare it.
    pub determinism: Determinism,
    /// The column each `$n` is compared with (what decides whether a sample may show it).
    pub bound_columns: std::collections::BTreeMap<usize, String>,
    /// A locking read: the shadow, read-only, compares it without its locking clause (the
    /// rows it would lock are the answer).
    pub locking: bool,
}

/// A query's SQL with its LIMIT raised to at least `rows` (`LIMIT GREATEST(<its limit>,
/// rows)`, so that a `$n` it limits by stays used): legacy's longer answer, to check a
/// target's answer cut inside a tie group ([`crate::shadow::compare::compare_cut`]). `None` when it
/// does not parse or has no plain LIMIT.
pub fn with_limit(sql: &str, rows: usize) -> Option<String> {
    use sqlparser::ast::LimitClause;
    let mut statements = fingerprint::parse(sql).ok()?;
    let [sqlparser::ast::Statement::Query(query)] = statements.as_mut_slice() else {
        return None;
    };
    let Some(LimitClause::LimitOffset {
        limit: Some(limit), ..
    }) = &mut query.limit_clause
    else {
        return None;
    };
    // bigint, as LIMIT takes: a `$n` there keeps the type it has in the LIMIT itself.
    let raised = format!("GREATEST({limit}, {rows}::int8)");
    *limit = sqlparser::parser::Parser::new(&sqlparser::dialect::PostgreSqlDialect {})
        .try_with_sql(&raised)
        .ok()?
        .parse_expr()
        .ok()?;
    Some(statements[0].to_string())
}

/// A locking read's SQL without its locking clauses (`FOR UPDATE`, `FOR SHARE` …): what the
/// read-only shadow runs in its place. `None` when it does not parse.
pub fn without_locks(sql: &str) -> Option<String> {
    let mut statements = fingerprint::parse(sql).ok()?;
    for statement in &mut statements {
        if let sqlparser::ast::Statement::Query(query) = statement {
            query.locks.clear();
        }
    }
    Some(
        statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// Classifies statements against one rule set, with a bounded cache by SQL text.
pub struct Classifier {
    precheck: Precheck,
    names: Names,
    rules: Arc<RuleSet>,
    rewriter: Rewriter,
    /// Explicit targets, parsed once, by query type name.
    plans: std::collections::HashMap<String, Result<crate::routing::rewrite::TargetPlan, String>>,
    cache: Cache<String, Arc<Classification>>,
    /// The answer for most statements, made once (handed out without an allocation).
    passthrough: Arc<Classification>,
}

/// Distinct SQL texts remembered (statements with inline literals each count).
pub const CACHE_ENTRIES: usize = 10_000;

impl Classifier {
    pub fn new(rules: Arc<RuleSet>) -> Self {
        let plans = rules
            .query_types
            .iter()
            .filter_map(|qt| {
                let (target, example) = qt.target_sql.as_ref().zip(qt.example_sql.as_ref())?;
                Some((
                    qt.name.clone(),
                    crate::routing::rewrite::TargetPlan::new(example, target),
                ))
            })
            .collect();
        Self {
            precheck: Precheck::new(&rules.table.legacy.name),
            names: Names::new(&rules.table.legacy),
            rewriter: Rewriter::new(&rules.table),
            plans,
            cache: Cache::new(CACHE_ENTRIES),
            passthrough: Arc::new(Classification::Passthrough),
            rules,
        }
    }

    /// Whether `sql` may mention the legacy table (the pre-check alone, nothing parsed).
    pub fn mentions_table(&self, sql: &[u8]) -> bool {
        self.precheck.mentions_table(sql)
    }

    /// How sessions resolve the table's bare name.
    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn rules_arc(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    /// Classifies SQL text.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        if !self.precheck.mentions_table(sql.as_bytes()) {
            return Arc::clone(&self.passthrough);
        }
        self.classify_mentioning(sql)
    }

    /// [`Self::classify`] of a statement [`Self::mentions_table`] already said yes to.
    pub fn classify_mentioning(&self, sql: &str) -> Arc<Classification> {
        if let Some(hit) = self.cache.get(sql) {
            return hit;
        }
        let classified = Arc::new(self.classify_uncached(sql));
        self.cache.insert(sql.to_owned(), Arc::clone(&classified));
        classified
    }

    fn classify_uncached(&self, sql: &str) -> Classification {
        let statements = match fingerprint::parse(sql) {
            Ok(s) => s,
            Err(reason) => return Classification::Unparsable { reason },
        };
        if !self.rewriter.concerns(&statements) {
            return Classification::Passthrough;
        }
        let unqualified = self.rewriter.names_unqualified(&statements);
        let writes = statements.iter().any(|s| {
            use sqlparser::ast::Statement as S;
            matches!(
                s,
                S::Insert(_)
                    | S::Update { .. }
                    | S::Delete(_)
                    | S::Merge { .. }
                    | S::Copy { .. }
                    | S::Truncate { .. }
            )
        });
        // A locking read (FOR UPDATE / FOR SHARE …) is served where the transaction writes.
        let locking = statements
            .iter()
            .any(|s| matches!(s, sqlparser::ast::Statement::Query(q) if !q.locks.is_empty()));
        let read = (!writes)
            .then(|| {
                let key = self.rules.table.key.as_str();
                match determinism::analyze(&statements, &[key]) {
                    Determinism::NotARead => None,
                    determinism => Some(Arc::new(ReadPlan {
                        determinism,
                        bound_columns: params::bound_columns(&statements),
                        locking,
                    })),
                }
            })
            .flatten();
        let mut normalized = statements.clone();
        let early_bucket_key = |rule: Option<&crate::routing::rules::QueryType>| {
            let bucket = rule.map_or(&self.rules.defaults.bucket, |r| &r.bucket);
            bucket_key(
                bucket,
                &statements,
                rule.and_then(|r| r.example_sql.as_deref()),
            )
        };
        let fp = fingerprint::of_statements(&mut normalized);
        let rule = self.rules.query_type_for(&fp);
        let bucket_key = early_bucket_key(rule);
        let (route, explicit_target) = match rule.and_then(|r| self.plans.get(&r.name)) {
            Some(Ok(plan)) => (plan.bind(&statements), true),
            Some(Err(reason)) => (Rewrite::NotRoutable(reason.clone()), true),
            None => (self.rewriter.rewrite_statements(statements), false),
        };
        let defaults = &self.rules.defaults;
        let query_type = rule.map_or_else(|| fp.id.clone(), |r| r.name.clone());
        let write_tag =
            writes.then(|| crate::wire::messages::query_type_tag(&query_type, &fp.id).into());
        Classification::Typed(Typed {
            query_type,
            named: rule.is_some(),
            stage: rule.map_or(defaults.stage, |r| r.stage),
            sample_rate: rule.map_or(defaults.sample_rate, |r| r.sample_rate),
            bucket: rule.map_or_else(|| defaults.bucket.clone(), |r| r.bucket.clone()),
            bucket_key,
            fingerprint: fp,
            route,
            explicit_target,
            write_tag,
            read,
            locking,
            unqualified,
        })
    }
}

/// What `cutover rules explain` says about a statement.
#[derive(Debug, serde::Serialize)]
pub struct Explanation {
    /// passthrough, unparsable, or query_type.
    pub kind: &'static str,
    pub query_type: Option<String>,
    /// A rule names the query type (otherwise automatic).
    pub named: Option<bool>,
    pub fingerprint: Option<String>,
    pub fingerprint_text: Option<String>,
    pub stage: Option<String>,
    pub bucket: Option<String>,
    /// The SQL served on the target side.
    pub target_sql: Option<String>,
    /// rule (the rule's own target SQL) or rewritten.
    pub target_from: Option<&'static str>,
    /// Why the statement stays on legacy.
    pub not_routable: Option<String>,
    /// Behaviour changes the rules declare for its query type (v2 answers differently on
    /// purpose; the gate waits for a reviewer to accept each).
    pub behaviour_changes: Vec<ExplainedChange>,
    pub note: String,
}

/// A declared behaviour change, as `rules explain` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ExplainedChange {
    pub name: String,
    pub kind: crate::routing::rules::changes::ChangeKind,
    pub description: String,
}

pub fn explain(classifier: &Classifier, sql: &str) -> Explanation {
    let legacy = classifier.rules().table.legacy.to_string();
    let empty = |kind, note: String| Explanation {
        kind,
        query_type: None,
        named: None,
        fingerprint: None,
        fingerprint_text: None,
        stage: None,
        bucket: None,
        target_sql: None,
        target_from: None,
        not_routable: None,
        behaviour_changes: Vec::new(),
        note,
    };
    match &*classifier.classify(sql) {
        Classification::Passthrough => empty(
            "passthrough",
            format!(
                "does not concern {legacy}: relayed unchanged (never parsed unless its text names the table)"
            ),
        ),
        Classification::Unparsable { reason } => {
            let mut e = empty(
                "unparsable",
                format!(
                    "names {legacy}, but the SQL parser cannot read it: relayed to legacy untouched and counted"
                ),
            );
            e.not_routable = Some(reason.clone());
            e
        }
        Classification::Typed(t) => {
            let (target_sql, not_routable) = match &t.route {
                Rewrite::Target(sql) => (Some(sql.clone()), None),
                Rewrite::NotRoutable(why) => (None, Some(why.clone())),
            };
            let note = match (&not_routable, t.named) {
                (Some(_), _) => "not routable: stays on legacy whatever the stage".to_owned(),
                (None, true) => "served as its stage says".to_owned(),
                (None, false) => {
                    "no rule names it: an automatic query type with the default stage".to_owned()
                }
            };
            Explanation {
                kind: "query_type",
                query_type: Some(t.query_type.clone()),
                named: Some(t.named),
                fingerprint: Some(t.fingerprint.id.clone()),
                fingerprint_text: Some(t.fingerprint.text.clone()),
                stage: Some(t.stage.to_string()),
                bucket: Some(match &t.bucket {
                    Bucket::Session => "session".to_owned(),
                    Bucket::Param(n) => format!("${n}"),
                    Bucket::Column(c) => format!("column {c}"),
                }),
                target_from: target_sql.as_ref().map(|_| {
                    if t.explicit_target {
                        "rule"
                    } else {
                        "rewritten"
                    }
                }),
                target_sql,
                not_routable,
                behaviour_changes: classifier
                    .rules()
                    .changes_of(&t.query_type)
                    .map(|c| ExplainedChange {
                        name: c.name.clone(),
                        kind: c.kind,
                        description: c.description.clone(),
                    })
                    .collect(),
                note,
            }
        }
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = |f: &mut std::fmt::Formatter<'_>, k: &str, v: &Option<String>| match v {
            Some(v) => writeln!(f, "{k:<13} {v}"),
            None => Ok(()),
        };
        let query_type = self.query_type.as_ref().map(|q| match self.named {
            Some(true) => format!("{q} (named by a rule)"),
            _ => format!("{q} (automatic)"),
        });
        writeln!(f, "{:<13} {}", "kind", self.kind)?;
        line(f, "query type", &query_type)?;
        line(f, "fingerprint", &self.fingerprint)?;
        line(f, "normalized", &self.fingerprint_text)?;
        line(f, "stage", &self.stage)?;
        line(f, "bucket", &self.bucket)?;
        if let (Some(sql), Some(from)) = (&self.target_sql, self.target_from) {
            writeln!(f, "{:<13} ({from}) {sql}", "target SQL")?;
        }
        line(f, "not routable", &self.not_routable)?;
        for c in &self.behaviour_changes {
            writeln!(
                f,
                "{:<13} {} ({}; to be accepted before v2 serves it): {}",
                "v2 differs", c.name, c.kind, c.description
            )?;
        }
        writeln!(f, "{:<13} {}", "note", self.note)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn statements_that_may_change_name_resolution_are_told_apart() {
        let names = Names::new(&crate::routing::rules::TableName {
            schema: "public".into(),
            name: "affiliates".into(),
        });
        for sql in [
            "SET search_path = tenant_x, public",
            "set SEARCH_PATH to default",
            "SELECT set_config('search_path', 'x', false)",
            "RESET ALL; DISCARD ALL",
            "SET ROLE app_reader",
            "reset role",
            "SET SESSION AUTHORIZATION alice",
            "CREATE TEMP TABLE affiliates (id int)",
            "create temporary table Affiliates as select 1",
            "DROP TABLE pg_temp.affiliates",
            "CREATE TABLE tenant.affiliates (id int)",
            "ALTER TABLE tenant.other RENAME TO affiliates",
        ] {
            assert!(names.may_change(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT * FROM affiliates WHERE affiliate_id = $1",
            "INSERT INTO affiliates (name, created_at) VALUES ($1, now())",
            "UPDATE affiliates SET status = $1 WHERE affiliate_id = $2",
            "SELECT role FROM users",
            "SET statement_timeout = 0",
            "CREATE TABLE other (id int)",
            "SELECT temperature FROM affiliates_log",
        ] {
            assert!(!names.may_change(sql.as_bytes()), "{sql}");
        }
        assert_eq!(
            &names.question()[5..],
            b"SELECT pg_catalog.to_regclass('\"affiliates\"') IS NOT DISTINCT FROM pg_catalog.to_regclass('\"public\".\"affiliates\"')\0"
        );
    }

    /// What `may_change` found before it split words itself: an overlapping Aho-Corasick
    /// search, each match kept when no identifier byte stands beside it.
    fn words_seen_overlapping(table: &str, sql: &[u8]) -> u32 {
        let mut words: Vec<String> = NAME_WORDS.iter().map(|w| (*w).to_owned()).collect();
        words.push(table.to_ascii_lowercase());
        let automaton = aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(&words)
            .unwrap();
        let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
        let mut seen = 0u32;
        for m in automaton.find_overlapping_iter(sql) {
            let before = m.start().checked_sub(1).map(|i| sql[i]);
            let after = sql.get(m.end()).copied();
            if !(before.is_some_and(ident) || after.is_some_and(ident)) {
                seen |= 1 << m.pattern().as_u32();
            }
        }
        seen
    }

    proptest::proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Words split by hand find what the overlapping search found, on text made of the
        /// words, their pieces and identifier bytes, joined by separators or by nothing; for
        /// a plain table name and for a quoted one that is not one word.
        #[test]
        fn whole_words_are_found_as_an_overlapping_search_finds_them(
            pieces in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        3 => proptest::sample::select(NAME_WORDS.to_vec()).prop_map(str::to_owned),
                        1 => proptest::sample::select(NAME_WORDS.to_vec())
                            .prop_map(|w| w[..w.len() / 2].to_owned()),
                        1 => proptest::sample::select(vec![
                            "affiliates", "AFFILIATES", "Affiliate Log", "affiliate log", "pg_",
                            "x", "$1", "Set", "ReSeT", "tempo", "roles",
                        ])
                        .prop_map(str::to_owned),
                    ],
                    proptest::sample::select(vec!["", " ", " ", ".", "(", "'", "\"", ";", "_"]),
                ),
                0..10,
            ),
            table in proptest::sample::select(vec!["affiliates", "Affiliate Log"]),
        ) {
            let sql: String = pieces.iter().map(|(word, sep)| format!("{word}{sep}")).collect();
            let names = Names::new(&crate::routing::rules::TableName {
                schema: "public".into(),
                name: table.into(),
            });
            prop_assert_eq!(
                names.words_seen(sql.as_bytes()),
                words_seen_overlapping(table, sql.as_bytes()),
                "{}",
                sql
            );
        }
    }

    #[test]
    fn finds_the_table_in_any_case_or_form() {
        let p = Precheck::new("affiliates");
        for sql in [
            "SELECT * FROM affiliates",
            "select * from PUBLIC.AFFILIATES a",
            "UPDATE \"affiliates\" SET x = 1",
            "SELECT 'public.Affiliates'::regclass",
        ] {
            assert!(p.mentions_table(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT now()",
            "SELECT * FROM affiliate",
            "",
            "a",
            "affiliate",
        ] {
            assert!(!p.mentions_table(sql.as_bytes()), "{sql}");
        }
    }

    proptest::proptest! {
        /// The rare-byte search finds exactly what a plain case-insensitive search finds.
        #[test]
        fn the_precheck_agrees_with_a_plain_search(
            table in "[a-z_][a-z0-9_]{0,12}",
            sql in "[ -~]{0,80}",
            at in 0usize..80,
            case in proptest::bool::ANY,
        ) {
            let p = Precheck::new(&table);
            // Half of the time the name is in the text (in either case).
            let mut text = sql.clone();
            if case {
                let name = if at % 2 == 0 { table.to_ascii_uppercase() } else { table.clone() };
                let at = text.len().min(at);
                text.insert_str(at, &name);
            }
            let plain = text.to_ascii_lowercase().contains(&table);
            proptest::prop_assert_eq!(p.mentions_table(text.as_bytes()), plain, "{} in {}", table, text);
        }
    }

    fn classifier() -> Classifier {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
        Classifier::new(Arc::new(RuleSet::load_dir(&dir).unwrap()))
    }

    #[test]
    fn named_automatic_passthrough_and_unparsable() {
        let c = classifier();
        let Classification::Typed(t) =
            &*c.classify("select * from affiliates where affiliate_id = 7")
        else {
            panic!()
        };
        assert_eq!((t.query_type.as_str(), t.named), ("affiliate_by_id", true));
        assert!(matches!(&t.route, Rewrite::Target(sql) if sql.contains("affiliates_optimized")));

        let Classification::Typed(t) =
            &*c.classify("SELECT name FROM affiliates WHERE email LIKE $1")
        else {
            panic!()
        };
        assert!(!t.named && t.query_type.starts_with("fp_"));
        assert_eq!(t.stage, Stage::Legacy);

        assert_eq!(*c.classify("SELECT now()"), Classification::Passthrough);
        assert_eq!(
            *c.classify("SELECT * FROM affiliates_archive"),
            Classification::Passthrough
        );
        assert!(matches!(
            *c.classify("SELECT * FROM affiliates FOR NO KEY UPDATE"),
            Classification::Unparsable { .. } | Classification::Typed(_)
        ));
        assert!(matches!(
            *c.classify("SELEC * FROM affiliates"),
            Classification::Unparsable { .. }
        ));
    }

    #[test]
    fn explicit_targets_win() {
        let c = classifier();
        let Classification::Typed(t) = &*c.classify("SELECT affiliate_id, level_1_referrals FROM affiliates WHERE level_1_referrals > 0 ORDER BY level_1_referrals DESC LIMIT 10") else {
            panic!()
        };
        assert_eq!(t.query_type, "top_referrers");
        assert!(t.explicit_target);
    }
}
