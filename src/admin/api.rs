//! The admin HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process answers),
//! `/readyz` (accepting connections and the upstream reachable) — open to anyone — and,
//! behind a token, the control API: `GET /api/state` (every query type's stage),
//! `GET /api/history` (the audit), `GET /api/behaviour_changes`, `/status` (the live report,
//! with divergence examples) for any token, read-only ones included; `POST
//! /api/state/{query_type}` (a change of stage, with a reason), `POST /api/marks` and `POST
//! /api/behaviour_changes/{name}/accept` for admin tokens only. A token comes as
//! `Authorization: Bearer TOKEN`, or as the password of HTTP Basic (what a browser asks for
//! on `/status`). Tokens are compared in constant time; a wrong one is counted and answered
//! late ([`crate::proxy::auth::Throttle`]). Bound to loopback unless configured otherwise; it never
//! exposes parameter values.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{control, metrics, proxy::session::Shared, proxy::upstream};

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
    let read = Router::new()
        .route("/api/state", get(api_state))
        .route("/api/history", get(api_history))
        .route("/api/behaviour_changes", get(api_behaviour_changes))
        .route("/status", get(status_page))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_read,
        ));
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/state/{query_type}", post(api_set))
        .route("/api/marks", post(api_mark))
        .route("/api/behaviour_changes/{name}/accept", post(api_accept))
        .merge(read)
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

/// One query type as the API shows it.
#[derive(Debug, Serialize)]
struct TypeView {
    query_type: String,
    stage: String,
    percent: i16,
    dual_write: String,
    /// `live` (from the control database) or `rules` (no live state yet).
    source: &'static str,
    updated_at: Option<String>,
}

#[derive(Debug, Serialize)]
struct StateView {
    /// Whether this replica follows the control database right now (otherwise it serves
    /// with the last state it loaded).
    control_connected: bool,
    query_types: Vec<TypeView>,
}

async fn api_state(State(state): State<AdminState>) -> Json<StateView> {
    let shared = &state.shared;
    let live = shared.control.live();
    let classifier = shared.classifier.load();
    let mut views: Vec<TypeView> = classifier
        .rules()
        .query_types
        .iter()
        .filter(|qt| !live.by_type.contains_key(&qt.name))
        .map(|qt| {
            let (stage, percent) = crate::routing::rules::stage_columns(qt.stage);
            TypeView {
                query_type: qt.name.clone(),
                stage: stage.into(),
                percent,
                dual_write: if qt.strict { "strict" } else { "isolated" }.into(),
                source: "rules",
                updated_at: None,
            }
        })
        .collect();
    views.extend(live.by_type.values().map(|s| TypeView {
        query_type: s.query_type.clone(),
        stage: s.stage.clone(),
        percent: s.percent,
        dual_write: s.dual_write.clone(),
        source: "live",
        updated_at: Some(s.updated_at.clone()),
    }));
    views.sort_by(|a, b| a.query_type.cmp(&b.query_type));
    Json(StateView {
        control_connected: shared.control.connected(),
        query_types: views,
    })
}

/// A change of stage, as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeRequest {
    stage: String,
    percent: Option<i64>,
    reason: String,
    #[serde(default)]
    force: bool,
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Change,
}

/// The token a request presents: `Authorization: Bearer TOKEN`, or HTTP Basic with the token
/// as the password (any user name).
fn presented(headers: &HeaderMap) -> Option<Vec<u8>> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().as_bytes().to_vec());
    }
    let basic = base64::engine::general_purpose::STANDARD
        .decode(value.strip_prefix("Basic ")?.trim())
        .ok()?;
    let colon = basic.iter().position(|&b| b == b':')?;
    Some(basic[colon + 1..].to_vec())
}

/// The name of the request's token if it allows `access`; else the answer (401 without a
/// token or with a wrong one — counted and slowed —, 403 for a read-only token asked to
/// change).
async fn authorized(
    shared: &Shared,
    headers: &HeaderMap,
    access: Access,
) -> Result<String, Response> {
    let unauthorized = |message: &str| {
        let mut response = problem(StatusCode::UNAUTHORIZED, message);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"cutover\", Bearer"
                .parse()
                .expect("a valid header value"),
        );
        response
    };
    let Some(given) = presented(headers) else {
        return Err(unauthorized(match access {
            Access::Read => {
                "reading the control API needs a token (Authorization: Bearer …), an admin or a read token the proxy is configured with"
            }
            Access::Change => {
                "changes need a bearer token (Authorization: Bearer …) the proxy is configured with"
            }
        }));
    };
    let tokens = shared.tokens.load();
    let admin = crate::proxy::auth::token_named(&tokens.admin, &given);
    let reader = crate::proxy::auth::token_named(&tokens.read, &given);
    match (admin, reader, access) {
        (Some(name), _, _) | (None, Some(name), Access::Read) => Ok(name.to_owned()),
        (None, Some(name), Access::Change) => Err(problem(
            StatusCode::FORBIDDEN,
            format!("the token {name:?} may read, not change: use an admin token"),
        )),
        (None, None, _) => {
            shared
                .throttle
                .failed(crate::proxy::auth::Surface::Api)
                .await;
            Err(unauthorized(
                "the token is not one the proxy is configured with",
            ))
        }
    }
}

