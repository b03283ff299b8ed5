//! One shadow worker: a connection of its own, jobs from the queue, and for each job
//!
//! 1. the legacy statement and its target SQL run one after the other, each on committed
//!    data (as two independent readers would see them: a concurrent write may fall between);
//! 2. the answers compared ([`crate::shadow::compare`]); agreement is `match`;
//! 3. a disagreement is run again, both sides inside one `REPEATABLE READ READ ONLY`
//!    transaction: agreement there makes it `transient` (a write fell between the two
//!    reads), disagreement `confirmed`;
//! 4. a confirmed divergence is classified in that same snapshot: `error` (a side failed);
//!    else by the legacy statement run on the target's rows mapped back to legacy's columns
//!    (what the statement reads, whatever it is: aggregates, orders, recursive CTEs):
//!    answering like the target, `drift`; like legacy, `rewrite_bug`; when neither, by the
//!    rows of the keys involved (the answers' keys and the key parameters): they differ,
//!    `drift`; they agree, `rewrite_bug`; no key to look them up by, `undetermined`;
//! 5. a class reviewers expect is counted `expected` instead; a sample (bounded) is stored.
//!
//! A side that times out (`statement_timeout`), returns more than [`MAX_ROWS`] rows or
//! loses its connection makes the comparison `skipped`; so do two sides that failed the same
//! way (neither produced an answer: that proves nothing). Each skip is counted with its
//! reason ([`Skip`]). A locking read runs without its locking clause (the shadow is
//! read-only).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt;
use tokio::sync::{Mutex, mpsc};
use tokio_postgres::{
    Client, Statement,
    error::SqlState,
    types::{Format, IsNull, ToSql, Type, to_sql_checked},
};
use tokio_util::sync::CancellationToken;

use super::{Job, Param, Shadow, label, redact};
use crate::{
    routing::classify::determinism::{Determinism, Key, Order},
    routing::rewrite::Rewrite,
    routing::rules::{QueryType, RuleSet, quote_ident},
    shadow::compare::{self, Answer, Verdict},
    shadow::divergence::{Kind, Outcome, Sample},
};

/// Rows a side may return before the comparison is skipped (the shadow holds both answers
/// in memory).
pub const MAX_ROWS: usize = 10_000;
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 512;

pub(super) async fn worker(
    n: usize,
    shadow: Arc<Shadow>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    shutdown: CancellationToken,
) {
    let mut conn: Option<Conn> = None;
    let mut last_attempt: Option<Instant> = None;
    loop {
        let mut job = tokio::select! {
            _ = shutdown.cancelled() => return,
            job = async { queue.lock().await.recv().await } => match job {
                Some(job) => job,
                None => return,
            },
        };
        if !job.unpack() {
            continue;
        }
        let Some(typed) = job.typed() else { continue };
        if conn.as_ref().is_none_or(Conn::unusable)
            && last_attempt.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            last_attempt = Some(Instant::now());
            conn = match Conn::open(&shadow).await {
                Ok(c) => Some(c),
                Err(error) => {
                    tracing::warn!(worker = n, %error, "shadow: cannot connect; comparisons are skipped");
                    None
                }
            };
        }
        match conn.as_mut().filter(|c| !c.unusable()) {
            Some(c) => c.compare(&shadow, &job).await,
            None => skip(&shadow, typed, Skip::Unreachable, None),
        }
    }
}

/// Counts a comparison without a verdict, with its reason.
fn skip(
    shadow: &Shadow,
    typed: &crate::routing::classify::Typed,
    why: Skip,
    latency: Option<(Duration, Duration)>,
) {
    tracing::debug!(query_type = %typed.query_type, why = why.label(), "shadow comparison skipped");
    metrics::counter!("cutover_comparisons_skipped_total", "reason" => why.label()).increment(1);
    shadow
        .store
        .count(&typed.query_type, label(typed), Outcome::Skipped, latency);
}

/// A side's result.
#[derive(Debug)]
enum Side {
    Answer(Answer, Duration),
    Failed {
        code: String,
        message: String,
    },
    /// Timed out, too large, or the connection is gone: no verdict.
    NoVerdict(Skip),
}

/// Why a comparison has no verdict: the `reason` of `cutover_comparisons_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The shadow's `statement_timeout`.
    Timeout,
    /// More than `MAX_ROWS` rows.
    TooManyRows,
    /// The shadow connection failed or stopped answering.
    Unreachable,
    /// A prepared statement went stale (DDL); prepared again next time.
    Stale,
    /// Both sides failed with the same SQLSTATE: neither produced an answer.
    BothFailed,
    /// The statement could not be re-printed without its locking clause or with a longer
    /// LIMIT.
    NotRewritable,
}

