//! `cutover ctl`: the operator's commands against a running proxy's admin API — the state of
//! every query type, a stage change (with a reason; the safety gate answers), the audit.
//! Tables for people, `--json` for scripts. Blocking HTTP (ureq): one request per command.

use std::time::Duration;

use serde_json::Value;

/// What a command ended with.
pub enum Outcome {
    /// Done; print this.
    Done(String),
    /// Refused (by the safety gate, or as a bad request); print this, exit 1.
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach the admin endpoint at {addr}: {reason}; is `cutover serve` running with --admin {addr}?"
    )]
    Unreachable { addr: String, reason: String },
    #[error(
        "the admin endpoint refused the token (401): give --token or CUTOVER_ADMIN_TOKEN (or, to read only, CUTOVER_READ_TOKEN), one the proxy is configured with"
    )]
    Unauthorized,
    #[error("the admin endpoint answered {status}: {message}")]
    Failed { status: u16, message: String },
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(15)))
        .build()
        .into()
}

fn url(addr: &str, path: &str) -> String {
    let base = addr.trim_end_matches('/');
    if base.starts_with("http://") || base.starts_with("https://") {
        format!("{base}{path}")
    } else {
        format!("http://{base}{path}")
    }
}

/// Sends a request; the status and the JSON body.
fn send(
    addr: &str,
    request: impl FnOnce(&ureq::Agent) -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, Value), CtlError> {
    let agent = agent();
    let mut response = request(&agent).map_err(|e| CtlError::Unreachable {
        addr: addr.to_owned(),
        reason: e.to_string(),
    })?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| CtlError::Unreachable {
            addr: addr.to_owned(),
            reason: e.to_string(),
        })?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status == 401 {
        return Err(CtlError::Unauthorized);
    }
    Ok((status, body))
}

/// A GET with the bearer token that must answer 200; its JSON body.
fn get(addr: &str, path: &str, token: Option<&str>) -> Result<Value, CtlError> {
    let (status, body) = send(addr, |a| {
        let mut get = a.get(url(addr, path));
        if let Some(token) = token {
            get = get.header("Authorization", &format!("Bearer {token}"));
        }
        get.call()
    })?;
    if status != 200 {
        return Err(CtlError::Failed {
            status,
            message: message(&body),
        });
    }
    Ok(body)
}

/// A POST of `request` with the bearer token; the status and the JSON body.
fn post(
    addr: &str,
    path: &str,
    token: Option<&str>,
    request: &impl serde::Serialize,
) -> Result<(u16, Value), CtlError> {
    send(addr, |a| {
        let mut post = a.post(url(addr, path));
        if let Some(token) = token {
            post = post.header("Authorization", &format!("Bearer {token}"));
        }
        post.send_json(request)
    })
}

fn message(body: &Value) -> String {
    body["error"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned)
}

/// `ctl status`: every query type's stage.
pub fn status(addr: &str, token: Option<&str>, json: bool) -> Result<Outcome, CtlError> {
    let body = get(addr, "/api/state", token)?;
    if json {
        return Ok(Outcome::Done(pretty(&body)));
    }
    let mut out = format!(
        "control database: {}\n{:<28} {:<14} {:<9} {:<6} {}\n",
        if body["control_connected"] == true {
            "connected"
        } else {
            "NOT connected (serving with the last state)"
        },
        "query type",
        "stage",
        "writes",
        "from",
        "changed"
    );
    for qt in body["query_types"].as_array().into_iter().flatten() {
        let stage = crate::routing::rules::stage_label(
            qt["stage"].as_str().unwrap_or("?"),
            qt["percent"].as_i64().unwrap_or(0) as i16,
        );
        out.push_str(&format!(
            "{:<28} {:<14} {:<9} {:<6} {}\n",
            qt["query_type"].as_str().unwrap_or("?"),
            stage,
            qt["dual_write"].as_str().unwrap_or("?"),
            qt["source"].as_str().unwrap_or("?"),
            qt["updated_at"].as_str().unwrap_or("-"),
        ));
    }
    Ok(Outcome::Done(out))
}

/// `ctl set`: one query type to a stage, with a reason.
#[allow(clippy::too_many_arguments)]
pub fn set(
    addr: &str,
    token: Option<&str>,
    query_type: &str,
    stage: &str,
    percent: Option<u8>,
    reason: &str,
    force: bool,
    json: bool,
) -> Result<Outcome, CtlError> {
    let request = serde_json::json!({
        "stage": stage,
        "percent": percent,
        "reason": reason,
        "force": force,
    });
    let path = format!("/api/state/{query_type}");
    let (status, body) = post(addr, &path, token, &request)?;
    match status {
        200 if json => Ok(Outcome::Done(pretty(&body))),
        200 => Ok(Outcome::Done(format!(
            "{}: {} → {}{}\n",
            body["query_type"].as_str().unwrap_or(query_type),
            body["from"].as_str().unwrap_or("(none)"),
            body["to"].as_str().unwrap_or("?"),
            if body["forced"] == true {
                " (forced past the safety gate; recorded)"
            } else {
                ""
            }
        ))),
        400 | 404 | 409 => Ok(Outcome::Refused(format!("refused: {}\n", message(&body)))),
        status => Err(CtlError::Failed {
            status,
            message: message(&body),
        }),
    }
}

