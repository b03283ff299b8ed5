//! The control plane: live state of every query type, shared by all replicas through the
//! `cutover` schema (migrations 0006 and 0009).
//!
//! - [`Control::run`] keeps this replica's copy of `cutover.query_type_state` current: it
//!   LISTENs on `cutover_state` (a trigger notifies every change, whoever makes it) and
//!   reloads on each notification; a replica that loses the control database keeps serving
//!   with its last state, reconnects every second, and reloads everything when it is back.
//! - [`set_stage`] changes one query type: the safety gate, the change and its audit row in
//!   one transaction.
//! - When a proxy starts, the rules' baseline is written for query types that have no live
//!   state yet ([`seed_query_types`]).
//!
//! Never blocks or fails the proxy: a control database that cannot be reached is logged.

pub mod behaviour;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use serde::Serialize;
use tokio_postgres::{AsyncMessage, Client, error::SqlState};
use tokio_util::sync::CancellationToken;

use crate::rules::{Percent, RuleSet, Stage};

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
    stage_of(stage, percent).map_or_else(|_| stage.to_owned(), describe)
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

/// How far a stage serves from the target, to tell a raise from a step back: 0 legacy and
/// shadow, the percent in cutover, 100 target, 101 complete.
fn served_by_target(stage: Stage) -> u16 {
    match stage {
        Stage::Legacy | Stage::Shadow => 0,
        Stage::Cutover(p) => u16::from(p.get()),
        Stage::Target => 100,
        Stage::Complete => 101,
    }
}

/// One query type's live state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryTypeState {
    pub query_type: String,
    pub stage: String,
    pub percent: i16,
    pub dual_write: String,
    pub updated_at: String,
}

/// This replica's copy of the live state.
#[derive(Debug, Default)]
pub struct LiveState {
    pub by_type: HashMap<String, QueryTypeState>,
    /// The stage of each query type, parsed once per load (sessions read it per statement).
    stages: HashMap<String, Stage>,
}

impl LiveState {
    pub fn new(states: Vec<QueryTypeState>) -> Self {
        let stages = states
            .iter()
            .filter_map(|s| {
                // The percent counts only with `cutover`: a row changed by hand
                // (`SET stage = 'shadow'`) keeps its old percent and is still a stage.
                let percent = (s.stage == "cutover").then_some(i64::from(s.percent));
                let stage = stage_of(&s.stage, percent).ok()?;
                Some((s.query_type.clone(), stage))
            })
            .collect();
        let by_type = states
            .into_iter()
            .map(|s| (s.query_type.clone(), s))
            .collect();
        Self { by_type, stages }
    }

    /// A query type's live stage, if the live state has one that parses.
    pub fn stage(&self, query_type: &str) -> Option<Stage> {
        self.stages.get(query_type).copied()
    }
}

/// The control plane of one proxy.
pub struct Control {
    config: Option<tokio_postgres::Config>,
    rules: ArcSwap<RuleSet>,
    live: ArcSwap<LiveState>,
    connected: AtomicBool,
    /// Whether the table's writes are served by the target: every rule-named write type is
    /// at `target` or `complete` (docs/routing.md, "One transaction, one write side").
    writes_to_target: AtomicBool,
    /// Refused cycles seen on statements v2 served, not yet added to
    /// `cutover.behaviour_change_stats` (every 5 seconds).
    refused_cycles: std::sync::atomic::AtomicI64,
}

impl Control {
    pub fn new(config: Option<tokio_postgres::Config>, rules: Arc<RuleSet>) -> Self {
        Self {
            config,
            rules: ArcSwap::new(rules),
            live: ArcSwap::from_pointee(LiveState::default()),
            connected: AtomicBool::new(false),
            refused_cycles: std::sync::atomic::AtomicI64::new(0),
            writes_to_target: AtomicBool::new(false),
        }
    }

    /// The rules from now on (after a reload): their query types are the gauges' labels.
    pub fn set_rules(&self, rules: Arc<RuleSet>) {
        self.rules.store(rules);
        self.publish();
    }

