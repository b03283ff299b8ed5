//! What each console command does. Changes go through the same functions as the admin API
//! and `cutover ctl` (the gate, the audit); reads come from this replica's memory or the
//! control database.

use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::error::SqlState;

use super::{command::Command, stats};
use crate::{control, proxy::session::Shared};

/// One value of an answer's row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Float(Option<f64>),
    Bool(bool),
}

impl Value {
    pub fn text(s: impl Into<String>) -> Self {
        Value::Text(Some(s.into()))
    }
}

/// What a command answers: rows (for the commands with columns) and a command tag, and a
/// notice to go before them.
#[derive(Debug, Default)]
pub struct Answer {
    pub rows: Vec<Vec<Value>>,
    pub tag: String,
    pub notice: Option<String>,
}

impl Answer {
    fn rows(tag: &str, rows: Vec<Vec<Value>>) -> Self {
        Self {
            rows,
            tag: tag.to_owned(),
            notice: None,
        }
    }

    fn done(tag: &str) -> Self {
        Self::rows(tag, Vec::new())
    }
}

/// A command that failed: the SQLSTATE and the message the operator reads.
#[derive(Debug)]
pub struct Failed(pub SqlState, pub String);

/// How long `PAUSE` waits for sessions to leave their transactions before it answers with a
/// warning (the pause stays in effect).
pub const PAUSE_PATIENCE: Duration = Duration::from_secs(60);

/// Runs one command for the console user `user`.
pub async fn execute(shared: &Shared, user: &str, command: &Command) -> Result<Answer, Failed> {
    match command {
        Command::Help => Ok(Answer::rows(
            "SHOW",
            super::command::HELP
                .iter()
                .map(|(c, d)| vec![Value::text(*c), Value::text(*d)])
                .collect(),
        )),
        Command::Version => Ok(Answer::rows("SHOW", vec![vec![Value::text(version())]])),
        Command::QueryTypes => Ok(query_types(shared)),
        Command::Stats => Ok(stats(shared)),
        Command::Clients => Ok(clients(shared)),
        Command::Config => Ok(config(shared)),
        Command::History => history(shared).await,
        Command::Changes => changes(shared).await,
        Command::Marks => marks(shared).await,
        Command::SetStage {
            query_type,
            stage,
            percent,
            reason,
            force,
        } => {
            control::request_change(
                &shared.control,
                shared.classifier.load().rules(),
                query_type.clone(),
                stage,
                *percent,
                reason.clone(),
                user,
                "sql",
                *force,
            )
            .await
            .map_err(refused)?;
            Ok(Answer::done("SET STAGE"))
        }
        Command::Accept { change, reason } => {
            let client = control_client(shared).await?;
            control::behaviour::accept(
                &client,
                shared.classifier.load().rules(),
                change,
                reason,
                user,
                "sql",
            )
            .await
            .map_err(refused)?;
            Ok(Answer::done("ACCEPT"))
        }
        Command::Mark {
            query_type,
            kind,
            columns,
            class,
            note,
        } => {
            let request = crate::shadow::divergence::MarkRequest {
                query_type: query_type.clone(),
                kind: kind.clone(),
                columns: columns.clone(),
                class: class.clone(),
                note: note.clone(),
            };
            let problems = request.problems();
            if !problems.is_empty() {
                return Err(Failed(
                    SqlState::INVALID_PARAMETER_VALUE,
                    problems.join("; "),
                ));
            }
            let client = control_client(shared).await?;
            crate::shadow::divergence::mark(&client, &request, user)
                .await
                .map_err(database)?;
            Ok(Answer::done("MARK"))
        }
        Command::Reload => {
            tracing::info!(%user, "reload asked on the console");
            reload(shared)
        }
        Command::Pause => Ok(pause(shared, user).await),
        Command::Resume => {
            let mut answer = Answer::done("RESUME");
            if shared.clients.resume() {
                tracing::info!(%user, "resumed");
            } else {
                answer.notice = Some("cutover was not paused".into());
            }
            Ok(answer)
        }
        Command::SessionSetting(tag) => Ok(Answer::done(tag)),
        Command::SelectOne => Ok(Answer::rows("SELECT", vec![vec![Value::Int(Some(1))]])),
        Command::SelectVersion => Ok(Answer::rows(
            "SELECT",
            vec![vec![Value::text(format!(
                "PostgreSQL 15.0 ({}: the admin console, not a database)",
                version()
            ))]],
        )),
        Command::Setting(i) => {
            let (name, _, value) = super::command::SETTINGS[*i];
            let value = if name == "server_version" {
                format!("{value} ({})", version())
            } else {
                value.to_owned()
            };
            Ok(Answer::rows("SHOW", vec![vec![Value::text(value)]]))
        }
        Command::Begin => Ok(Answer::done("BEGIN")),
        Command::Commit => Ok(Answer::done("COMMIT")),
        Command::Rollback => Ok(Answer::done("ROLLBACK")),
    }
}