impl Skip {
    pub const ALL: [Skip; 6] = [
        Skip::Timeout,
        Skip::TooManyRows,
        Skip::Unreachable,
        Skip::Stale,
        Skip::BothFailed,
        Skip::NotRewritable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Skip::Timeout => "timeout",
            Skip::TooManyRows => "too_many_rows",
            Skip::Unreachable => "shadow_unreachable",
            Skip::Stale => "stale_statement",
            Skip::BothFailed => "both_failed",
            Skip::NotRewritable => "not_rewritable",
        }
    }
}

/// How two sides relate.
enum Judged {
    Agree,
    Differ {
        diff: Option<compare::Diff>,
        columns: Vec<String>,
    },
    NoVerdict(Skip),
}

struct Conn {
    client: Client,
    /// Stopped answering: replaced before the next job.
    broken: bool,
    statements: HashMap<(String, Arc<[u32]>), Statement>,
}

impl Conn {
    async fn open(shadow: &Shadow) -> Result<Self, crate::net::connect::ConnectError> {
        let mut config = shadow.config.database.clone();
        let timeout = shadow.statement_timeout().as_millis();
        // Its own limits, whatever the role's defaults: never write, never wait long.
        config.options(format!(
            "-c statement_timeout={timeout} -c default_transaction_read_only=on -c lock_timeout={timeout}"
        ));
        let client = crate::net::connect::connect_as(&config, "cutover shadow").await?;
        Ok(Self {
            client,
            broken: false,
            statements: HashMap::new(),
        })
    }

    fn unusable(&self) -> bool {
        self.broken || self.client.is_closed()
    }

    async fn compare(&mut self, shadow: &Shadow, job: &Job) {
        let Some(typed) = job.typed() else { return };
        let (Some(plan), Rewrite::Target(target_sql)) = (&typed.read, &typed.route) else {
            return;
        };
        // A LIMIT that may cut a tie group: compared by validity in the snapshot.
        let (order, cut) = match &plan.determinism {
            Determinism::Determined(order) => (order, None),
            Determinism::Cut(keys) => (&Order::By(keys.clone()), Some(keys.clone())),
            _ => return,
        };
        let rule = typed
            .named
            .then(|| job.rules.named(&typed.query_type))
            .flatten();
        let order = match rule.and_then(|r| r.compare.ordered) {
            Some(false) => Order::Unordered,
            _ => order.clone(),
        };
        let options = options(rule, &job.rules);
        let count = |outcome, latency| {
            shadow
                .store
                .count(&typed.query_type, label(typed), outcome, latency)
        };
        let skipped = |why: Skip, latency| skip(shadow, typed, why, latency);
        // A locking read, compared without its locking clause (the shadow is read-only).
        let unlocked;
        let (legacy_sql, target_sql) = if plan.locking {
            match (
                crate::routing::classify::without_locks(&job.sql),
                crate::routing::classify::without_locks(target_sql),
            ) {
                (Some(l), Some(t)) => {
                    unlocked = (l, t);
                    (unlocked.0.as_str(), unlocked.1.as_str())
                }
                _ => return skipped(Skip::NotRewritable, None),
            }
        } else {
            (&*job.sql, target_sql.as_str())
        };

        // Each side on committed data (autocommit).
        let legacy = self.run(legacy_sql, job).await;
        let target = self.run(target_sql, job).await;
        let latency = match (&legacy, &target) {
            (Side::Answer(_, l), Side::Answer(_, t)) => Some((*l, *t)),
            _ => None,
        };
        match judge(&legacy, &target, &order, &options) {
            Judged::Agree => return count(Outcome::Match, latency),
            Judged::NoVerdict(why) => return skipped(why, latency),
            Judged::Differ { .. } => {}
        }

        // Again, both sides in one snapshot.
        if self
            .client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .is_err()
        {
            return skipped(Skip::Unreachable, latency);
        }
        let legacy = self.side_in_snapshot(legacy_sql, job).await;
        let target = self.side_in_snapshot(target_sql, job).await;
        if let (Some(keys), Side::Answer(..), Side::Answer(t, _)) = (&cut, &legacy, &target) {
            match self.cut_is_valid(job, legacy_sql, t, keys, &options).await {
                Ok(true) => {
                    let _ = self.client.batch_execute("COMMIT").await;
                    return count(Outcome::Match, latency);
                }
                Ok(false) => {}
                Err(why) => {
                    let _ = self.client.batch_execute("ROLLBACK").await;
                    return skipped(why, latency);
                }
            }
        }
        let (kind, diff, columns) = match judge(&legacy, &target, &order, &options) {
            Judged::Agree => {
                let _ = self.client.batch_execute("COMMIT").await;
                return count(Outcome::Transient, latency);
            }
            Judged::NoVerdict(why) => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                return skipped(why, latency);
            }
            Judged::Differ { diff, columns } => {
                let kind = match (&legacy, &target, &diff) {
                    (Side::Answer(l, _), Side::Answer(t, _), Some(d)) => {
                        let answers = (l, t, &order, &options);
                        match self.on_target_rows(job, legacy_sql, answers).await {
                            Some(kind) => kind,
                            None => {
                                let keys = involved_keys(job, &job.rules, l, d);
                                self.classify_rows(&job.rules, &keys).await
                            }
                        }
                    }
                    _ => Kind::Error,
                };
                (kind, diff, columns)
            }
        };
        let _ = self.client.batch_execute("COMMIT").await;

