//! Every metric the proxy exports, defined in one place. Names end in `_total` or
//! `_seconds`; labels come from fixed sets (and, later, rule names), never from SQL text.
//!
//! Hot-path counters are registered once and kept as handles, so counting costs an atomic
//! add, not a registry lookup.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, counter, gauge, histogram};

use crate::wire::messages::{DualWriteOutcome, DualWriteReport};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// How often the recorder's upkeep runs.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder once per process and returns its handle, with its
/// upkeep running every `UPKEEP` (5 s) on a thread of its own.
///
/// Histogram samples wait in the recorder until a scrape or an upkeep folds them into their
/// distribution: with nobody scraping `/metrics` (or `--admin off`), every statement's
/// latency sample stayed in memory (issue 17: ~31 bytes a statement, without bound).
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .install_recorder()
            // Only fails if another recorder was installed first; nothing else installs one.
            .expect("no other metrics recorder is installed");
        let upkept = handle.clone();
        let started = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP);
                    upkept.run_upkeep();
                }
            });
        if let Err(error) = started {
            tracing::warn!(%error, "metrics upkeep thread could not start: histogram samples are folded only when /metrics is scraped");
        }
        handle
    })
}

/// The value of one series in scraped Prometheus text (exact labels as rendered), or 0 when
/// it is not there — for the programs that read `/metrics` (demo, tests).
pub fn scraped(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `query_type` of statements that do not touch the legacy table.
pub const PASSTHROUGH: &str = "passthrough";

/// Handles for the proxy's hot-path metrics.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// `cutover_client_connections`: sessions open now.
    pub clients: Gauge,
    /// `cutover_client_connections_total{outcome}`.
    pub accepted: Counter,
    pub rejected_limit: Counter,
    pub rejected_shutdown: Counter,
    /// `cutover_queries_total{query_type,served_by}`: Query and Execute messages, by query
    /// type. `query_type` is a rule's name, or one of `passthrough` (not on the legacy
    /// table), `automatic` (on it, but no rule names it) and `unparsable` (names the table,
    /// the parser cannot read it; relayed to legacy untouched).
    pub queries: QueryCounters,
    /// `cutover_upstream_errors_total{kind}`.
    pub upstream_connect_failed: Counter,
    pub upstream_lost: Counter,
    /// `cutover_protocol_violations_total`: malformed or oversized client messages.
    pub protocol_violations: Counter,
    /// `cutover_cancel_requests_total{outcome}`.
    pub cancel_forwarded: Counter,
    pub cancel_unknown: Counter,
    /// `cutover_dual_writes_total{outcome}`: write statements mirrored by the dual-write
    /// trigger, as it reported them (mirrored, isolated_failure, strict_failure,
    /// deferred_to_backfill).
    pub dual_writes: [Counter; 4],
    /// `cutover_rules_reloads_total{outcome}`: rule files reloaded (SIGHUP or a change on
    /// disk): `ok`, or `failed` (the last good rules stay).
    pub rules_reloaded: Counter,
    pub rules_reload_failed: Counter,
    /// `cutover_logins_total{outcome}`: client logins, by how they ended (see [`Login`]).
    pub logins: [Counter; Login::ALL.len()],
}

/// Every labelled series the proxy may count, registered at zero (an `increase()` alert and a
/// dashboard then see the first event, and a quiet proxy shows "0", not "No data"). Labels
/// come from fixed sets and rule names; called at start and after each rules reload.
pub struct AtZero<'a> {
    /// The named query types (`automatic` is added).
    pub query_types: &'a [&'a str],
    /// `cutover_comparisons_total`'s `outcome` labels.
    pub outcomes: &'a [&'static str],
    /// `cutover_comparisons_skipped_total`'s `reason` labels.
    pub skip_reasons: &'a [&'static str],
    /// `cutover_behaviour_changes_total`'s `kind` labels.
    pub change_kinds: &'a [&'static str],
}

impl AtZero<'_> {
    pub fn register(&self) {
        recorder();
        for name in [
            "cutover_shadow_dropped_total",
            "cutover_shadow_timeouts_total",
            "cutover_divergence_samples_dropped_total",
            "cutover_network_sizes_folded_total",
        ] {
            counter!(name).increment(0);
        }
        gauge!("cutover_control_connected").increment(0.0);
        gauge!("cutover_paused").increment(0.0);
        let types = self.query_types.iter().copied().chain(["automatic"]);
        for query_type in types {
            for &outcome in self.outcomes {
                counter!("cutover_comparisons_total", "query_type" => query_type.to_owned(), "outcome" => outcome)
                    .increment(0);
            }
            counter!("cutover_auto_rampdowns_total", "query_type" => query_type.to_owned())
                .increment(0);
            for side in ["legacy", "target"] {
                let _ = histogram!("cutover_shadow_duration_seconds", "query_type" => query_type.to_owned(), "side" => side);
                let _ = histogram!("cutover_query_duration_seconds", "query_type" => query_type.to_owned(), "side" => side);
            }
        }
        for &reason in self.skip_reasons {
            counter!("cutover_comparisons_skipped_total", "reason" => reason).increment(0);
        }
        for &kind in self.change_kinds {
            counter!("cutover_behaviour_changes_total", "kind" => kind).increment(0);
        }
    }
}

/// How a client login ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// Relayed to the server, which accepted it.
    Relayed,
    /// Authenticated by the proxy against the user's secret, then logged in upstream.
    Authenticated,
    /// Refused: a wrong password, or a refusal by the server.
    Refused,
    /// Not done within `authentication_timeout`.
    TimedOut,
    /// Authenticated while `max_client_connections` sessions were open.
    TooMany,
}