pub fn version() -> String {
    format!("cutover {}", env!("CARGO_PKG_VERSION"))
}

fn refused(error: control::ChangeError) -> Failed {
    let code = match error.failure() {
        control::Failure::Invalid => SqlState::INVALID_PARAMETER_VALUE,
        control::Failure::Unknown => SqlState::UNDEFINED_OBJECT,
        control::Failure::Refused => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        control::Failure::Unavailable => SqlState::CONNECTION_EXCEPTION,
        control::Failure::Busy => SqlState::LOCK_NOT_AVAILABLE,
    };
    let message = error.explained(["SHOW QUERY_TYPES", "SHOW CHANGES"]);
    Failed(code, message)
}

fn database(error: tokio_postgres::Error) -> Failed {
    Failed(
        SqlState::CONNECTION_EXCEPTION,
        crate::net::connect::cause(&error),
    )
}

async fn control_client(shared: &Shared) -> Result<tokio_postgres::Client, Failed> {
    shared.control.connect().await.map_err(refused)
}

/// UTC, to the second.
fn timestamp(at: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(at)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn query_types(shared: &Shared) -> Answer {
    let live = shared.control.live();
    let classifier = shared.classifier.load();
    let mut rows: Vec<(String, Vec<Value>)> = live
        .by_type
        .values()
        .map(|s| {
            (
                s.query_type.clone(),
                vec![
                    Value::text(&s.query_type),
                    Value::text(&s.stage),
                    Value::Int(Some(i64::from(s.percent))),
                    Value::text(&s.dual_write),
                    Value::text("live"),
                    Value::text(&s.updated_at),
                ],
            )
        })
        .collect();
    rows.extend(
        classifier
            .rules()
            .query_types
            .iter()
            .filter(|qt| !live.by_type.contains_key(&qt.name))
            .map(|qt| {
                let (stage, percent) = crate::routing::rules::stage_columns(qt.stage);
                (
                    qt.name.clone(),
                    vec![
                        Value::text(&qt.name),
                        Value::text(stage),
                        Value::Int(Some(i64::from(percent))),
                        Value::text(if qt.strict { "strict" } else { "isolated" }),
                        Value::text("rules"),
                        Value::Text(None),
                    ],
                )
            }),
    );
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Answer::rows("SHOW", rows.into_iter().map(|(_, r)| r).collect())
}

fn stats(shared: &Shared) -> Answer {
    let text = crate::metrics::recorder().render();
    let mut by_type = stats::per_query_type(&text);
    // Every named query type has a line, counted or not.
    for qt in &shared.classifier.load().rules().query_types {
        by_type.entry(qt.name.clone()).or_default();
    }
    let ms = |seconds: Option<f64>| Value::Float(seconds.map(|s| s * 1000.0));
    let rows = by_type
        .into_iter()
        .map(|(name, t)| {
            let outcome =
                |o: &str| Value::Int(Some(t.comparisons.get(o).copied().unwrap_or(0) as i64));
            vec![
                Value::text(name),
                Value::Int(Some(t.served_legacy as i64)),
                Value::Int(Some(t.served_target as i64)),
                outcome("match"),
                outcome("diverged"),
                outcome("error"),
                outcome("expected"),
                outcome("transient"),
                outcome("nondeterministic"),
                outcome("skipped"),
                ms(t.legacy.map(|(p50, _)| p50)),
                ms(t.legacy.map(|(_, p99)| p99)),
                ms(t.target.map(|(p50, _)| p50)),
                ms(t.target.map(|(_, p99)| p99)),
            ]
        })
        .collect();
    Answer::rows("SHOW", rows)
}

fn clients(shared: &Shared) -> Answer {
    let rows = shared
        .clients
        .list()
        .into_iter()
        .map(|c| {
            vec![
                Value::Int(Some(i64::from(c.id))),
                Value::text(if c.console { "console" } else { "app" }),
                Value::text(&c.user),
                Value::text(&c.database),
                Value::text(&c.application_name),
                Value::Text(c.peer.map(|p| p.to_string())),
                Value::Bool(c.tls),
                Value::text(c.state().as_str()),
                Value::text(timestamp(c.since())),
                Value::text(timestamp(c.connected_at)),
                Value::Int(Some(c.batches() as i64)),
            ]
        })
        .collect();
    Answer::rows("SHOW", rows)
}

/// A database URL as the operator may see it: never its password.
fn shown_database(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host={} port={} dbname={} user={} sslmode={:?}",
        hosts.join(","),
        ports.join(","),
        config.get_dbname().unwrap_or(""),
        config.get_user().unwrap_or(""),
        config.get_ssl_mode()
    )
    .to_lowercase()
}