    /// `cutover_stage_percent{query_type}`: the share served by the target, per rule-named
    /// query type (0 in legacy and shadow, N in cutover N%, 100 in target and complete).
    /// Also decides the table's write side from the write types' stages.
    fn publish(&self) {
        let live = self.live.load();
        let rules = self.rules.load();
        let mut write_types = 0;
        let mut at_target = 0;
        for qt in &rules.query_types {
            let stage = live.stage(&qt.name).unwrap_or(qt.stage);
            let percent = f64::from(served_by_target(stage).min(100));
            metrics::gauge!("cutover_stage_percent", "query_type" => qt.name.clone()).set(percent);
            if rules.writes(&qt.name) == Some(true) {
                write_types += 1;
                at_target += usize::from(matches!(stage, Stage::Target | Stage::Complete));
            }
        }
        let to_target = write_types > 0 && at_target == write_types;
        if self.writes_to_target.swap(to_target, Ordering::Relaxed) != to_target {
            tracing::info!(
                write_side = if to_target { "target" } else { "legacy" },
                "the table's write side changed (transactions already open keep theirs)"
            );
        }
    }

    /// Whether a transaction that starts writing now writes the target first: every
    /// rule-named write type is at `target` or `complete`.
    pub fn writes_to_target(&self) -> bool {
        self.writes_to_target.load(Ordering::Relaxed)
    }

    /// The last state loaded (empty before the first load, or without a control database).
    pub fn live(&self) -> Arc<LiveState> {
        self.live.load_full()
    }

    /// A query type's live stage (`None`: the live state has none; the rules' applies). On
    /// every statement's path: no reference count is taken.
    pub fn stage(&self, query_type: &str) -> Option<Stage> {
        self.live.load().stage(query_type)
    }

    /// Whether the change feed is connected now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// A connection of its own to the control database, for one request (API, console, ctl).
    pub async fn connect(&self) -> Result<Client, ChangeError> {
        let database = self.database().ok_or(ChangeError::NoControlDatabase)?;
        Ok(crate::connect::connect(database).await?)
    }

    pub fn database(&self) -> Option<&tokio_postgres::Config> {
        self.config.as_ref()
    }