impl Login {
    pub const ALL: [Login; 5] = [
        Login::Relayed,
        Login::Authenticated,
        Login::Refused,
        Login::TimedOut,
        Login::TooMany,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Login::Relayed => "relayed",
            Login::Authenticated => "authenticated",
            Login::Refused => "refused",
            Login::TimedOut => "timed_out",
            Login::TooMany => "too_many",
        }
    }
}

impl ProxyMetrics {
    pub fn new() -> Self {
        recorder();
        Self {
            clients: gauge!("cutover_client_connections"),
            accepted: counter!("cutover_client_connections_total", "outcome" => "accepted"),
            rejected_limit: counter!("cutover_client_connections_total", "outcome" => "rejected_limit"),
            rejected_shutdown: counter!("cutover_client_connections_total", "outcome" => "rejected_shutdown"),
            queries: QueryCounters::new(&[]),
            upstream_connect_failed: counter!("cutover_upstream_errors_total", "kind" => "connect"),
            upstream_lost: counter!("cutover_upstream_errors_total", "kind" => "lost"),
            protocol_violations: counter!("cutover_protocol_violations_total"),
            cancel_forwarded: counter!("cutover_cancel_requests_total", "outcome" => "forwarded"),
            cancel_unknown: counter!("cutover_cancel_requests_total", "outcome" => "unknown_key"),
            dual_writes: [
                DualWriteOutcome::Mirrored,
                DualWriteOutcome::Isolated,
                DualWriteOutcome::StrictFailed,
                DualWriteOutcome::Deferred,
            ]
            .map(|o| counter!("cutover_dual_writes_total", "outcome" => o.as_str())),
            rules_reloaded: counter!("cutover_rules_reloads_total", "outcome" => "ok"),
            rules_reload_failed: counter!("cutover_rules_reloads_total", "outcome" => "failed"),
            logins: Login::ALL.map(|l| counter!("cutover_logins_total", "outcome" => l.as_str())),
        }
    }

    pub fn login(&self, outcome: Login) {
        self.logins[outcome as usize].increment(1);
    }

    /// Counts one dual-write report and records the time each side took in
    /// `cutover_query_duration_seconds{query_type,side}`.
    pub fn dual_write(&self, report: &DualWriteReport) {
        let index = match report.outcome {
            DualWriteOutcome::Mirrored => 0,
            DualWriteOutcome::Isolated => 1,
            DualWriteOutcome::StrictFailed => 2,
            DualWriteOutcome::Deferred => 3,
        };
        let statements = report.statements.max(1);
        self.dual_writes[index].increment(statements);
        // One sample per report: the mean time per statement on each side.
        let query_type = self.queries.label(&report.query_type).to_owned();
        for (side, us) in [("legacy", report.legacy_us), ("target", report.target_us)] {
            histogram!("cutover_query_duration_seconds", "query_type" => query_type.clone(), "side" => side)
                .record(us as f64 / 1e6 / statements as f64);
        }
    }
}

/// The two `cutover_queries_total` counters of one query type label: served by legacy, and
/// served by the target.
#[derive(Clone)]
pub struct Served {
    pub legacy: Counter,
    pub target: Counter,
}

impl Served {
    fn new(query_type: &str) -> Self {
        let served_by = |side: &'static str| counter!("cutover_queries_total", "query_type" => query_type.to_owned(), "served_by" => side);
        Self {
            legacy: served_by("legacy"),
            target: served_by("target"),
        }
    }

    /// One counter whichever side serves (statements the proxy does not route).
    pub fn either(counter: &Counter) -> Self {
        Self {
            legacy: counter.clone(),
            target: counter.clone(),
        }
    }

    /// The counter of the side that served.
    pub fn side(&self, side: crate::routing::route::Side) -> &Counter {
        match side {
            crate::routing::route::Side::Legacy => &self.legacy,
            crate::routing::route::Side::Target => &self.target,
        }
    }
}

/// `cutover_queries_total` handles, per query type label. The named ones follow the rules
/// when they are reloaded (clones share them).
#[derive(Clone)]
pub struct QueryCounters {
    pub passthrough: Counter,
    pub automatic: Served,
    pub unparsable: Counter,
    named: std::sync::Arc<arc_swap::ArcSwap<std::collections::HashMap<String, Served>>>,
}

impl QueryCounters {
    /// Counters for the fixed labels and for each rule-named query type.
    pub fn new(names: &[&str]) -> Self {
        let counters = Self {
            passthrough: Served::new(PASSTHROUGH).legacy,
            automatic: Served::new("automatic"),
            unparsable: Served::new("unparsable").legacy,
            named: Default::default(),
        };
        counters.set_names(names);
        counters
    }

    /// The rule-named query types from now on (after a reload).
    pub fn set_names(&self, names: &[&str]) {
        self.named.store(std::sync::Arc::new(
            names
                .iter()
                .map(|n| (n.to_string(), Served::new(n)))
                .collect(),
        ));
    }

    /// The label of a query type name: the name if a rule names it, else `automatic` (so
    /// that no label ever comes from anywhere else).
    pub fn label<'a>(&self, name: &'a str) -> &'a str {
        if self.named.load().contains_key(name) {
            name
        } else {
            "automatic"
        }
    }

    /// The counters of a rule-named query type (automatic if the name is unknown).
    pub fn named(&self, name: &str) -> Served {
        self.named
            .load()
            .get(name)
            .unwrap_or(&self.automatic)
            .clone()
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
