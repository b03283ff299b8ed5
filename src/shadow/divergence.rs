//! The divergence store: what the shadow concluded, kept where every replica and every
//! reviewer sees it — the `cutover` schema of the control database.
//!
//! - Outcomes are counted in memory and added every second to `cutover.comparison_stats`
//!   (per query type and minute; one upsert per query type, so replicas add up), which the
//!   safety gate and the automatic ramp-down read. Counts survive a lost control database:
//!   they wait in memory (one small record per query type) and are added when it returns.
//! - Sampled divergences go to `cutover.divergences`: at most [`SAMPLES_PER_HOUR`] per query
//!   type, class (kind and reviewers' expected class) and hour over the whole fleet — one
//!   class filling its share leaves every other class its first examples — each with its SQL pair, redacted parameters and the
//!   differing rows (bounded by [`crate::shadow::compare::MAX_DIFF_ROWS`]). Older than
//!   [`RETENTION_DAYS`] they are deleted.
//! - Reviewers' marks (`cutover.divergence_marks`) and the rules' `compare.expected` turn a
//!   confirmed divergence of a known class into `expected`, counted apart.
//!
//! It never blocks the shadow on the database: samples wait in a bounded queue and are
//! dropped (and counted) when it is full.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use metrics::counter;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::tally::{Tallied, Tallies};
use crate::routing::rules::Expected;

/// Divergence samples kept per query type, class and hour.
pub const SAMPLES_PER_HOUR: i64 = 50;
/// How long samples and per-minute counts are kept.
pub const RETENTION_DAYS: i32 = 14;
/// Samples waiting for the database at most.
const PENDING_SAMPLES: usize = 256;

/// What a confirmed divergence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The two tables' rows differ for the keys involved.
    Drift,
    /// The rows agree, the queries do not.
    RewriteBug,
    /// One side failed (or both, differently).
    Error,
    /// No key to look the rows up by (an aggregate over many rows): not told apart.
    Undetermined,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Drift => "drift",
            Kind::RewriteBug => "rewrite_bug",
            Kind::Error => "error",
            Kind::Undetermined => "undetermined",
        }
    }
}

/// The outcome of one offered comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Match,
    /// Differed, then agreed inside one snapshot: a race with a write.
    Transient,
    /// The statement's answer is not determined (volatile function, LIMIT that may tie).
    Nondeterministic,
    /// Not compared: the shadow timed out, the answer was too large, the shadow database
    /// was unreachable.
    Skipped,
    /// The shadow queue was full.
    Dropped,
    /// Held in one snapshot.
    Confirmed(Kind),
    /// Held in one snapshot, of a class reviewers expect.
    Expected,
}

impl Outcome {
    /// Every `outcome` label of `cutover_comparisons_total`.
    pub const LABELS: [&'static str; 7] = [
        "match",
        "transient",
        "nondeterministic",
        "skipped",
        "error",
        "diverged",
        "expected",
    ];

    /// The `outcome` label of `cutover_comparisons_total`.
    pub fn label(self) -> &'static str {
        Self::LABELS[self.label_index()]
    }

    /// Where [`Self::label`] is in [`Self::LABELS`].
    fn label_index(self) -> usize {
        match self {
            Outcome::Match => 0,
            Outcome::Transient => 1,
            Outcome::Nondeterministic => 2,
            Outcome::Skipped | Outcome::Dropped => 3,
            Outcome::Confirmed(Kind::Error) => 4,
            Outcome::Confirmed(_) => 5,
            Outcome::Expected => 6,
        }
    }
}

impl From<Tallied> for Outcome {
    fn from(tallied: Tallied) -> Self {
        match tallied {
            Tallied::Dropped => Outcome::Dropped,
            Tallied::Nondeterministic => Outcome::Nondeterministic,
        }
    }
}

/// Counts of one query type since the last flush.
#[derive(Debug, Default, Clone)]
struct Counts {
    matched: i64,
    transient: i64,
    nondeterministic: i64,
    skipped: i64,
    dropped: i64,
    drift: i64,
    rewrite_bug: i64,
    errors: i64,
    undetermined: i64,
    expected: i64,
    timed: i64,
    legacy_us_sum: i64,
    target_us_sum: i64,
    legacy_us_max: i64,
    target_us_max: i64,
    legacy_hist: [i64; HIST_BUCKETS],
    target_hist: [i64; HIST_BUCKETS],
}