fn config(shared: &Shared) -> Answer {
    let c = &shared.config;
    let tokens = shared.tokens.load();
    let names = |tokens: &[(String, String)]| {
        let names: Vec<&str> = tokens.iter().map(|(n, _)| n.as_str()).collect();
        if names.is_empty() {
            "(none)".to_owned()
        } else {
            format!("{} (tokens not shown)", names.join(", "))
        }
    };
    let restart = "restart";
    let rows: Vec<(&str, String, &str)> = vec![
        ("listen", c.listen.to_string(), restart),
        ("upstream", shown_database(&c.upstream_config), restart),
        (
            "admin",
            c.admin.map_or("off".to_owned(), |a| a.to_string()),
            restart,
        ),
        (
            "max_client_connections",
            c.max_client_connections.to_string(),
            restart,
        ),
        (
            "max_logins_in_progress",
            c.max_logins_in_progress.to_string(),
            restart,
        ),
        (
            "authentication_timeout_seconds",
            c.authentication_timeout.as_secs().to_string(),
            restart,
        ),
        (
            "max_message_bytes",
            c.max_message_bytes.to_string(),
            restart,
        ),
        (
            "shutdown_grace_seconds",
            c.shutdown_grace.as_secs().to_string(),
            restart,
        ),
        ("worker_threads", c.worker_threads.to_string(), restart),
        (
            "rules",
            c.rules.display().to_string(),
            "the directory: restart; its files: RELOAD",
        ),
        (
            "tls_cert",
            c.tls
                .as_ref()
                .map_or("(none)".into(), |t| t.cert.display().to_string()),
            restart,
        ),
        (
            "tls_key",
            c.tls
                .as_ref()
                .map_or("(none)".into(), |t| t.key.display().to_string()),
            restart,
        ),
        (
            "client_tls_required",
            c.client_tls_required.to_string(),
            restart,
        ),
        (
            "auth_file",
            c.auth
                .file
                .as_ref()
                .map_or("(none)".into(), |p| p.display().to_string()),
            "RELOAD reads it again",
        ),
        (
            "auth_url",
            c.auth
                .query
                .as_ref()
                .map_or("(none)".into(), |(db, _)| shown_database(db)),
            restart,
        ),
        (
            "auth_query",
            c.auth
                .query
                .as_ref()
                .map_or("(none)".into(), |(_, q)| q.clone()),
            restart,
        ),
        (
            "control",
            c.control.as_ref().map_or("(none)".into(), shown_database),
            restart,
        ),
        ("admin_tokens", names(&tokens.admin), "RELOAD"),
        ("read_tokens", names(&tokens.read), "RELOAD"),
        (
            "shadow",
            c.shadow
                .as_ref()
                .map_or("(off)".into(), |s| shown_database(&s.database)),
            restart,
        ),
        (
            "shadow_connections",
            c.shadow.as_ref().map_or(0, |s| s.connections).to_string(),
            restart,
        ),
        (
            "shadow_queue",
            c.shadow.as_ref().map_or(0, |s| s.queue).to_string(),
            restart,
        ),
        (
            "shadow_timeout_ms",
            c.shadow
                .as_ref()
                .map_or(0, |s| s.statement_timeout.as_millis())
                .to_string(),
            restart,
        ),
    ];
    Answer::rows(
        "SHOW",
        rows.into_iter()
            .map(|(k, v, r)| vec![Value::text(k), Value::text(v), Value::text(r)])
            .collect(),
    )
}