/// `ctl history`: the latest stage changes, newest first.
pub fn history(
    addr: &str,
    token: Option<&str>,
    limit: u32,
    json: bool,
) -> Result<Outcome, CtlError> {
    let body = get(addr, &format!("/api/history?limit={limit}"), token)?;
    if json {
        return Ok(Outcome::Done(pretty(&body)));
    }
    let mut out = format!(
        "{:<21} {:<24} {:<26} {:<10} {}\n",
        "when (UTC)", "query type", "from → to", "by", "why"
    );
    for e in body.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<21} {:<24} {:<26} {:<10} {}{}\n",
            e["changed_at"].as_str().unwrap_or("?"),
            e["query_type"].as_str().unwrap_or("?"),
            format!(
                "{} → {}",
                e["from"].as_str().unwrap_or("(none)"),
                e["to"].as_str().unwrap_or("?")
            ),
            format!(
                "{} ({})",
                e["changed_by"].as_str().unwrap_or("?"),
                e["via"].as_str().unwrap_or("?")
            ),
            e["reason"].as_str().unwrap_or(""),
            if e["forced"] == true { " [FORCED]" } else { "" },
        ));
    }
    Ok(Outcome::Done(out))
}

/// `ctl mark`: a class of divergence is expected (counted apart from the confirmed ones).
pub fn mark(
    addr: &str,
    token: Option<&str>,
    request: &crate::shadow::divergence::MarkRequest,
    json: bool,
) -> Result<Outcome, CtlError> {
    let (status, body) = post(addr, "/api/marks", token, request)?;
    match status {
        200 if json => Ok(Outcome::Done(pretty(&body))),
        200 => Ok(Outcome::Done(format!(
            "{}: {} divergences in ({}) are expected as {}; counted apart from now on\n",
            request.query_type,
            request.kind,
            request.columns.join(", "),
            request.class
        ))),
        400 => Ok(Outcome::Refused(format!("refused: {}\n", message(&body)))),
        status => Err(CtlError::Failed {
            status,
            message: message(&body),
        }),
    }
}

/// `ctl changes`: the declared behaviour changes, how often each happened, accepted or not.
pub fn changes(addr: &str, token: Option<&str>, json: bool) -> Result<Outcome, CtlError> {
    let body = get(addr, "/api/behaviour_changes", token)?;
    if json {
        return Ok(Outcome::Done(pretty(&body)));
    }
    let mut out = format!(
        "{:<30} {:<18} {:>8}  {}\n",
        "behaviour change", "kind", "seen", "accepted"
    );
    for c in body.as_array().into_iter().flatten() {
        let accepted = match &c["accepted"] {
            Value::Null if c["name"].is_null() => "NOT DECLARED in the rules".to_owned(),
            Value::Null => "no".to_owned(),
            a => format!(
                "{} by {}: {}",
                a["accepted_at"].as_str().unwrap_or("?"),
                a["accepted_by"].as_str().unwrap_or("?"),
                a["reason"].as_str().unwrap_or("")
            ),
        };
        out.push_str(&format!(
            "{:<30} {:<18} {:>8}  {accepted}\n",
            c["name"].as_str().unwrap_or("-"),
            c["kind"].as_str().unwrap_or("?"),
            c["observed"].as_i64().unwrap_or(0),
        ));
    }
    Ok(Outcome::Done(out))
}

/// `ctl accept`: a reviewer accepts a declared behaviour change.
pub fn accept(
    addr: &str,
    token: Option<&str>,
    name: &str,
    reason: &str,
    json: bool,
) -> Result<Outcome, CtlError> {
    let (status, body) = post(
        addr,
        &format!("/api/behaviour_changes/{name}/accept"),
        token,
        &serde_json::json!({ "reason": reason }),
    )?;
    match status {
        200 if json => Ok(Outcome::Done(pretty(&body))),
        200 => Ok(Outcome::Done(format!(
            "{name} accepted ({}, seen {} times): the gate lets {} serve from v2 as far as it is concerned\n",
            body["kind"].as_str().unwrap_or("?"),
            body["observed"].as_i64().unwrap_or(0),
            body["query_types"]
                .as_array()
                .map(|q| q
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ))),
        400 | 404 => Ok(Outcome::Refused(format!("refused: {}\n", message(&body)))),
        status => Err(CtlError::Failed {
            status,
            message: message(&body),
        }),
    }
}

fn pretty(body: &Value) -> String {
    serde_json::to_string_pretty(body).unwrap_or_default() + "\n"
}