/// Upper bounds (µs) of the latency histogram's buckets; the last one is everything above.
pub const HIST_BOUNDS_US: [i64; HIST_BUCKETS - 1] = [
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000,
];
pub const HIST_BUCKETS: usize = 16;

/// Percentile `p` of a histogram, as the upper bound (ms) of the bucket it falls in.
pub fn percentile(hist: &[i64], p: f64) -> Option<f64> {
    let total: i64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * p).ceil() as i64;
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate().take(HIST_BUCKETS) {
        seen += n;
        if seen >= want {
            let bound = HIST_BOUNDS_US.get(i).copied().unwrap_or(10_000_000);
            return Some(bound as f64 / 1000.0);
        }
    }
    None
}

fn hist_bucket(us: i64) -> usize {
    HIST_BOUNDS_US
        .iter()
        .position(|b| us <= *b)
        .unwrap_or(HIST_BUCKETS - 1)
}

impl Counts {
    fn add(&mut self, outcome: Outcome, latency: Option<(Duration, Duration)>) {
        let slot = match outcome {
            Outcome::Match => &mut self.matched,
            Outcome::Transient => &mut self.transient,
            Outcome::Nondeterministic => &mut self.nondeterministic,
            Outcome::Skipped => &mut self.skipped,
            Outcome::Dropped => &mut self.dropped,
            Outcome::Confirmed(Kind::Drift) => &mut self.drift,
            Outcome::Confirmed(Kind::RewriteBug) => &mut self.rewrite_bug,
            Outcome::Confirmed(Kind::Error) => &mut self.errors,
            Outcome::Confirmed(Kind::Undetermined) => &mut self.undetermined,
            Outcome::Expected => &mut self.expected,
        };
        *slot += 1;
        if let Some((legacy, target)) = latency {
            let (l, t) = (micros(legacy), micros(target));
            self.timed += 1;
            self.legacy_us_sum += l;
            self.target_us_sum += t;
            self.legacy_us_max = self.legacy_us_max.max(l);
            self.target_us_max = self.target_us_max.max(t);
            self.legacy_hist[hist_bucket(l)] += 1;
            self.target_hist[hist_bucket(t)] += 1;
        }
    }