        let expected = shadow.store.expected_class(
            &job.rules.expected_of(&typed.query_type),
            &typed.query_type,
            kind,
            &columns,
        );
        let outcome = match expected {
            Some(_) => Outcome::Expected,
            None => Outcome::Confirmed(kind),
        };
        if expected.is_none() {
            tracing::info!(query_type = %typed.query_type, kind = kind.as_str(), columns = ?columns, "confirmed divergence");
        }
        // The sample before the count: whoever sees the count finds the sample stored too.
        if shadow
            .store
            .wants_sample(&typed.query_type, kind, expected.as_deref())
        {
            let error = |side: &Side| match side {
                Side::Failed { code, message } => Some(redact::error(code, message)),
                _ => None,
            };
            let answer_columns = match &legacy {
                Side::Answer(a, _) => a.columns.clone(),
                _ => match &target {
                    Side::Answer(a, _) => a.columns.clone(),
                    _ => Vec::new(),
                },
            };
            shadow.store.sample(Sample {
                query_type: typed.query_type.clone(),
                fingerprint: typed.fingerprint.id.clone(),
                kind,
                expected_class: expected,
                columns,
                legacy_sql: redact::sql(legacy_sql),
                target_sql: redact::sql(target_sql),
                params: redact::params(&job.params, &plan.bound_columns, &job.rules.redaction),
                diff: diff.map_or(serde_json::Value::Null, |d| {
                    redact::diff(
                        &d,
                        &answer_columns,
                        &options.ignore_columns,
                        &job.rules.redaction,
                    )
                }),
                legacy_error: error(&legacy),
                target_error: error(&target),
                latency,
                rules_version: job.rules.version.clone(),
            });
        }
        count(outcome, latency);
    }

    /// Runs one side inside the open snapshot, under a savepoint so that a failing side
    /// leaves the transaction usable for the other.
    async fn side_in_snapshot(&mut self, sql: &str, job: &Job) -> Side {
        if self
            .client
            .batch_execute("SAVEPOINT cutover_side")
            .await
            .is_err()
        {
            return Side::NoVerdict(Skip::Unreachable);
        }
        let side = self.run(sql, job).await;
        let undo = match side {
            Side::Answer(..) => "RELEASE SAVEPOINT cutover_side",
            _ => "ROLLBACK TO SAVEPOINT cutover_side",
        };
        let _ = self.client.batch_execute(undo).await;
        side
    }

    async fn run(&mut self, sql: &str, job: &Job) -> Side {
        let started = Instant::now();
        // The server's statement_timeout ends a slow statement; this bounds a server that
        // stopped answering at all.
        let deadline = Duration::from_secs(30);
        let result = tokio::time::timeout(deadline, async {
            let statement = self.prepare(sql, &job.param_types, job.inline).await?;
            let stream = self.client.query_raw(&statement, job.params.iter()).await?;
            futures_util::pin_mut!(stream);
            let mut rows = Vec::new();
            while let Some(row) = stream.try_next().await? {
                if rows.len() == MAX_ROWS {
                    return Ok(None);
                }
                rows.push(row);
            }
            Ok::<_, tokio_postgres::Error>(Some(Answer::from_rows(statement.columns(), &rows)))
        })
        .await;
        match result {
            Err(_) => {
                // The connection is in an unknown state: start afresh.
                self.broken = true;
                Side::NoVerdict(Skip::Unreachable)
            }
            Ok(Ok(Some(answer))) => Side::Answer(answer, started.elapsed()),
            Ok(Ok(None)) => Side::NoVerdict(Skip::TooManyRows),
            Ok(Err(e)) => match e.as_db_error() {
                Some(db) if *db.code() == SqlState::QUERY_CANCELED => {
                    metrics::counter!("cutover_shadow_timeouts_total").increment(1);
                    Side::NoVerdict(Skip::Timeout)
                }
                Some(db) if *db.code() == SqlState::FEATURE_NOT_SUPPORTED => {
                    // "cached plan must not change result type" after DDL: prepare again next time.
                    self.statements.clear();
                    Side::NoVerdict(Skip::Stale)
                }
                Some(db) => Side::Failed {
                    code: db.code().code().to_owned(),
                    message: db.message().to_owned(),
                },
                None => Side::NoVerdict(Skip::Unreachable),
            },
        }
    }

    async fn prepare(
        &mut self,
        sql: &str,
        types: &Arc<[u32]>,
        inline: bool,
    ) -> Result<Statement, tokio_postgres::Error> {
        let key = (sql.to_owned(), Arc::clone(types));
        if let Some(s) = self.statements.get(&key) {
            return Ok(s.clone());
        }
        let types: Vec<Type> = types
            .iter()
            .map(|&oid| crate::routing::route::check::type_of(oid))
            .collect();
        let statement = self.client.prepare_typed(sql, &types).await?;
        // Statements with their values inline are one-offs: not worth keeping.
        if !inline {
            if self.statements.len() >= STATEMENT_CACHE {
                self.statements.clear();
            }
            self.statements.insert(key, statement.clone());
        }
        Ok(statement)
    }

    /// Whether the target's answer to `ORDER BY … LIMIT n` (keys that may tie) is one
    /// legacy's statement could have given, against legacy's answer with a larger LIMIT in
    /// the open snapshot.
    async fn cut_is_valid(
        &mut self,
        job: &Job,
        legacy_sql: &str,
        target: &Answer,
        keys: &[Key],
        options: &compare::Options,
    ) -> Result<bool, Skip> {
        let longer = crate::routing::classify::with_limit(legacy_sql, MAX_ROWS)
            .ok_or(Skip::NotRewritable)?;
        match self.side_in_snapshot(&longer, job).await {
            Side::Answer(all, _) => {
                let complete = all.rows.len() < MAX_ROWS;
                match compare::compare_cut(&all, complete, target, keys, options) {
                    Some(Verdict::Match) => Ok(true),
                    Some(Verdict::Diverged(_)) => Ok(false),
                    None => Err(Skip::TooManyRows),
                }
            }
            Side::NoVerdict(why) => Err(why),
            // Legacy's own statement failing with a longer LIMIT: judged as usual.
            Side::Failed { .. } => Ok(false),
        }
    }

    /// Drift or rewrite bug, decided by what the statement itself reads: the legacy
    /// statement run in the open snapshot on the target's rows mapped back to legacy's
    /// columns (the rewriter's substitution). Its answer equal to the target's, not
    /// legacy's: the target SQL computes what legacy's would on v2's rows, so the rows differ
    /// where the statement looks — drift. Equal to legacy's, not the target's: the rows agree
    /// for this statement and the target SQL does not — a rewrite bug (an order, a bound, a
    /// condition; aggregates and recursive CTEs alike). Neither: `None`, decided by keys.
    async fn on_target_rows(
        &mut self,
        job: &Job,
        legacy_sql: &str,
        (legacy, target, order, options): (&Answer, &Answer, &Order, &compare::Options),
    ) -> Option<Kind> {
        if !job.typed().is_some_and(|t| t.explicit_target) {
            // Rewritten by the proxy: the target SQL is the statement itself on the target's
            // rows already.
            return Some(Kind::Drift);
        }
        let Rewrite::Target(mapped) =
            crate::routing::rewrite::Rewriter::new(&job.rules.table).rewrite(legacy_sql)
        else {
            return None;
        };
        let Side::Answer(on_target, _) = self.side_in_snapshot(&mapped, job).await else {
            return None;
        };
        let agrees = |a: &Answer, b: &Answer| {
            matches!(compare::compare(a, b, order, options), Verdict::Match)
        };
        match (agrees(legacy, &on_target), agrees(&on_target, target)) {
            (true, false) => Some(Kind::RewriteBug),
            (false, true) => Some(Kind::Drift),
            _ => None,
        }
    }

    /// Drift or rewrite bug: whether the two tables' rows differ for `keys`, in the open
    /// snapshot.
    async fn classify_rows(&self, rules: &RuleSet, keys: &[i64]) -> Kind {
        if keys.is_empty() {
            return Kind::Undetermined;
        }
        let table = &rules.table;
        let key = quote_ident(&table.key);
        let differs = crate::routing::rules::any_differs_sql(&table.columns);
        let sql = format!(
            "SELECT count(*) FROM (SELECT * FROM {legacy} WHERE {key} = ANY($1::int8[])) l
             FULL JOIN (SELECT * FROM {target} WHERE {key} = ANY($1::int8[])) t ON l.{key} = t.{key}
             WHERE l.{key} IS NULL OR t.{key} IS NULL OR {differs}",
            legacy = table.legacy.quoted(),
            target = table.target.quoted(),
        );
        match self.client.query_one(&sql, &[&keys]).await {
            Ok(row) if row.get::<_, i64>(0) > 0 => Kind::Drift,
            Ok(_) => Kind::RewriteBug,
            Err(error) => {
                tracing::debug!(%error, "shadow: cannot compare the rows of the keys involved");
                Kind::Undetermined
            }
        }
    }
}