async fn history(shared: &Shared) -> Result<Answer, Failed> {
    let client = control_client(shared).await?;
    let entries = control::history(&client, 50).await.map_err(database)?;
    Ok(Answer::rows(
        "SHOW",
        entries
            .into_iter()
            .map(|e| {
                vec![
                    Value::text(e.changed_at),
                    Value::text(e.query_type),
                    Value::Text(e.from),
                    Value::text(e.to),
                    Value::text(e.changed_by),
                    Value::text(e.via),
                    Value::text(e.reason),
                    Value::Bool(e.forced),
                ]
            })
            .collect(),
    ))
}

async fn changes(shared: &Shared) -> Result<Answer, Failed> {
    let client = control_client(shared).await?;
    let statuses = control::behaviour::status(&client, shared.classifier.load().rules())
        .await
        .map_err(database)?;
    Ok(Answer::rows(
        "SHOW",
        statuses
            .into_iter()
            .map(|s| {
                let accepted = s.accepted.as_ref();
                vec![
                    Value::Text(s.name.clone()),
                    Value::text(s.kind.as_str()),
                    Value::text(s.query_types.join(", ")),
                    Value::Int(Some(s.observed)),
                    Value::Text(accepted.map(|a| a.accepted_by.clone())),
                    Value::Text(accepted.map(|a| a.accepted_at.clone())),
                    Value::Text(accepted.map(|a| a.reason.clone())),
                ]
            })
            .collect(),
    ))
}

async fn marks(shared: &Shared) -> Result<Answer, Failed> {
    let client = control_client(shared).await?;
    let rows = client
        .query(
            "SELECT query_type, kind, array_to_string(columns, ', '), class, note, marked_by,
                    to_char(marked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
             FROM cutover.divergence_marks ORDER BY marked_at DESC, id DESC",
            &[],
        )
        .await
        .map_err(database)?;
    Ok(Answer::rows(
        "SHOW",
        rows.iter()
            .map(|r| {
                (0..7)
                    .map(|i| Value::Text(r.get::<_, Option<String>>(i)))
                    .collect()
            })
            .collect(),
    ))
}

fn reload(shared: &Shared) -> Result<Answer, Failed> {
    let done = crate::admin::reload::everything(shared);
    let mut problems = Vec::new();
    let config = match done.config {
        None => "not read again: this proxy was started without a configuration source".into(),
        Some(Err(error)) => {
            problems.push(format!("the configuration was not reloaded: {error}"));
            String::new()
        }
        Some(Ok(r)) => {
            let mut parts = Vec::new();
            if !r.applied.is_empty() {
                parts.push(format!("applied: {}", r.applied.join(", ")));
            }
            if !r.need_restart.is_empty() {
                parts.push(format!(
                    "changed, applied only by a restart: {}",
                    r.need_restart.join(", ")
                ));
            }
            if parts.is_empty() {
                "unchanged".into()
            } else {
                parts.join("; ")
            }
        }
    };
    let rules = match done.rules {
        Ok(n) => format!("{n} query types"),
        Err(errors) => {
            problems.push(format!(
                "the rules were not reloaded (the last good rules stay):\n{}",
                errors
                    .0
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
            String::new()
        }
    };
    if !problems.is_empty() {
        return Err(Failed(SqlState::CONFIG_FILE_ERROR, problems.join("\n")));
    }
    Ok(Answer::rows(
        "RELOAD",
        vec![
            vec![Value::text("configuration"), Value::text(config)],
            vec![Value::text("rules"), Value::text(rules)],
        ],
    ))
}

/// Holds new transactions, then waits until no session is inside one (or has work in
/// flight), up to [`PAUSE_PATIENCE`].
async fn pause(shared: &Shared, user: &str) -> Answer {
    if shared.clients.pause() {
        tracing::info!(%user, "paused: new transactions are held");
    }
    let started = Instant::now();
    let mut answer = Answer::done("PAUSE");
    loop {
        let busy = shared.clients.busy();
        if busy == 0 {
            return answer;
        }
        if started.elapsed() >= PAUSE_PATIENCE {
            answer.notice = Some(format!(
                "{busy} session(s) still inside a transaction after {} s; new transactions stay held (SHOW CLIENTS says which; RESUME releases them)",
                PAUSE_PATIENCE.as_secs()
            ));
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
