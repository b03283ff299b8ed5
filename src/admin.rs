//! The admin HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process answers) and
//! `/readyz` (accepting connections and the upstream reachable). Bound to loopback unless
//! configured otherwise; it never exposes SQL text or parameter values.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio_util::sync::CancellationToken;

use crate::{metrics, session::Shared, upstream};

#[derive(Clone)]
struct AdminState {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

/// Binds the endpoint and serves it until `shutdown`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let state = AdminState {
        shared,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "admin endpoint stopped");
        }
    });
    Ok(bound)
}

async fn metrics_text() -> String {
    metrics::recorder().render()
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let reach = tokio::time::timeout(
        Duration::from_secs(2),
        upstream::connect(&state.shared.config.upstream),
    )
    .await;
    match reach {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "upstream unreachable\n"),
    }
}