    fn merge(&mut self, other: &Counts) {
        self.matched += other.matched;
        self.transient += other.transient;
        self.nondeterministic += other.nondeterministic;
        self.skipped += other.skipped;
        self.dropped += other.dropped;
        self.drift += other.drift;
        self.rewrite_bug += other.rewrite_bug;
        self.errors += other.errors;
        self.undetermined += other.undetermined;
        self.expected += other.expected;
        self.timed += other.timed;
        self.legacy_us_sum += other.legacy_us_sum;
        self.target_us_sum += other.target_us_sum;
        self.legacy_us_max = self.legacy_us_max.max(other.legacy_us_max);
        self.target_us_max = self.target_us_max.max(other.target_us_max);
        for i in 0..HIST_BUCKETS {
            self.legacy_hist[i] += other.legacy_hist[i];
            self.target_hist[i] += other.target_hist[i];
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// One sampled divergence, redacted already.
#[derive(Debug, Clone)]
pub struct Sample {
    pub query_type: String,
    pub fingerprint: String,
    pub kind: Kind,
    pub expected_class: Option<String>,
    pub columns: Vec<String>,
    pub legacy_sql: String,
    pub target_sql: String,
    pub params: serde_json::Value,
    pub diff: serde_json::Value,
    pub legacy_error: Option<String>,
    pub target_error: Option<String>,
    pub latency: Option<(Duration, Duration)>,
    pub rules_version: String,
}

/// A reviewer's mark, as loaded from `cutover.divergence_marks`.
#[derive(Debug, Clone)]
struct Mark {
    query_type: String,
    kind: String,
    columns: Vec<String>,
    class: String,
}

/// The store of one proxy.
/// Automatic query types seen by this replica, and the (id, normalized text) still to write.
#[derive(Default)]
struct Fingerprints(std::collections::HashSet<String>, Vec<(String, String)>);

/// Automatic query types a replica remembers the text of (beyond: not recorded).
const MAX_FINGERPRINTS: usize = 10_000;

pub struct Store {
    counts: Mutex<Fast<String, Counts>>,
    samples: Mutex<Vec<Sample>>,
    /// Samples taken this hour by this replica, per query type (the database bounds the
    /// fleet; this spares it the attempts).
    sampled: Mutex<(i64, HashMap<String, i64>)>,
    marks: ArcSwap<Vec<Mark>>,
    replica: String,
    /// Automatic query types' normalized texts.
    fingerprints: Mutex<Fingerprints>,
    /// The metrics of each query type label, looked up once: building a labelled key per
    /// comparison (three of them) cost more than the rest of the counting.
    handles: Mutex<Fast<String, LabelMetrics>>,
    /// `cutover_shadow_dropped_total`, registered at the first drop (after the exporter is
    /// installed), counted without a lookup after.
    dropped: std::sync::OnceLock<metrics::Counter>,
    /// What the relay's threads count, without the locks above (see `tally`).
    tallies: Tallies,
}

/// A map on the statements' path (a count per comparison, and per drop on the relay's
/// thread), keyed by rule names and fingerprints: foldhash, seeded per process, as the
/// session's statement names are (SipHash cost ~700 instructions per count, before).
type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One query type label's comparison metrics.
struct LabelMetrics {
    /// `cutover_comparisons_total` by outcome, in the order of [`Outcome::LABELS`].
    outcomes: [metrics::Counter; 7],
    legacy: metrics::Histogram,
    target: metrics::Histogram,
}

impl LabelMetrics {
    fn new(label: &str) -> Self {
        Self {
            outcomes: Outcome::LABELS.map(|outcome| {
                counter!("cutover_comparisons_total", "query_type" => label.to_owned(), "outcome" => outcome)
            }),
            legacy: metrics::histogram!("cutover_shadow_duration_seconds", "query_type" => label.to_owned(), "side" => "legacy"),
            target: metrics::histogram!("cutover_shadow_duration_seconds", "query_type" => label.to_owned(), "side" => "target"),
        }
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            counts: Mutex::default(),
            samples: Mutex::default(),
            sampled: Mutex::default(),
            marks: ArcSwap::from_pointee(Vec::new()),
            fingerprints: Mutex::default(),
            handles: Mutex::default(),
            dropped: std::sync::OnceLock::new(),
            tallies: Tallies::default(),
            replica: format!(
                "{}:{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "cutover".into()),
                std::process::id()
            ),
        }
    }

    /// Counts one outcome (and both sides' latency, when both ran) for `query_type`;
    /// `label` is its metrics label (the rule's name, or `automatic`).
    pub fn count(
        &self,
        query_type: &str,
        label: &str,
        outcome: Outcome,
        latency: Option<(Duration, Duration)>,
    ) {
        self.label_metrics(label, |metrics| {
            metrics.outcomes[outcome.label_index()].increment(1);
            if let Some((legacy, target)) = latency {
                metrics.legacy.record(legacy.as_secs_f64());
                metrics.target.record(target.as_secs_f64());
            }
        });
        if outcome == Outcome::Dropped {
            self.count_dropped();
        }
        // A poisoned lock only means another thread panicked mid-add: the counts are still
        // numbers; keep counting.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(query_type) {
            Some(c) => c.add(outcome, latency),
            None => counts
                .entry(query_type.to_owned())
                .or_default()
                .add(outcome, latency),
        }
    }

    /// Counts one outcome a relay thread sees (a read dropped, or not determined) for
    /// `query_type`, labelled `label`, without a lock the shadow's threads take (but the
    /// first time for a query type, to find its label's metrics).
    pub fn tally(&self, query_type: &str, label: &str, tallied: Tallied) {
        let metrics = || {
            self.label_metrics(label, |m| {
                Tallied::ALL.map(|t| m.outcomes[Outcome::from(t).label_index()].clone())
            })
        };
        if !self.tallies.add(query_type, tallied, metrics) {
            // Past the tallies' bound: counted under the locks, as the shadow counts.
            return self.count(query_type, label, tallied.into(), None);
        }
        if tallied == Tallied::Dropped {
            self.count_dropped();
        }
    }

    /// `f` on the metrics of query type label `label`, registered the first time.
    fn label_metrics<R>(&self, label: &str, f: impl FnOnce(&LabelMetrics) -> R) -> R {
        // Poisoned: another thread panicked mid-insert; the handles are still handles.
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        let metrics = match handles.get(label) {
            Some(metrics) => metrics,
            None => handles
                .entry(label.to_owned())
                .or_insert_with(|| LabelMetrics::new(label)),
        };
        f(metrics)
    }

    fn count_dropped(&self) {
        self.dropped
            .get_or_init(|| counter!("cutover_shadow_dropped_total"))
            .increment(1);
    }

    /// Whether this replica may still sample a divergence of `query_type` of this class
    /// (`kind`, and the reviewers' class when it was expected) this hour.
    pub fn wants_sample(&self, query_type: &str, kind: Kind, expected: Option<&str>) -> bool {
        let hour = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64 / 3600);
        let mut sampled = self.sampled.lock().unwrap_or_else(|e| e.into_inner());
        if sampled.0 != hour {
            *sampled = (hour, HashMap::new());
        }
        let class = format!(
            "{query_type}\0{}\0{}",
            kind.as_str(),
            expected.unwrap_or_default()
        );
        let n = sampled.1.entry(class).or_default();
        *n += 1;
        *n <= SAMPLES_PER_HOUR
    }

