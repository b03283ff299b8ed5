//! Reaching a PostgreSQL server from a URL.
//!
//! Owns the one place where a database URL becomes a connection, so that every command
//! reports a bad URL, an unreachable server or a refused login the same way: one line
//! that says what to do. It never prints the URL's password.

use std::fmt;

use tokio_postgres::{Client, Config, NoTls, config::Host, error::SqlState};

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
pub fn parse_url(url: &str) -> Result<Config, ConnectError> {
    if url.trim().is_empty() {
        return Err(ConnectError::InvalidUrl {
            reason: "it is empty".to_owned(),
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

/// Connects and drives the connection on the current runtime.
pub async fn connect(config: &Config) -> Result<Client, ConnectError> {
    let target = Target::of(config);
    let (client, connection) = config
        .connect(NoTls)
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