    /// Seeds the state, then follows it until `shutdown`, reconnecting when it is lost.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(config) = self.config.clone() else {
            tracing::info!(
                "no control database (set --control, or a user in the upstream URL): stages come from the rules"
            );
            return;
        };
        let mut seeded = false;
        // Retried after 1 s, then up to every 5 s; the same error is logged once.
        let mut pause = Duration::from_secs(1);
        let mut retrying = crate::connect::Retrying::default();
        loop {
            let followed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.follow(&config, &mut seeded) => r,
            };
            metrics::gauge!("cutover_control_connected").set(0.0);
            if self.connected.swap(false, Ordering::Relaxed) {
                pause = Duration::from_secs(1);
                retrying.recovered();
            }
            if let Err(error) = followed {
                let error = crate::connect::cause(&error);
                if retrying.is_new(&error) {
                    tracing::warn!(%error, "control database unavailable: serving with the last state; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Every few seconds, sends back to shadow the query types whose confirmed divergences
    /// passed the bar ([`ramp_down`]), until `shutdown`. Every replica runs it; the first
    /// to see a query type diverging changes it, the others find it done.
    pub async fn ramp_down_loop(self: Arc<Self>, bar: RampDown, shutdown: CancellationToken) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let mut client: Option<Client> = None;
        let mut retrying = crate::connect::Retrying::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            if client.as_ref().is_none_or(Client::is_closed) {
                client = crate::connect::connect(&config).await.ok();
            }
            let Some(c) = client.as_mut() else { continue };
            if let Err(error) = self.flush_behaviour(c).await {
                tracing::warn!(%error, "behaviour changes seen could not be recorded; kept for the next try");
            }
            match ramp_down(c, bar).await {
                Ok(changed) => {
                    retrying.recovered();
                    let rules = self.rules.load();
                    for done in changed {
                        let label = if rules.query_types.iter().any(|q| q.name == done.query_type) {
                            done.query_type.clone()
                        } else {
                            "automatic".to_owned()
                        };
                        metrics::counter!("cutover_auto_rampdowns_total", "query_type" => label)
                            .increment(1);
                    }
                }
                Err(error) => {
                    let error = match &error {
                        ChangeError::Database(e) => crate::connect::cause(e),
                        other => other.to_string(),
                    };
                    if retrying.is_new(&error) {
                        tracing::warn!(%error, "automatic ramp-down check failed");
                    }
                }
            }
        }
    }

    /// An error on a statement v2 served is a behaviour change of `kind` (counted; recorded in
    /// the control database within 5 seconds for the gate and the report).
    pub fn behaviour_seen(&self, kind: crate::rules::changes::ChangeKind) {
        metrics::counter!("cutover_behaviour_changes_total", "kind" => kind.as_str()).increment(1);
        if kind == crate::rules::changes::ChangeKind::RefusedCycle {
            self.refused_cycles.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn flush_behaviour(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let n = self.refused_cycles.swap(0, Ordering::Relaxed);
        if n == 0 {
            return Ok(());
        }
        let done = client
            .execute(
                "INSERT INTO cutover.behaviour_change_stats AS s (kind, minute, occurred)
                 VALUES ('refused_cycle', date_trunc('minute', now()), $1)
                 ON CONFLICT (kind, minute) DO UPDATE SET occurred = s.occurred + EXCLUDED.occurred",
                &[&n],
            )
            .await;
        if done.is_err() {
            self.refused_cycles.fetch_add(n, Ordering::Relaxed);
        }
        done.map(drop)
    }

    /// One connection's life: LISTEN, load everything, reload on each notification.
    async fn follow(
        &self,
        config: &tokio_postgres::Config,
        seeded: &mut bool,
    ) -> Result<(), tokio_postgres::Error> {
        let mut config = config.clone();
        config.application_name("cutover control");
        let (client, mut connection) = config.connect(crate::tls::PostgresTls::shared()).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => {
                        if tx.send(()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(())
        });
        let result = async {
            if !*seeded {
                let new = seed_query_types(&client, &self.rules.load()).await?;
                tracing::info!(new, "query type state seeded from the rules");
                *seeded = true;
            }
            client.batch_execute("LISTEN cutover_state").await?;
            self.reload(&client).await?;
            self.connected.store(true, Ordering::Relaxed);
            metrics::gauge!("cutover_control_connected").set(1.0);
            // Each notification (or a burst of them) reloads the whole table: it is small.
            while rx.recv().await.is_some() {
                while rx.try_recv().is_ok() {}
                self.reload(&client).await?;
            }
            Ok(())
        }
        .await;
        pump.abort();
        match (result, pump.await) {
            (Err(e), _) => Err(e),
            (Ok(()), Ok(Err(e))) => Err(e),
            _ => Ok(()),
        }
    }

    async fn reload(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        self.live
            .store(Arc::new(LiveState::new(load(client).await?)));
        self.publish();
        Ok(())
    }
}

/// Every query type's live state.
pub async fn load(client: &Client) -> Result<Vec<QueryTypeState>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT query_type, stage, percent, dual_write,
                    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM cutover.query_type_state ORDER BY query_type",
            &[],
        )
        .await?
        .iter()
        .map(|r| QueryTypeState {
            query_type: r.get(0),
            stage: r.get(1),
            percent: r.get(2),
            dual_write: r.get(3),
            updated_at: r.get(4),
        })
        .collect())
}

/// Writes the rules' baseline into `cutover.query_type_state`; returns the query types
/// that had no state yet. The stage only where there is none (live changes win over the
/// files); the dual-write mode always (a reviewed rule option, not live state).
pub async fn seed_query_types(
    client: &Client,
    rules: &RuleSet,
) -> Result<u64, tokio_postgres::Error> {
    let statement = client
        .prepare(
            "INSERT INTO cutover.query_type_state AS s (query_type, stage, percent, dual_write)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (query_type) DO UPDATE SET dual_write = EXCLUDED.dual_write
                 WHERE s.dual_write <> EXCLUDED.dual_write
             RETURNING (xmax = 0) AS inserted",
        )
        .await?;
    let mut inserted = 0;
    for qt in &rules.query_types {
        let (stage, percent) = stage_columns(qt.stage);
        let mode = if qt.strict { "strict" } else { "isolated" };
        let rows = client
            .query(&statement, &[&qt.name, &stage, &percent, &mode])
            .await?;
        inserted += rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
    }
    Ok(inserted)
}

