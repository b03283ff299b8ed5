//! Reaching a PostgreSQL server from a URL.
//!
//! Owns the one place where a database URL becomes a connection, so that every command
//! reports a bad URL, an unreachable server or a refused login the same way: one line
//! that says what to do. It never prints the URL's password.

use std::{fmt, path::PathBuf};

use tokio_postgres::{Client, Config, config::Host, error::SqlState};

use super::tls::UpstreamVerify;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "invalid database URL ({reason}); expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
    )]
    InvalidUrl { reason: String },

    #[error(
        "cannot reach PostgreSQL at {target}: {reason}; check that the server is running and the URL's host and port"
    )]
    Unreachable { target: Target, reason: String },

    #[error(
        "PostgreSQL at {target} refused the login: {message}; check the URL's user and password"
    )]
    LoginRefused { target: Target, message: String },

    #[error("PostgreSQL at {target} has no such database: {message}; create it or fix the URL")]
    NoSuchDatabase { target: Target, message: String },

    #[error("PostgreSQL at {target} refused the connection: {message}")]
    Refused { target: Target, message: String },
}

/// Where a connection goes, for messages: user, host, port and database, never the password.
#[derive(Debug, Clone)]
pub struct Target {
    user: String,
    host: String,
    port: u16,
    dbname: String,
}

impl Target {
    pub fn of(config: &Config) -> Self {
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let user = config.get_user().unwrap_or("(default user)").to_owned();
        Self {
            dbname: config.get_dbname().unwrap_or(&user).to_owned(),
            port: config.get_ports().first().copied().unwrap_or(5432),
            host,
            user,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{} as {}",
            self.host, self.port, self.dbname, self.user
        )
    }
}

/// Parses a `postgres://` URL (or a libpq key=value string) without echoing it back.
///
/// For the proxy's own connections: they encrypt as `sslmode` says (`prefer`, `require`)
/// without verifying the certificate; `verify-ca`/`verify-full` are for the upstream URL
/// (see [`take_verify`]) and refused here with the way out.
pub fn parse_url(url: &str) -> Result<Config, ConnectError> {
    if url.trim().is_empty() {
        return Err(ConnectError::InvalidUrl {
            reason: "it is empty".to_owned(),
        });
    }
    if !matches!(take_verify(url), Ok((_, UpstreamVerify::None))) {
        return Err(ConnectError::InvalidUrl {
            reason: "certificate verification (sslmode=verify-ca/verify-full, sslrootcert) is done for the upstream URL's sessions; cutover's own connections encrypt without verifying: use sslmode=require here".to_owned(),
        });
    }
    url.parse::<Config>().map_err(|e| ConnectError::InvalidUrl {
        // tokio-postgres' parse errors name the offending part, never the whole URL.
        reason: match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    })
}

/// Takes libpq's `sslmode=verify-ca|verify-full` and `sslrootcert` out of a database URL
/// (tokio-postgres, which parses the rest, knows neither): the URL left asks for
/// `sslmode=require`, and the verification is returned. As libpq, `require` with a CA file
/// verifies like `verify-ca`.
pub fn take_verify(url: &str) -> Result<(String, UpstreamVerify), String> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let (head, params, separator) = if is_url {
        match url.split_once('?') {
            Some((head, query)) => (format!("{head}?"), query.split('&').collect(), "&"),
            None => return Ok((url.to_owned(), UpstreamVerify::None)),
        }
    } else {
        (
            String::new(),
            url.split_whitespace().collect::<Vec<_>>(),
            " ",
        )
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for param in params {
        match param.split_once('=') {
            Some(("sslmode", m)) => mode = Some(m.to_owned()),
            Some(("sslrootcert", path)) => {
                root = Some(
                    percent_encoding::percent_decode_str(path)
                        .decode_utf8_lossy()
                        .into_owned(),
                )
            }
            _ => kept.push(param.to_owned()),
        }
    }
    let needs_root = |mode: &str| {
        root.clone().map(PathBuf::from).ok_or_else(|| {
            format!(
                "sslmode={mode} needs sslrootcert=FILE (the CA that signed the server's certificate)"
            )
        })
    };
    if root.as_deref() == Some("system") {
        return Err("sslrootcert=system is not supported: give the CA file".into());
    }
    let (mode, verify) = match mode.as_deref() {
        Some("verify-ca") => ("require", UpstreamVerify::Ca(needs_root("verify-ca")?)),
        Some("verify-full") => ("require", UpstreamVerify::Full(needs_root("verify-full")?)),
        Some("require") if root.is_some() => {
            ("require", UpstreamVerify::Ca(needs_root("require")?))
        }
        Some(other) => (other, UpstreamVerify::None),
        None => ("", UpstreamVerify::None),
    };
    if !mode.is_empty() {
        kept.push(format!("sslmode={mode}"));
    }
    let rebuilt = format!("{head}{}", kept.join(separator));
    Ok((
        rebuilt
            .strip_suffix('?')
            .map(str::to_owned)
            .unwrap_or(rebuilt),
        verify,
    ))
}

/// Connects (over TLS when the URL's `sslmode` asks, `prefer` by default) and drives the
/// connection on the current runtime.
pub async fn connect(config: &Config) -> Result<Client, ConnectError> {
    let target = Target::of(config);
    let (client, connection) = config
        .connect(crate::net::tls::PostgresTls::shared())
        .await
        .map_err(|e| classify(target, e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection closed");
        }
    });
    Ok(client)
}

/// Connects under an `application_name` of the proxy's own (what `pg_stat_activity` shows).
pub async fn connect_as(config: &Config, application_name: &str) -> Result<Client, ConnectError> {
    let mut config = config.clone();
    config.application_name(application_name);
    connect(&config).await
}

/// A background loop's failure (control feed, ramp-down, fold), logged when it first
/// happens or changes, not at every retry, and forgotten once the loop recovers.
#[derive(Debug, Default)]
pub struct Retrying {
    last: String,
}

impl Retrying {
    /// Whether `error` is not the one logged last (it is now).
    pub fn is_new(&mut self, error: &str) -> bool {
        if self.last == error {
            return false;
        }
        error.clone_into(&mut self.last);
        true
    }

    /// The loop works again: the next failure is logged whatever it is.
    pub fn recovered(&mut self) {
        self.last.clear();
    }
}

/// What went wrong, in words, for a log line: the server's message with its SQLSTATE, or
/// the underlying I/O cause — never tokio-postgres's bare "db error".
pub fn cause(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => std::error::Error::source(error)
            .map(|s| s.to_string())
            .unwrap_or_else(|| error.to_string()),
    }
}

fn classify(target: Target, error: tokio_postgres::Error) -> ConnectError {
    let Some(db) = error.as_db_error() else {
        let reason = std::error::Error::source(&error)
            .map(|s| s.to_string())
            .unwrap_or_else(|| error.to_string());
        return ConnectError::Unreachable { target, reason };
    };
    let message = db.message().to_owned();
    let code = db.code();
    if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        ConnectError::LoginRefused { target, message }
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        ConnectError::NoSuchDatabase { target, message }
    } else {
        ConnectError::Refused { target, message }
    }
}