/// The read routes' guard.
async fn require_read(
    State(state): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorized(&state.shared, request.headers(), Access::Read).await {
        Ok(_) => next.run(request).await,
        Err(response) => response,
    }
}

/// A connection to the control database for one request, or why there is none.
async fn control_client(shared: &Shared) -> Result<tokio_postgres::Client, String> {
    shared.control.connect().await.map_err(|e| e.to_string())
}

/// The name of the request's admin token and its JSON body, or the 401, 403 or 400 to
/// answer.
async fn authorized_body<T>(
    shared: &Shared,
    headers: &HeaderMap,
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<(String, T), Response> {
    let who = authorized(shared, headers, Access::Change).await?;
    match body {
        Ok(Json(request)) => Ok((who, request)),
        Err(rejection) => Err(problem(StatusCode::BAD_REQUEST, rejection.body_text())),
    }
}

/// A reviewer marks a class of divergence as expected (token required).
async fn api_mark(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: Result<
        Json<crate::shadow::divergence::MarkRequest>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Response {
    let (who, request) = match authorized_body(&state.shared, &headers, body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let problems = request.problems();
    if !problems.is_empty() {
        return problem(StatusCode::BAD_REQUEST, problems.join("; "));
    }
    let client = match control_client(&state.shared).await {
        Ok(client) => client,
        Err(error) => return problem(StatusCode::SERVICE_UNAVAILABLE, error),
    };
    match crate::shadow::divergence::mark(&client, &request, &who).await {
        Ok(()) => (StatusCode::OK, Json(request)).into_response(),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

async fn api_set(
    State(state): State<AdminState>,
    Path(query_type): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ChangeRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let shared = &state.shared;
    let (who, request) = match authorized_body(shared, &headers, body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let result = control::request_change(
        &shared.control,
        shared.classifier.load().rules(),
        query_type,
        &request.stage,
        request.percent,
        request.reason,
        &who,
        "api",
        request.force,
    )
    .await;
    match result {
        Ok(changed) => (StatusCode::OK, Json(changed)).into_response(),
        Err(error) => change_problem(&error),
    }
}

/// The answer to a refused or failed change.
fn change_problem(error: &control::ChangeError) -> Response {
    let status = match error.failure() {
        control::Failure::Invalid => StatusCode::BAD_REQUEST,
        control::Failure::Unknown => StatusCode::NOT_FOUND,
        control::Failure::Refused => StatusCode::CONFLICT,
        control::Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        control::Failure::Busy => StatusCode::CONFLICT,
    };
    problem(
        status,
        error.explained(["GET /api/state", "GET /api/behaviour_changes"]),
    )
}

/// The declared behaviour changes (and undeclared kinds that happened): how often, accepted
/// or not.
async fn api_behaviour_changes(State(state): State<AdminState>) -> Response {
    let client = match control_client(&state.shared).await {
        Ok(client) => client,
        Err(error) => return problem(StatusCode::SERVICE_UNAVAILABLE, error),
    };
    match control::behaviour::status(&client, state.shared.classifier.load().rules()).await {
        Ok(list) => (StatusCode::OK, Json(list)).into_response(),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct AcceptRequest {
    reason: String,
}

/// A reviewer accepts a declared behaviour change (token required).
async fn api_accept(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<AcceptRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let shared = &state.shared;
    let (who, request) = match authorized_body(shared, &headers, body).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let client = match control_client(shared).await {
        Ok(client) => client,
        Err(error) => return problem(StatusCode::SERVICE_UNAVAILABLE, error),
    };
    let rules = shared.classifier.load();
    match control::behaviour::accept(&client, rules.rules(), &name, &request.reason, &who, "api")
        .await
    {
        Ok(status) => (StatusCode::OK, Json(status)).into_response(),
        Err(error) => change_problem(&error),
    }
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    lang: Option<String>,
}

/// `/status`: the report of the last hour, as HTML that reloads itself every 10 seconds.
async fn status_page(
    State(state): State<AdminState>,
    Query(query): Query<StatusQuery>,
) -> Response {
    let lang = match query
        .lang
        .as_deref()
        .unwrap_or("en")
        .parse::<crate::report::Lang>()
    {
        Ok(lang) => lang,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
    };
    let page = |status: StatusCode, body: String| {
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response()
    };
    let report = async {
        let client = control_client(&state.shared).await?;
        let rules = state.shared.classifier.load().rules_arc().clone();
        crate::report::gather(&client, std::time::Duration::from_secs(3600), Some(&rules))
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match report {
        Ok(report) => page(
            StatusCode::OK,
            crate::report::render::html(&report, lang, Some(10)),
        ),
        Err(error) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "<!DOCTYPE html><meta http-equiv=\"refresh\" content=\"10\"><title>cutover</title><p>The control database cannot be read: {}</p>",
                error.replace('<', "&lt;")
            ),
        ),
    }
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    limit: Option<i64>,
}

async fn api_history(
    State(state): State<AdminState>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    let client = match control_client(&state.shared).await {
        Ok(client) => client,
        Err(error) => return problem(StatusCode::SERVICE_UNAVAILABLE, error),
    };
    match control::history(&client, query.limit.unwrap_or(50).clamp(1, 1000)).await {
        Ok(entries) => Json(entries).into_response(),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}