/// A stage change asked for.
#[derive(Debug, Clone)]
pub struct Change {
    pub query_type: String,
    pub stage: Stage,
    pub reason: String,
    /// Who: the API token's name, the SQL user, or `auto`.
    pub who: String,
    pub via: &'static str,
    pub force: bool,
    /// The query type writes: the shadow does not compare writes, so its gate is a clean
    /// `cutover verify` in the gate's window instead of compared samples.
    pub writes: bool,
    /// The behaviour changes the rules declare for it (and the kinds they do not).
    pub declared: behaviour::Declared,
}

/// The safety gate's bar (design.md): in the current window, this many compared samples
/// and this confirmed-match rate before a query type may serve more from the target.
pub const GATE_MIN_SAMPLES: i64 = 1000;
pub const GATE_MIN_MATCH_RATE: f64 = 0.95;
/// The gate refuses to raise a read type whose target p99 is more than this many times
/// legacy's in the window (issue 16: a migration must not make the application slower
/// without someone deciding so).
pub const GATE_MAX_P99_RATIO: f64 = 2.0;
/// Timed comparisons each side needs before its p99 is held against it.
pub const GATE_MIN_TIMED: i64 = 100;

/// What a change did, or why it was refused.
#[derive(Debug, Serialize)]
pub struct Changed {
    pub query_type: String,
    pub from: Option<String>,
    pub to: String,
    pub forced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "no query type {0:?} (not in the rules, and not an automatic type the shadow has seen)"
    )]
    UnknownQueryType(String),
    #[error("no control database: start the proxy with --control (or a user in the upstream URL)")]
    NoControlDatabase,
    #[error(transparent)]
    Unreachable(#[from] crate::connect::ConnectError),
    #[error(
        "refused by the safety gate: {samples} compared samples in the current window (need {min}), confirmed-match rate {rate} (need {bar:.0}%); force it with a reason if you must"
    )]
    Gate {
        samples: i64,
        min: i64,
        rate: String,
        bar: f64,
    },
    #[error(
        "refused by the safety gate: a write type moves on the evidence of a clean `cutover verify` in the last hour, and {last}; run it, or force with a reason if you must"
    )]
    WriteGate { last: String },
    #[error(
        "refused: v2 cannot serve before a backfill has completed ({state}); every write until then is handed to the backfill, so v2 would answer with rows it does not have yet. Run `cutover backfill` (forcing does not lift this)"
    )]
    NotBackfilled { state: String },
    #[error(
        "refused by the gate: v2 behaves differently here on purpose ({change}, {kind}; seen {observed} times) and no reviewer has accepted it: `cutover ctl accept {change} --reason …` (the report and `rules explain` say what it means), or force with a reason"
    )]
    Unaccepted {
        change: String,
        kind: crate::rules::changes::ChangeKind,
        observed: i64,
    },
    #[error(
        "refused by the gate: v2 behaved differently {observed} times ({kind}) and the rules declare no behaviour change of that kind: declare it ([[behaviour_change]], docs/rules.md) and have it accepted, or force with a reason"
    )]
    Undeclared {
        kind: crate::rules::changes::ChangeKind,
        observed: i64,
    },
    #[error(
        "refused by the gate: v2 is slower here: p99 {target_ms} ms against legacy's {legacy_ms} ms in the current window (the bar: at most {GATE_MAX_P99_RATIO}×). `cutover report` gives both sides' latency and the target's plan; give v2 what it needs (an index in a migration, a better target in the rules), or force with a reason if the slowdown is accepted"
    )]
    Slower { legacy_ms: f64, target_ms: f64 },
    #[error("no behaviour change {0:?} in the rules")]
    UnknownBehaviourChange(String),
    /// Switching dual-write's triggers waited too long for the application's writers
    /// (migration 0024): nothing changed; retry.
    #[error("not changed: {0}")]
    Busy(String),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// What kind of failure a [`ChangeError`] is, for each surface to answer in its own terms
