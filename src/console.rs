//! The admin console over the PostgreSQL protocol, as pgbouncer users expect: `psql` to the
//! proxy's port, database `cutover`, as one of the admin tokens' names with the token as
//! password. It speaks the simple query protocol only:
//!
//! - `SHOW QUERY_TYPES` — every query type, its stage, dual-write mode, where the state
//!   comes from;
//! - `SHOW HISTORY` — the latest stage changes;
//! - `SET STAGE query_type stage [percent] REASON 'why' [FORCE]` — a change, through the
//!   same safety gate and audit as the API and `cutover ctl`;
//! - `SHOW HELP`.
//!
//! Served by the proxy itself: no upstream connection is opened for it. Only enabled when
//! admin tokens are configured; otherwise a database named `cutover` is relayed like any
//! other. The password travels as the client sends it (cleartext): use TLS, or loopback.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;

use crate::{
    control,
    session::{Shared, relay::Duplex, slots::Slot},
    wire::{
        self, Startup, frame,
        messages::{Severity, error_response},
    },
};

/// The database name that opens the console.
pub const DATABASE: &str = "cutover";

/// Whether this startup is for the console.
pub fn wanted(shared: &Shared, startup: &Startup) -> bool {
    !shared.tokens.load().admin.is_empty() && startup.user_and_database().1 == DATABASE
}

/// A row-returning answer: column names and text values.
struct Rows {
    columns: &'static [&'static str],
    rows: Vec<Vec<Option<String>>>,
    tag: String,
}

enum Answer {
    Rows(Rows),
    Done(String),
    Error(SqlState, String),
    Empty,
}

/// Serves one console session to its end.
pub async fn run<C: Duplex>(mut client: C, startup: Startup, shared: &Shared, slot: &Slot) {
    let (user, _) = startup.user_and_database();
    let user = user.to_owned();
    // Authentication: cleartext password = the token of the admin token named as the user.
    if !send(&mut client, &frame(b'R', &3u32.to_be_bytes())).await {
        return;
    }
    let mut buf = BytesMut::new();
    let Ok(Some((tag, body))) = tokio::time::timeout(
        shared.config.authentication_timeout,
        read_message(&mut client, &mut buf),
    )
    .await
    else {
        return;
    };
    let password = body.strip_suffix(b"\0").unwrap_or(&body);
    let allowed = tag == b'p'
        && crate::auth::token_named(&shared.tokens.load().admin, password) == Some(user.as_str());
    if allowed && slot.authenticated().is_err() {
        crate::session::refuse(
            &mut client,
            &SqlState::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already (cutover max_client_connections)",
        )
        .await;
        return;
    }
    if !allowed {
        shared.throttle.failed(crate::auth::Surface::Console).await;
        let message = format!("password authentication failed for console user \"{user}\"");
        crate::session::refuse(&mut client, &SqlState::INVALID_PASSWORD, &message).await;
        return;
    }
    let mut hello = BytesMut::new();
    hello.put_slice(&frame(b'R', &0u32.to_be_bytes()));
    for (name, value) in [
        ("server_version", "15.0 (cutover console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        hello.put_slice(&frame(b'S', &cstrings(&[name, value])));
    }
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&rand::random::<u32>().to_be_bytes());
    key[4..].copy_from_slice(&rand::random::<u32>().to_be_bytes());
    hello.put_slice(&frame(b'K', &key));
    hello.put_slice(&frame(b'Z', b"I"));
    if !send(&mut client, &hello).await {
        return;
    }
    tracing::info!(%user, "console session");

    let mut failed_extended = false;
    while let Some((tag, body)) = read_message(&mut client, &mut buf).await {
        let mut out = BytesMut::new();
        match tag {
            b'Q' => {
                let sql =
                    String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(&body)).into_owned();
                write_answer(&mut out, answer(shared, &user, &sql).await);
                out.put_slice(&frame(b'Z', b"I"));
            }
            b'X' => return,
            b'S' => {
                failed_extended = false;
                out.put_slice(&frame(b'Z', b"I"));
            }
            // Extended protocol: one error, then everything is ignored until Sync.
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' if !failed_extended => {
                failed_extended = true;
                out.put_slice(&error_response(
                    Severity::Error,
                    &SqlState::FEATURE_NOT_SUPPORTED,
                    "the cutover console speaks the simple query protocol only (psql does)",
                ));
            }
            _ => {}
        }
        if !out.is_empty() && !send(&mut client, &out).await {
            return;
        }
    }
}

/// Writes and flushes (over TLS, what is not flushed may wait in the TLS session while the
/// console waits for the client, which waits for the answer); false if the client is gone.
async fn send<C: Duplex>(client: &mut C, bytes: &[u8]) -> bool {
    client.write_all(bytes).await.is_ok() && client.flush().await.is_ok()
}