fn options(rule: Option<&QueryType>, rules: &RuleSet) -> compare::Options {
    compare::Options {
        numeric_tolerance: rule
            .map(|r| r.compare.numeric_tolerance)
            .unwrap_or_default(),
        float_tolerance: rule.map_or(0.0, |r| r.compare.float_tolerance),
        ignore_columns: rule
            .map(|r| r.compare.ignore_columns.clone())
            .unwrap_or_default(),
        key_column: Some(rules.table.key.clone()),
    }
}

fn judge(legacy: &Side, target: &Side, order: &Order, options: &compare::Options) -> Judged {
    match (legacy, target) {
        (Side::NoVerdict(why), _) | (_, Side::NoVerdict(why)) => Judged::NoVerdict(*why),
        (Side::Answer(l, _), Side::Answer(t, _)) => match compare::compare(l, t, order, options) {
            Verdict::Match => Judged::Agree,
            Verdict::Diverged(diff) => Judged::Differ {
                columns: differing_columns(&diff),
                diff: Some(diff),
            },
        },
        // Both refused the same way (a bad parameter, say): neither produced an answer, so
        // there is nothing to call a match.
        (Side::Failed { code: a, .. }, Side::Failed { code: b, .. }) if a == b => {
            Judged::NoVerdict(Skip::BothFailed)
        }
        _ => Judged::Differ {
            diff: None,
            columns: vec!["(error)".into()],
        },
    }
}