/// (an HTTP status, a SQLSTATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request itself is wrong.
    Invalid,
    /// It names a query type or behaviour change nobody knows.
    Unknown,
    /// A safety gate refused it.
    Refused,
    /// The control database cannot be reached or failed.
    Unavailable,
    /// The change waited too long for a lock and did nothing: retry.
    Busy,
}

impl ChangeError {
    /// The message, and for a name nobody knows, where the surface (`listed`: its commands
    /// that list query types, then behaviour changes) lists the known ones.
    pub fn explained(&self, listed: [&str; 2]) -> String {
        match self {
            ChangeError::UnknownQueryType(_) => format!("{self} ({} lists them)", listed[0]),
            ChangeError::UnknownBehaviourChange(_) => format!("{self} ({} lists them)", listed[1]),
            _ => self.to_string(),
        }
    }

    /// The kind of failure (one exhaustive match: a new variant is placed here, once).
    pub fn failure(&self) -> Failure {
        match self {
            ChangeError::Invalid(_) => Failure::Invalid,
            ChangeError::UnknownQueryType(_) | ChangeError::UnknownBehaviourChange(_) => {
                Failure::Unknown
            }
            ChangeError::Gate { .. }
            | ChangeError::WriteGate { .. }
            | ChangeError::NotBackfilled { .. }
            | ChangeError::Unaccepted { .. }
            | ChangeError::Undeclared { .. }
            | ChangeError::Slower { .. } => Failure::Refused,
            ChangeError::NoControlDatabase
            | ChangeError::Unreachable(_)
            | ChangeError::Database(_) => Failure::Unavailable,
            ChangeError::Busy(_) => Failure::Busy,
        }
    }
}

/// A change asked of this proxy (admin API, SQL console): the query type must be one the
/// rules or the live state know, the stage valid; then [`set_stage`] on the control
/// database.
#[allow(clippy::too_many_arguments)]
pub async fn request_change(
    control: &Control,
    rules: &RuleSet,
    query_type: String,
    stage: &str,
    percent: Option<i64>,
    reason: String,
    who: &str,
    via: &'static str,
    force: bool,
) -> Result<Changed, ChangeError> {
    let known = rules.query_types.iter().any(|qt| qt.name == query_type)
        || control.live().by_type.contains_key(&query_type);
    // An automatic query type (`fp_` and 16 hex digits): known once the shadow has seen it.
    let automatic = !known
        && query_type.len() == 19
        && query_type.starts_with("fp_")
        && query_type[3..].bytes().all(|b| b.is_ascii_hexdigit());
    if !known && !automatic {
        return Err(ChangeError::UnknownQueryType(query_type));
    }
    let stage = stage_of(stage, percent).map_err(ChangeError::Invalid)?;
    let mut client = control.connect().await?;
    if automatic
        && !client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM cutover.fingerprints WHERE fingerprint = $1)
                     OR EXISTS (SELECT 1 FROM cutover.comparison_stats WHERE query_type = $1)",
                &[&query_type],
            )
            .await?
            .get::<_, bool>(0)
    {
        return Err(ChangeError::UnknownQueryType(query_type));
    }
    let change = Change {
        writes: rules.writes(&query_type).unwrap_or(false),
        declared: behaviour::Declared::of(rules, &query_type),
        query_type,
        stage,
        reason,
        who: who.to_owned(),
        via,
        force,
    };
    let changed = set_stage(&mut client, &change).await?;
    tracing::info!(query_type = %changed.query_type, from = ?changed.from, to = %changed.to, %who, via, forced = changed.forced, "stage changed");
    Ok(changed)
}

fn describe(stage: Stage) -> String {
    stage.to_string()
}

