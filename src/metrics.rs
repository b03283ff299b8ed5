//! Every metric the proxy exports, defined in one place. Names end in `_total` or
//! `_seconds`; labels come from fixed sets (and, later, rule names), never from SQL text.
//!
//! Hot-path counters are registered once and kept as handles, so counting costs an atomic
//! add, not a registry lookup.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            // Only fails if another recorder was installed first; nothing else installs one.
            .expect("no other metrics recorder is installed")
    })
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
    /// `cutover_queries_total{query_type="passthrough",served_by="legacy"}`: Query and Execute
    /// messages relayed unchanged.
    pub passthrough_queries: Counter,
    /// `cutover_precheck_total{result}`: statements (Query, Parse) that do / do not mention
    /// the legacy table by name; only the former will ever be parsed.
    pub precheck_legacy: Counter,
    pub precheck_other: Counter,
    /// `cutover_upstream_errors_total{kind}`.
    pub upstream_connect_failed: Counter,
    pub upstream_lost: Counter,
    /// `cutover_protocol_violations_total`: malformed or oversized client messages.
    pub protocol_violations: Counter,
    /// `cutover_cancel_requests_total{outcome}`.
    pub cancel_forwarded: Counter,
    pub cancel_unknown: Counter,
}

impl ProxyMetrics {
    pub fn new() -> Self {
        recorder();
        Self {
            clients: gauge!("cutover_client_connections"),
            accepted: counter!("cutover_client_connections_total", "outcome" => "accepted"),
            rejected_limit: counter!("cutover_client_connections_total", "outcome" => "rejected_limit"),
            rejected_shutdown: counter!("cutover_client_connections_total", "outcome" => "rejected_shutdown"),
            passthrough_queries: counter!(
                "cutover_queries_total", "query_type" => PASSTHROUGH, "served_by" => "legacy"
            ),
            precheck_legacy: counter!("cutover_precheck_total", "result" => "legacy_table"),
            precheck_other: counter!("cutover_precheck_total", "result" => "other"),
            upstream_connect_failed: counter!("cutover_upstream_errors_total", "kind" => "connect"),
            upstream_lost: counter!("cutover_upstream_errors_total", "kind" => "lost"),
            protocol_violations: counter!("cutover_protocol_violations_total"),
            cancel_forwarded: counter!("cutover_cancel_requests_total", "outcome" => "forwarded"),
            cancel_unknown: counter!("cutover_cancel_requests_total", "outcome" => "unknown_key"),
        }
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