/// Reads one whole message (tag, body) from the client; None at the end or on a bad frame.
async fn read_message<C: Duplex>(client: &mut C, buf: &mut BytesMut) -> Option<(u8, Vec<u8>)> {
    loop {
        match wire::header(buf, 1 << 20) {
            Ok(Some(h)) if buf.len() >= h.total => {
                let message = buf.split_to(h.total);
                return Some((h.tag, message[5..].to_vec()));
            }
            Ok(_) => {}
            Err(_) => return None,
        }
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn cstrings(values: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn write_answer(out: &mut BytesMut, answer: Answer) {
    match answer {
        Answer::Rows(rows) => {
            let mut desc = BytesMut::new();
            desc.put_u16(rows.columns.len() as u16);
            for name in rows.columns {
                desc.put_slice(name.as_bytes());
                desc.put_u8(0);
                desc.put_u32(0); // table
                desc.put_u16(0); // column
                desc.put_u32(25); // text
                desc.put_i16(-1);
                desc.put_i32(-1);
                desc.put_u16(0); // text format
            }
            out.put_slice(&frame(b'T', &desc));
            for row in &rows.rows {
                let mut data = BytesMut::new();
                data.put_u16(row.len() as u16);
                for value in row {
                    match value {
                        Some(v) => {
                            data.put_i32(v.len() as i32);
                            data.put_slice(v.as_bytes());
                        }
                        None => data.put_i32(-1),
                    }
                }
                out.put_slice(&frame(b'D', &data));
            }
            out.put_slice(&frame(b'C', &cstrings(&[&rows.tag])));
        }
        Answer::Done(tag) => out.put_slice(&frame(b'C', &cstrings(&[&tag]))),
        Answer::Error(code, message) => {
            out.put_slice(&error_response(Severity::Error, &code, &message))
        }
        Answer::Empty => out.put_slice(&frame(b'I', b"")),
    }
}

const HELP: &str = "SHOW QUERY_TYPES; SHOW HISTORY; SET STAGE query_type stage [percent] REASON 'why' [FORCE]; SHOW HELP";

async fn answer(shared: &Shared, user: &str, sql: &str) -> Answer {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    match upper.as_slice() {
        [] => Answer::Empty,
        ["SHOW", "QUERY_TYPES" | "STAGES"] => query_types(shared),
        ["SHOW", "HISTORY"] => history(shared).await,
        ["SHOW", "HELP"] => Answer::Rows(Rows {
            columns: &["command"],
            rows: HELP.split("; ").map(|c| vec![Some(c.to_owned())]).collect(),
            tag: "SHOW".into(),
        }),
        ["SET", "STAGE", ..] => set_stage(shared, user, text).await,
        _ => Answer::Error(
            SqlState::SYNTAX_ERROR,
            format!("the cutover console does not know this command; it knows: {HELP}"),
        ),
    }
}

fn query_types(shared: &Shared) -> Answer {
    let live = shared.control.live();
    let classifier = shared.classifier.load();
    let mut rows: Vec<Vec<Option<String>>> = live
        .by_type
        .values()
        .map(|s| {
            vec![
                Some(s.query_type.clone()),
                Some(s.stage.clone()),
                Some(s.percent.to_string()),
                Some(s.dual_write.clone()),
                Some("live".into()),
                Some(s.updated_at.clone()),
            ]
        })
        .collect();
    rows.extend(
        classifier
            .rules()
            .query_types
            .iter()
            .filter(|qt| !live.by_type.contains_key(&qt.name))
            .map(|qt| {
                let (stage, percent) = control::stage_columns(qt.stage);
                vec![
                    Some(qt.name.clone()),
                    Some(stage.into()),
                    Some(percent.to_string()),
                    Some(if qt.strict { "strict" } else { "isolated" }.into()),
                    Some("rules".into()),
                    None,
                ]
            }),
    );
    rows.sort();
    let tag = format!("SHOW {}", rows.len());
    Answer::Rows(Rows {
        columns: &[
            "query_type",
            "stage",
            "percent",
            "dual_write",
            "source",
            "updated_at",
        ],
        rows,
        tag,
    })
}

async fn history(shared: &Shared) -> Answer {
    let Some(database) = shared.control.database() else {
        return Answer::Error(
            SqlState::CONNECTION_EXCEPTION,
            "no control database (--control)".into(),
        );
    };
    let client = match crate::connect::connect(database).await {
        Ok(client) => client,
        Err(error) => return Answer::Error(SqlState::CONNECTION_EXCEPTION, error.to_string()),
    };
    match control::history(&client, 50).await {
        Ok(entries) => {
            let rows: Vec<Vec<Option<String>>> = entries
                .into_iter()
                .map(|e| {
                    vec![
                        Some(e.changed_at),
                        Some(e.query_type),
                        e.from,
                        Some(e.to),
                        Some(e.changed_by),
                        Some(e.via),
                        Some(e.reason),
                        Some(e.forced.to_string()),
                    ]
                })
                .collect();
            Answer::Rows(Rows {
                columns: &[
                    "changed_at",
                    "query_type",
                    "from",
                    "to",
                    "changed_by",
                    "via",
                    "reason",
                    "forced",
                ],
                tag: format!("SHOW {}", rows.len()),
                rows,
            })
        }
        Err(error) => Answer::Error(SqlState::CONNECTION_EXCEPTION, error.to_string()),
    }
}

/// `SET STAGE query_type stage [percent] REASON 'why' [FORCE]`.
fn parse_set(text: &str) -> Result<(String, String, Option<i64>, String, bool), String> {
    let usage = "usage: SET STAGE query_type stage [percent] REASON 'why' [FORCE]";
    let upper = text.to_ascii_uppercase();
    let reason_at = upper.find(" REASON ").ok_or(usage)?;
    let head: Vec<&str> = text[..reason_at].split_whitespace().collect();
    let rest = text[reason_at + " REASON ".len()..].trim();
    let (query_type, stage, percent) = match head.as_slice() {
        [_, _, qt, stage] => (*qt, *stage, None),
        [_, _, qt, stage, percent] => (
            *qt,
            *stage,
            Some(
                percent
                    .parse::<i64>()
                    .map_err(|_| format!("percent {percent:?} is not a number"))?,
            ),
        ),
        _ => return Err(usage.into()),
    };
    let rest = rest.strip_prefix('\'').ok_or(usage)?;
    // The reason is a SQL string literal: '' stands for a quote.
    let mut reason = String::new();
    let mut chars = rest.char_indices().peekable();
    let mut end = None;
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if chars.peek().map(|(_, c)| *c) == Some('\'') {
                reason.push('\'');
                chars.next();
            } else {
                end = Some(i);
                break;
            }
        } else {
            reason.push(c);
        }
    }
    let end = end.ok_or("the reason's quote is not closed")?;
    let tail = rest[end + 1..].trim();
    let force = match tail.to_ascii_uppercase().as_str() {
        "" => false,
        "FORCE" => true,
        other => return Err(format!("unexpected {other:?} after the reason; {usage}")),
    };
    Ok((
        query_type.to_ascii_lowercase(),
        stage.to_ascii_lowercase(),
        percent,
        reason,
        force,
    ))
}

async fn set_stage(shared: &Shared, user: &str, text: &str) -> Answer {
    let (query_type, stage, percent, reason, force) = match parse_set(text) {
        Ok(parsed) => parsed,
        Err(why) => return Answer::Error(SqlState::SYNTAX_ERROR, why),
    };
    let result = control::request_change(
        &shared.control,
        shared.classifier.load().rules(),
        query_type,
        &stage,
        percent,
        reason,
        user,
        "sql",
        force,
    )
    .await;
    match result {
        Ok(_) => Answer::Done("SET STAGE".into()),
        Err(error) => {
            let code = match error.failure() {
                control::Failure::Invalid => SqlState::INVALID_PARAMETER_VALUE,
                control::Failure::Unknown => SqlState::UNDEFINED_OBJECT,
                control::Failure::Refused => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                control::Failure::Unavailable => SqlState::CONNECTION_EXCEPTION,
            };
            let message = match &error {
                control::ChangeError::UnknownQueryType(_) => {
                    format!("{error} (SHOW QUERY_TYPES lists them)")
                }
                _ => error.to_string(),
            };
            Answer::Error(code, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_stage_commands_parse() {
        assert_eq!(
            parse_set("SET STAGE record_deposit cutover 10 REASON 'it''s time' FORCE").unwrap(),
            (
                "record_deposit".into(),
                "cutover".into(),
                Some(10),
                "it's time".into(),
                true
            )
        );
        assert_eq!(
            parse_set("set stage Set_Status shadow reason 'compare'").unwrap(),
            (
                "set_status".into(),
                "shadow".into(),
                None,
                "compare".into(),
                false
            )
        );
        for bad in [
            "SET STAGE x shadow",
            "SET STAGE x shadow REASON why",
            "SET STAGE x shadow REASON 'open",
            "SET STAGE x cutover ten REASON 'x'",
            "SET STAGE x shadow REASON 'x' NOW",
        ] {
            assert!(parse_set(bad).is_err(), "{bad}");
        }
    }
}