/// Changes one query type's stage: checks the gate (unless forced), writes the new state
/// and its audit row, in one transaction (the notify trigger tells every replica).
pub async fn set_stage(client: &mut Client, change: &Change) -> Result<Changed, ChangeError> {
    if change.reason.trim().is_empty() {
        return Err(ChangeError::Invalid("a reason is required".into()));
    }
    // READ COMMITTED whatever the database's default: dual-write's triggers follow the state
    // (migration 0024), and decide from what every other change committed.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await?;
    let current = tx
        .query_opt(
            "SELECT stage, percent FROM cutover.query_type_state WHERE query_type = $1 FOR UPDATE",
            &[&change.query_type],
        )
        .await?;
    let from = match &current {
        Some(row) => {
            let (stage, percent): (String, i16) = (row.get(0), row.get(1));
            let percent = (stage == "cutover").then_some(i64::from(percent));
            Some(stage_of(&stage, percent).map_err(ChangeError::Invalid)?)
        }
        None => None,
    };
    if from == Some(change.stage) {
        // Already there (another replica, or a repeated command): nothing to record.
        tx.commit().await?;
        return Ok(Changed {
            query_type: change.query_type.clone(),
            from: from.map(describe),
            to: describe(change.stage),
            forced: false,
        });
    }
    let raise = served_by_target(change.stage) > from.map_or(0, served_by_target);
    if raise {
        backfilled(&tx).await?;
        if !change.force {
            behaviour::gate(&tx, &change.declared).await?;
        }
    }
    if raise && !change.force && change.writes {
        match window_verify(&tx).await? {
            Some((true, _)) => {}
            Some((false, at)) => {
                return Err(ChangeError::WriteGate {
                    last: format!("the last one ({at} UTC) found drift"),
                });
            }
            None => {
                return Err(ChangeError::WriteGate {
                    last: "there was none".into(),
                });
            }
        }
    } else if raise && !change.force {
        let (samples, matched) = window_samples(&tx, &change.query_type).await?;
        let rate = if samples > 0 {
            matched as f64 / samples as f64
        } else {
            0.0
        };
        if samples < GATE_MIN_SAMPLES || rate < GATE_MIN_MATCH_RATE {
            return Err(ChangeError::Gate {
                samples,
                min: GATE_MIN_SAMPLES,
                rate: if samples > 0 {
                    format!("{:.1}%", rate * 100.0)
                } else {
                    "n/a".into()
                },
                bar: GATE_MIN_MATCH_RATE * 100.0,
            });
        }
        let (legacy, target) = window_latency(&tx, &change.query_type).await?;
        if let Some((legacy_ms, target_ms)) = slower_than_the_bar(&legacy, &target) {
            return Err(ChangeError::Slower {
                legacy_ms,
                target_ms,
            });
        }
    }
    let (stage, percent) = stage_columns(change.stage);
    tx.execute(
        "INSERT INTO cutover.query_type_state (query_type, stage, percent, updated_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (query_type) DO UPDATE
             SET stage = EXCLUDED.stage, percent = EXCLUDED.percent, updated_at = now()",
        &[&change.query_type, &stage, &percent],
    )
    .await
    .map_err(|e| match e.as_db_error() {
        Some(db) if *db.code() == SqlState::LOCK_NOT_AVAILABLE => {
            ChangeError::Busy(db.message().to_owned())
        }
        _ => ChangeError::Database(e),
    })?;
    let (from_stage, from_percent) = match from.map(stage_columns) {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    };
    tx.execute(
        "INSERT INTO cutover.stage_audit
             (query_type, from_stage, from_percent, to_stage, to_percent, reason, changed_by, via, forced)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &change.query_type,
            &from_stage,
            &from_percent,
            &stage,
            &percent,
            &change.reason,
            &change.who,
            &change.via,
            &(change.force && raise),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Changed {
        query_type: change.query_type.clone(),
        from: from.map(describe),
        to: describe(change.stage),
        forced: change.force && raise,
    })
}