/// The output columns that differ; what is not about a column is named in parentheses.
fn differing_columns(diff: &compare::Diff) -> Vec<String> {
    let mut columns = BTreeSet::new();
    for row in &diff.changed {
        columns.extend(row.columns.iter().cloned());
    }
    if diff.shape.is_some() {
        columns.insert("(shape)".to_owned());
    }
    if !diff.only_legacy.is_empty() || !diff.only_target.is_empty() {
        columns.insert("(rows)".to_owned());
    }
    if diff.order_differs {
        columns.insert("(order)".to_owned());
    }
    columns.into_iter().collect()
}

/// The keys whose rows to check: those of the differing rows (when the answer has the key
/// column), and the parameters compared with the key column.
fn involved_keys(job: &Job, rules: &RuleSet, legacy: &Answer, diff: &compare::Diff) -> Vec<i64> {
    let key = rules.table.key.as_str();
    let mut keys = BTreeSet::new();
    let as_key = |v: &compare::Value| match v {
        compare::Value::Number(d) => i64::try_from(*d).ok(),
        compare::Value::Text(t) => t.parse().ok(),
        _ => None,
    };
    keys.extend(diff.changed.iter().filter_map(|r| as_key(&r.key)));
    if let Some(k) = legacy.columns.iter().position(|c| c == key) {
        for row in diff.only_legacy.iter().chain(&diff.only_target) {
            keys.extend(row.get(k).and_then(as_key));
        }
    }
    if let Some(typed) = job.typed()
        && let Some(plan) = &typed.read
    {
        for (&n, column) in &plan.bound_columns {
            if column == key
                && let Some(p) = job.params.get(n - 1)
            {
                keys.extend(redact::integer(p));
            }
        }
    }
    keys.into_iter().collect()
}

impl ToSql for Param {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.value {
            None => Ok(IsNull::Yes),
            Some(v) => {
                out.extend_from_slice(v);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        if self.binary {
            Format::Binary
        } else {
            Format::Text
        }
    }

    to_sql_checked!();
}
