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

mod audit;
pub mod behaviour;
mod change;
mod ramp_down;

pub use audit::{AuditEntry, history};
pub use change::{
    Change, ChangeError, Changed, Failure, GATE_MAX_P99_RATIO, GATE_MIN_MATCH_RATE,
    GATE_MIN_SAMPLES, GATE_MIN_TIMED, GATE_WINDOW, carry_stage, request_change, set_stage,
    slower_than_the_bar, window_latency, window_samples, window_verify,
};
pub use ramp_down::{RampDown, ramp_down};

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
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use crate::routing::rules::{RuleSet, Stage, stage_columns, stage_of};

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
    /// The stage of each query type, parsed once per load (sessions read it per statement,
    /// so hashed with foldhash rather than SipHash: the names are the rules' and the
    /// operators', not the clients').
    stages: HashMap<String, Stage, foldhash::fast::RandomState>,
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
    /// Bumped at each load of the live state: a session keeps each prepared statement's
    /// stage until it moves (one atomic load per execution instead of a lookup by name).
    generation: std::sync::atomic::AtomicU64,
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
            generation: std::sync::atomic::AtomicU64::new(0),
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

    /// The live state's generation: a stage read in it holds until this changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether the change feed is connected now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// A connection of its own to the control database, for one request (API, console, ctl).
    pub async fn connect(&self) -> Result<Client, ChangeError> {
        let database = self.database().ok_or(ChangeError::NoControlDatabase)?;
        Ok(crate::net::connect::connect(database).await?)
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
        let mut retrying = crate::net::connect::Retrying::default();
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
                let error = crate::net::connect::cause(&error);
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
        let mut retrying = crate::net::connect::Retrying::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            if client.as_ref().is_none_or(Client::is_closed) {
                client = crate::net::connect::connect(&config).await.ok();
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
                        ChangeError::Database(e) => crate::net::connect::cause(e),
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
    pub fn behaviour_seen(&self, kind: crate::routing::rules::changes::ChangeKind) {
        metrics::counter!("cutover_behaviour_changes_total", "kind" => kind.as_str()).increment(1);
        if kind == crate::routing::rules::changes::ChangeKind::RefusedCycle {
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
        let (mut client, mut connection) = config
            .connect(crate::net::tls::PostgresTls::shared())
            .await?;
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
                let new = seed_query_types(&mut client, &self.rules.load()).await?;
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
        self.generation.fetch_add(1, Ordering::Release);
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
    client: &mut Client,
    rules: &RuleSet,
) -> Result<u64, tokio_postgres::Error> {
    // One transaction: dual-write's triggers are switched once for the whole baseline.
    let tx = read_committed(client).await?;
    let statement = tx
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
        let rows = tx
            .query(&statement, &[&qt.name, &stage, &percent, &mode])
            .await?;
        inserted += rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// A transaction for a change of `cutover.query_type_state`: READ COMMITTED whatever the
/// database's default, the only level migration 0024 accepts (dual-write's triggers follow
/// the state, decided from what every other change committed).
async fn read_committed(
    client: &mut Client,
) -> Result<tokio_postgres::Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
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