/// Nothing serves from the target before a backfill has completed, forced or not: until then
/// dual-write hands every write to the backfill instead of v2.
async fn backfilled(client: &impl tokio_postgres::GenericClient) -> Result<(), ChangeError> {
    let phase: Option<String> = client
        .query_opt("SELECT phase FROM cutover.backfill_progress", &[])
        .await?
        .map(|r| r.get(0));
    match phase.as_deref() {
        Some("done") => Ok(()),
        Some(phase) => Err(ChangeError::NotBackfilled {
            state: format!("the last one stopped in its {phase} phase; run it again to finish"),
        }),
        None => Err(ChangeError::NotBackfilled {
            state: "none has run".into(),
        }),
    }
}

/// The gate's window.
pub const GATE_WINDOW: &str = "1 hour";

/// Compared samples with a verdict (matched, expected by reviewers, confirmed) and the
/// agreeing ones (matched or expected), of a query type in the gate's window (`cutover.comparison_stats`, written by the shadow).
pub async fn window_samples(
    client: &impl tokio_postgres::GenericClient,
    query_type: &str,
) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(sum(matched + expected + confirmed), 0)::int8,
                        coalesce(sum(matched + expected), 0)::int8
                 FROM cutover.comparison_stats
                 WHERE query_type = $1 AND minute >= now() - interval '{GATE_WINDOW}'"
            ),
            &[&query_type],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Both sides' latency histograms (`cutover.comparison_stats` buckets) of a query type's
/// timed comparisons in the gate's window.
pub async fn window_latency(
    client: &impl tokio_postgres::GenericClient,
    query_type: &str,
) -> Result<(Vec<i64>, Vec<i64>), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(cutover.hist_sum(legacy_us_hist), '{{}}'),
                        coalesce(cutover.hist_sum(target_us_hist), '{{}}')
                 FROM cutover.comparison_stats
                 WHERE query_type = $1 AND minute >= now() - interval '{GATE_WINDOW}'"
            ),
            &[&query_type],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The gate's latency bar, on both sides' latency histograms: `Some((legacy, target))`, their
/// p99 in ms (the upper bound of its bucket), when each side has at least
/// [`GATE_MIN_TIMED`] timings and the target's p99 is more than [`GATE_MAX_P99_RATIO`] times
/// legacy's. The gate refuses on it; the report's verdict says it.
pub fn slower_than_the_bar(legacy: &[i64], target: &[i64]) -> Option<(f64, f64)> {
    let enough = |h: &[i64]| h.iter().sum::<i64>() >= GATE_MIN_TIMED;
    if !enough(legacy) || !enough(target) {
        return None;
    }
    let l = crate::divergence::percentile(legacy, 0.99)?;
    let t = crate::divergence::percentile(target, 0.99)?;
    (t > l * GATE_MAX_P99_RATIO).then_some((l, t))
}