    /// Queues a sample for the database (dropped when too many wait).
    pub fn sample(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() < PENDING_SAMPLES {
            samples.push(sample);
        } else {
            counter!("cutover_divergence_samples_dropped_total").increment(1);
        }
    }

    /// The class a confirmed divergence belongs to if reviewers expect it: a reviewer's mark
    /// of this query type and kind, or one of the rules' `compare.expected` of this kind,
    /// whose columns hold every differing column. Divergences that are not about columns (missing rows,
    /// another shape, an error) are never expected by column.
    pub fn expected_class(
        &self,
        rules: &[Expected],
        query_type: &str,
        kind: Kind,
        columns: &[String],
    ) -> Option<String> {
        if columns.is_empty() || columns.iter().any(|c| c.starts_with('(')) {
            return None;
        }
        let covers = |expected: &[String]| columns.iter().all(|c| expected.contains(c));
        let marks = self.marks.load();
        marks
            .iter()
            .find(|m| m.query_type == query_type && m.kind == kind.as_str() && covers(&m.columns))
            .map(|m| m.class.clone())
            .or_else(|| {
                (kind != Kind::Error)
                    .then(|| {
                        rules
                            .iter()
                            .find(|e| e.kind == kind.as_str() && covers(&e.columns))
                    })
                    .flatten()
                    .map(|e| e.class.clone())
            })
    }