/// The last `cutover verify` run in the gate's window: clean or not, and when (UTC) — the
/// evidence a write type is raised on.
pub async fn window_verify(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<(bool, String)>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!(
                "SELECT ok, to_char(ran_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM cutover.verify_runs
                 WHERE ran_at >= now() - interval '{GATE_WINDOW}' ORDER BY ran_at DESC LIMIT 1"
            ),
            &[],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// When a query type serving from the target is sent back to shadow by itself: more than
/// this share of confirmed divergences among at least `min_samples` verdicts in the last
/// `window_minutes`.
#[derive(Debug, Clone, Copy)]
pub struct RampDown {
    pub max_divergence: f64,
    pub min_samples: i64,
    pub window_minutes: i32,
}

impl Default for RampDown {
    fn default() -> Self {
        Self {
            max_divergence: 1.0 - GATE_MIN_MATCH_RATE,
            min_samples: 100,
            window_minutes: 5,
        }
    }
}

/// Sends back to `shadow` every query type in `cutover` or `target` whose confirmed
/// divergences passed the bar, each with an audit row (`auto`); returns what it changed.
pub async fn ramp_down(client: &mut Client, bar: RampDown) -> Result<Vec<Changed>, ChangeError> {
    let diverging = client
        .query(
            "SELECT s.query_type, sum(c.confirmed)::int8, sum(c.matched + c.expected + c.confirmed)::int8
             FROM cutover.query_type_state s
             JOIN cutover.comparison_stats c ON c.query_type = s.query_type
             WHERE s.stage IN ('cutover', 'target')
               AND c.minute >= now() - make_interval(mins => $1::int4)
             GROUP BY s.query_type
             HAVING sum(c.matched + c.expected + c.confirmed)::int8 >= $2::int8
                AND sum(c.confirmed)::float8
                    / sum(c.matched + c.expected + c.confirmed)::float8 > $3::float8",
            &[&bar.window_minutes, &bar.min_samples, &bar.max_divergence],
        )
        .await?;
    let mut changed = Vec::new();
    for row in diverging {
        let (query_type, confirmed, samples): (String, i64, i64) =
            (row.get(0), row.get(1), row.get(2));
        let change = Change {
            query_type,
            stage: Stage::Shadow,
            reason: format!(
                "automatic ramp-down: {confirmed} confirmed divergences in {samples} compared samples ({:.1}%) over the last {} minutes, above {:.1}%",
                confirmed as f64 * 100.0 / samples as f64,
                bar.window_minutes,
                bar.max_divergence * 100.0
            ),
            who: "auto".into(),
            via: "auto",
            force: false,
            // A step back: no gate.
            writes: false,
            declared: behaviour::Declared::default(),
        };
        // Another replica may have done it already: the stage is read again under lock.
        let still = client
            .query_opt(
                "SELECT 1 FROM cutover.query_type_state
                 WHERE query_type = $1 AND stage IN ('cutover', 'target')",
                &[&change.query_type],
            )
            .await?;
        if still.is_some() {
            let done = set_stage(client, &change).await?;
            tracing::warn!(query_type = %done.query_type, from = ?done.from, reason = %change.reason, "query type ramped down to shadow");
            changed.push(done);
        }
    }
    Ok(changed)
}

/// One audit row.
#[derive(Debug, Serialize)]
pub struct AuditEntry {
    pub changed_at: String,
    pub query_type: String,
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    pub changed_by: String,
    pub via: String,
    pub forced: bool,
}

/// The most recent changes, newest first.
pub async fn history(
    client: &Client,
    limit: i64,
) -> Result<Vec<AuditEntry>, tokio_postgres::Error> {
    let shown = |stage: Option<String>, percent: Option<i16>| -> Option<String> {
        Some(stage_label(&stage?, percent.unwrap_or(0)))
    };
    Ok(client
        .query(
            "SELECT to_char(changed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    query_type, from_stage, from_percent, to_stage, to_percent, reason,
                    changed_by, via, forced
             FROM cutover.stage_audit ORDER BY id DESC LIMIT $1",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| AuditEntry {
            changed_at: r.get(0),
            query_type: r.get(1),
            from: shown(r.get(2), r.get(3)),
            to: shown(Some(r.get(4)), Some(r.get(5))).unwrap_or_default(),
            reason: r.get(6),
            changed_by: r.get(7),
            via: r.get(8),
            forced: r.get(9),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_parse_and_round_trip() {
        for (name, percent) in [
            ("legacy", None),
            ("shadow", None),
            ("cutover", Some(25)),
            ("target", None),
            ("complete", None),
        ] {
            let stage = stage_of(name, percent).unwrap();
            let (stored, p) = stage_columns(stage);
            assert_eq!(stored, name);
            let back = stage_of(stored, (stored == "cutover").then_some(i64::from(p))).unwrap();
            assert_eq!(back, stage);
        }
        assert!(stage_of("cutover", None).is_err());
        assert!(stage_of("cutover", Some(101)).is_err());
        assert!(stage_of("shadow", Some(10)).is_err());
        assert!(stage_of("live", None).is_err());
    }

    #[test]
    fn raises_are_told_from_steps_back() {
        let s = |n, p| stage_of(n, p).unwrap();
        assert!(served_by_target(s("cutover", Some(10))) > served_by_target(s("shadow", None)));
        assert!(
            served_by_target(s("cutover", Some(50))) > served_by_target(s("cutover", Some(10)))
        );
        assert!(served_by_target(s("complete", None)) > served_by_target(s("target", None)));
        assert!(served_by_target(s("shadow", None)) == served_by_target(s("legacy", None)));
    }
}