    /// Writes what accumulated, every second, until shutdown (then once more).
    pub async fn run(
        self: Arc<Self>,
        database: tokio_postgres::Config,
        shutdown: CancellationToken,
    ) {
        let mut client: Option<Client> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            let stop = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = tick.tick() => false,
            };
            ticks += 1;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = crate::net::connect::connect_as(&database, "cutover divergences")
                    .await
                    .inspect_err(|e| tracing::debug!(error = %e, "divergence store: no database"))
                    .ok();
            }
            if let Some(c) = &client {
                if let Err(error) = self.flush(c).await {
                    let error = error
                        .as_db_error()
                        .map_or(error.to_string(), |e| e.to_string());
                    tracing::warn!(%error, "divergence store: cannot write; will retry");
                }
                if ticks % 2 == 1
                    && let Err(error) = self.load_marks(c).await
                {
                    tracing::debug!(%error, "divergence store: cannot read marks");
                }
                if ticks % 600 == 1
                    && let Err(error) = expire(c).await
                {
                    tracing::debug!(%error, "divergence store: cannot expire old rows");
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Remembers an automatic query type's normalized text (written once per replica, into
    /// `cutover.fingerprints`, for operators and `cutover rules promote`).
    pub fn fingerprint(&self, id: &str, normalized: &str) {
        let mut fingerprints = self.fingerprints.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up first: on a statement's path, a type already seen allocates nothing.
        if fingerprints.0.contains(id) || fingerprints.0.len() >= MAX_FINGERPRINTS {
            return;
        }
        fingerprints.0.insert(id.to_owned());
        fingerprints.1.push((id.to_owned(), normalized.to_owned()));
    }

    /// Adds the pending counts and inserts the pending samples; what fails stays pending.
    pub async fn flush(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let pending = std::mem::take(
            &mut self
                .fingerprints
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1,
        );
        for (n, (id, normalized)) in pending.iter().enumerate() {
            if let Err(e) = client
                .execute(
                    "INSERT INTO cutover.fingerprints (fingerprint, normalized) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[id, normalized],
                )
                .await
            {
                let mut fingerprints = self.fingerprints.lock().unwrap_or_else(|e| e.into_inner());
                fingerprints.1.extend(pending[n..].iter().cloned());
                return Err(e);
            }
        }
        // Samples first: a count seen in the database has its sample stored already.
        let mut samples =
            std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        while !samples.is_empty() {
            if let Err(e) = insert_sample(client, &samples[0], &self.replica).await {
                // Kept for the next flush (the queue stays bounded: `sample` drops past it).
                let mut pending = self.samples.lock().unwrap_or_else(|e| e.into_inner());
                samples.append(&mut pending);
                *pending = samples;
                return Err(e);
            }
            samples.remove(0);
        }
        let counts = {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            self.tallies
                .drain(|query_type, [dropped, nondeterministic]| {
                    let c = counts.entry(query_type.to_owned()).or_default();
                    c.dropped += dropped;
                    c.nondeterministic += nondeterministic;
                });
            std::mem::take(&mut *counts)
        };
        let mut failed: Option<tokio_postgres::Error> = None;
        let mut unwritten = Fast::default();
        for (query_type, c) in counts {
            if failed.is_some() {
                unwritten.insert(query_type, c);
                continue;
            }
            if let Err(e) = upsert(client, &query_type, &c).await {
                failed = Some(e);
                unwritten.insert(query_type, c);
            }
        }
        if !unwritten.is_empty() {
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            for (query_type, c) in unwritten {
                counts.entry(query_type).or_default().merge(&c);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn load_marks(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT query_type, kind, columns, class FROM cutover.divergence_marks",
                &[],
            )
            .await?;
        let marks = rows
            .iter()
            .map(|r| Mark {
                query_type: r.get(0),
                kind: r.get(1),
                columns: r.get(2),
                class: r.get(3),
            })
            .collect();
        self.marks.store(Arc::new(marks));
        Ok(())
    }
}

/// A reviewer's request to mark a class of divergence as expected.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MarkRequest {
    pub query_type: String,
    /// drift, rewrite_bug, error or undetermined.
    pub kind: String,
    /// The output columns the divergences of this class differ in.
    pub columns: Vec<String>,
    /// A short name for the class (e.g. `counter_drift`).
    pub class: String,
    /// Why it is expected.
    pub note: String,
}

impl MarkRequest {
    /// Every problem with the request, or none.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.query_type.trim().is_empty() {
            problems.push("query_type: required".to_owned());
        }
        if ![
            Kind::Drift,
            Kind::RewriteBug,
            Kind::Error,
            Kind::Undetermined,
        ]
        .iter()
        .any(|k| k.as_str() == self.kind)
        {
            problems.push(format!(
                "kind: {:?} is not one of drift, rewrite_bug, error, undetermined",
                self.kind
            ));
        }
        if self.columns.is_empty() || self.columns.iter().any(|c| c.trim().is_empty()) {
            problems.push("columns: at least one column name".to_owned());
        }
        if self.class.trim().is_empty() {
            problems.push("class: required (a short name, e.g. counter_drift)".to_owned());
        }
        if self.note.trim().is_empty() {
            problems.push("note: required (why this divergence is expected)".to_owned());
        }
        problems
    }
}

/// Records (or updates) a reviewer's mark; every replica applies it within two seconds.
pub async fn mark(
    client: &Client,
    request: &MarkRequest,
    who: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO cutover.divergence_marks (query_type, kind, columns, class, note, marked_by)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (query_type, kind, class) DO UPDATE
             SET columns = EXCLUDED.columns, note = EXCLUDED.note,
                 marked_by = EXCLUDED.marked_by, marked_at = now()",
            &[
                &request.query_type,
                &request.kind,
                &request.columns,
                &request.class,
                &request.note,
                &who,
            ],
        )
        .await
        .map(drop)
}

async fn upsert(
    client: &Client,
    query_type: &str,
    c: &Counts,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO cutover.comparison_stats AS s
                 (query_type, minute, matched, confirmed, transient, nondeterministic, skipped,
                  dropped, drift, rewrite_bug, errors, undetermined, expected, timed,
                  legacy_us_sum, target_us_sum, legacy_us_max, target_us_max,
                  legacy_us_hist, target_us_hist)
             VALUES ($1, date_trunc('minute', now()), $2, $3::int8 + $4::int8 + $5::int8 + $6::int8, $7, $8, $9, $10,
                     $3, $4, $5, $6, $11, $12, $13, $14, $15, $16, $17, $18)
             ON CONFLICT (query_type, minute) DO UPDATE SET
                 matched = s.matched + EXCLUDED.matched,
                 confirmed = s.confirmed + EXCLUDED.confirmed,
                 transient = s.transient + EXCLUDED.transient,
                 nondeterministic = s.nondeterministic + EXCLUDED.nondeterministic,
                 skipped = s.skipped + EXCLUDED.skipped,
                 dropped = s.dropped + EXCLUDED.dropped,
                 drift = s.drift + EXCLUDED.drift,
                 rewrite_bug = s.rewrite_bug + EXCLUDED.rewrite_bug,
                 errors = s.errors + EXCLUDED.errors,
                 undetermined = s.undetermined + EXCLUDED.undetermined,
                 expected = s.expected + EXCLUDED.expected,
                 timed = s.timed + EXCLUDED.timed,
                 legacy_us_sum = s.legacy_us_sum + EXCLUDED.legacy_us_sum,
                 target_us_sum = s.target_us_sum + EXCLUDED.target_us_sum,
                 legacy_us_max = greatest(s.legacy_us_max, EXCLUDED.legacy_us_max),
                 target_us_max = greatest(s.target_us_max, EXCLUDED.target_us_max),
                 legacy_us_hist = cutover.hist_add(s.legacy_us_hist, EXCLUDED.legacy_us_hist),
                 target_us_hist = cutover.hist_add(s.target_us_hist, EXCLUDED.target_us_hist)",
            &[
                &query_type,
                &c.matched,
                &c.drift,
                &c.rewrite_bug,
                &c.errors,
                &c.undetermined,
                &c.transient,
                &c.nondeterministic,
                &c.skipped,
                &c.dropped,
                &c.expected,
                &c.timed,
                &c.legacy_us_sum,
                &c.target_us_sum,
                &c.legacy_us_max,
                &c.target_us_max,
                &c.legacy_hist.to_vec(),
                &c.target_hist.to_vec(),
            ],
        )
        .await
        .map(drop)
}

async fn insert_sample(
    client: &Client,
    s: &Sample,
    replica: &str,
) -> Result<(), tokio_postgres::Error> {
    let (legacy_us, target_us) = s
        .latency
        .map(|(l, t)| (Some(micros(l)), Some(micros(t))))
        .unwrap_or((None, None));
    // The fleet-wide bound (per query type and class) is checked by the insert itself.
    client
        .execute(
            "INSERT INTO cutover.divergences
                 (query_type, fingerprint, kind, expected_class, columns, legacy_sql, target_sql,
                  params, diff, legacy_error, target_error, legacy_us, target_us, rules_version,
                  replica)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15
             WHERE (SELECT count(*) FROM cutover.divergences
                    WHERE query_type = $1 AND kind = $3 AND expected_class IS NOT DISTINCT FROM $4
                      AND found_at > now() - interval '1 hour') < $16",
            &[
                &s.query_type,
                &s.fingerprint,
                &s.kind.as_str(),
                &s.expected_class,
                &s.columns,
                &s.legacy_sql,
                &s.target_sql,
                &s.params,
                &s.diff,
                &s.legacy_error,
                &s.target_error,
                &legacy_us,
                &target_us,
                &s.rules_version,
                &replica,
                &SAMPLES_PER_HOUR,
            ],
        )
        .await
        .map(drop)
}

async fn expire(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM cutover.divergences WHERE found_at < now() - make_interval(days => $1)",
            &[&RETENTION_DAYS],
        )
        .await?;
    client
        .execute(
            "DELETE FROM cutover.comparison_stats WHERE minute < now() - make_interval(days => $1)",
            &[&RETENTION_DAYS],
        )
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_buckets() {
        let mut hist = vec![0i64; HIST_BUCKETS];
        hist[0] = 90; // ≤ 0.1 ms
        hist[3] = 9; // ≤ 1 ms
        hist[6] = 1; // ≤ 10 ms
        assert_eq!(percentile(&hist, 0.5), Some(0.1));
        assert_eq!(percentile(&hist, 0.95), Some(1.0));
        assert_eq!(percentile(&hist, 0.99), Some(1.0));
        assert_eq!(percentile(&hist, 1.0), Some(10.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
