//! Where the proxy learns a client's password secret, and what it does with one.
//!
//! By default the proxy relays a client's login to the server (the server authenticates the
//! client; the proxy never sees a password). That cannot work for SCRAM when both
//! connections use TLS: channel binding binds each leg to its own TLS connection, and a
//! server on TLS refuses a client that says it could bind but was not offered binding (a
//! downgrade). With an auth source configured, the proxy authenticates the client itself
//! against the user's secret, as pgbouncer does with `auth_file` / `auth_query`, and logs in
//! to the server with what the client's SCRAM proof revealed (never the password):
//!
//! - [`AuthFile`]: pgbouncer's `userlist.txt` format, `"user" "secret"` per line;
//! - [`AuthQuery`]: a query run on the server with a role allowed to read the secrets
//!   (default: `pg_authid`, as pgbouncer's `auth_query`).
//!
//! A user with no secret in any source is relayed as before: the server decides. The SCRAM
//! state machines are in [`scram`]; the login itself is `session::login`.

pub mod scram;

use std::{collections::HashMap, path::Path};

use md5::{Digest, Md5};
use tokio_postgres::Client;

pub use scram::{ClientKeys, ScramSecret};

/// A user's password secret, in one of the forms PostgreSQL stores (and pgbouncer's
/// `auth_file` takes). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(ScramSecret),
    /// `md5` followed by 32 hex digits: md5(password || user).
    Md5(String),
    /// The password itself (an `auth_file` may hold one).
    Password(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Scram(_) => "Secret::Scram(..)",
            Secret::Md5(_) => "Secret::Md5(..)",
            Secret::Password(_) => "Secret::Password(..)",
        })
    }
}

impl Secret {
    pub fn parse(text: &str) -> Secret {
        if let Some(scram) = ScramSecret::parse(text) {
            return Secret::Scram(scram);
        }
        match text.strip_prefix("md5") {
            Some(hex) if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Secret::Md5(hex.to_ascii_lowercase())
            }
            _ => Secret::Password(text.to_owned()),
        }
    }
}

/// md5 as PostgreSQL's password packet has it: `md5` || hex(md5(inner || salt)), where
/// `inner` is the stored hex of md5(password || user).
pub fn md5_response(inner_hex: &str, salt: &[u8; 4]) -> String {
    let mut hash = Md5::new();
    hash.update(inner_hex.as_bytes());
    hash.update(salt);
    format!("md5{}", hex::encode(hash.finalize()))
}

/// The stored form of an md5 password: hex(md5(password || user)).
pub fn md5_inner(password: &str, user: &str) -> String {
    let mut hash = Md5::new();
    hash.update(password.as_bytes());
    hash.update(user.as_bytes());
    hex::encode(hash.finalize())
}

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected \"user\" \"secret\"")]
    Syntax { path: String, line: usize },
}

/// Secrets from a file in pgbouncer's `auth_file` format: per line, a double-quoted user
/// name and a double-quoted secret (`""` inside quotes is one quote); lines starting with
/// `;` or `#` and blank lines are ignored; what follows the secret is too.
#[derive(Default)]
pub struct AuthFile {
    users: HashMap<String, Secret>,
}

impl AuthFile {
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|line| AuthFileError::Syntax {
            path: path.display().to_string(),
            line,
        })
    }

    /// The file's contents; `Err(line)` names the first line that is not `"user" "secret"`.
    pub fn parse(text: &str) -> Result<Self, usize> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
                continue;
            }
            let (user, rest) = quoted(line).ok_or(n + 1)?;
            let (secret, _) = quoted(rest.trim_start()).ok_or(n + 1)?;
            users.insert(user, Secret::parse(&secret));
        }
        Ok(Self { users })
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// One double-quoted string at the start of `text` and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut rest = text.strip_prefix('"')?;
    let mut value = String::new();
    loop {
        let end = rest.find('"')?;
        value.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                value.push('"');
                rest = after;
            }
            None => return Some((value, rest)),
        }
    }
}

/// Secrets read from the server by a query (its last column is the secret; no row or NULL:
/// none), over one connection kept open and remade when it breaks.
pub struct AuthQuery {
    database: tokio_postgres::Config,
    query: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl AuthQuery {
    pub fn new(database: tokio_postgres::Config, query: String) -> Self {
        Self {
            database,
            query,
            client: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn lookup(&self, user: &str) -> Result<Option<Secret>, String> {
        let mut client = self.client.lock().await;
        for attempt in 0..2 {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                *client = Some(
                    crate::net::connect::connect_as(&self.database, "cutover auth_query")
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let Some(c) = client.as_ref() else { continue };
            match c.query_opt(&self.query, &[&user]).await {
                Ok(row) => {
                    return Ok(row
                        .and_then(|row| row.len().checked_sub(1).and_then(|last| row.get(last)))
                        .map(|secret: String| Secret::parse(&secret)));
                }
                Err(error) if attempt == 0 && c.is_closed() => {
                    tracing::debug!(error = %crate::net::connect::cause(&error), "auth_query connection lost; reconnecting");
                    *client = None;
                }
                Err(error) => return Err(crate::net::connect::cause(&error)),
            }
        }
        Err("the auth_query connection keeps failing".into())
    }
}

/// Every configured source of secrets, asked in order: the file (reloaded on SIGHUP), then
/// the query.
#[derive(Default)]
pub struct Secrets {
    pub file: arc_swap::ArcSwapOption<AuthFile>,
    pub query: Option<AuthQuery>,
}

impl Secrets {
    pub fn is_configured(&self) -> bool {
        self.file.load().is_some() || self.query.is_some()
    }

    /// The user's secret; `Ok(None)` when no source has one (the login is relayed).
    pub async fn lookup(&self, user: &str) -> Result<Option<Secret>, String> {
        if let Some(secret) = self.file.load().as_ref().and_then(|f| f.get(user)) {
            return Ok(Some(secret.clone()));
        }
        match &self.query {
            Some(query) => query.lookup(user).await,
            None => Ok(None),
        }
    }
}

/// The admin surface's tokens, by name: admin tokens change and read, read tokens read.
/// Swapped whole on SIGHUP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    pub admin: Vec<(String, String)>,
    pub read: Vec<(String, String)>,
}

/// Whether `given` is one of `tokens`, in time that depends on neither the tokens' contents
/// nor their lengths (both sides are hashed first), nor on which one matched. The name of
/// the token that matched.
pub fn token_named<'a>(tokens: &'a [(String, String)], given: &[u8]) -> Option<&'a str> {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let given = Sha256::digest(given);
    let mut found = None;
    for (name, token) in tokens {
        let matches = Sha256::digest(token.as_bytes()).ct_eq(&given);
        if bool::from(matches) {
            found = Some(name.as_str());
        }
    }
    found
}

/// Wrong admin tokens and console passwords, counted and slowed: each failure is answered
/// after [`Throttle::DELAY`], one at a time, so guessing goes at one try per delay whatever
/// the number of connections. A right token is never held up.
pub struct Throttle {
    turn: tokio::sync::Mutex<()>,
    failures: [metrics::Counter; 2],
}

/// Where a wrong token was given.
#[derive(Debug, Clone, Copy)]
pub enum Surface {
    Api = 0,
    Console = 1,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            turn: tokio::sync::Mutex::new(()),
            failures: ["api", "console"].map(|surface| {
                metrics::counter!("cutover_admin_auth_failures_total", "surface" => surface)
            }),
        }
    }
}

impl Throttle {
    pub const DELAY: std::time::Duration = std::time::Duration::from_secs(1);

    /// Counts a failure and returns when it may be answered.
    pub async fn failed(&self, surface: Surface) {
        self.failures[surface as usize].increment(1);
        tracing::warn!(?surface, "wrong admin token");
        let _turn = self.turn.lock().await;
        tokio::time::sleep(Self::DELAY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_file_reads_pgbouncers_format() {
        let secret = ScramSecret::for_password("pw");
        let scram = format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            secret.iterations,
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &secret.salt),
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                secret.stored_key
            ),
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                secret.server_key
            ),
        );
        let text = format!(
            "; a comment\n# another\n\n\"app\" \"{scram}\"\n\"old\" \"md5{}\" extra\n\"we\"\"ird\" \"plain text\"\n",
            md5_inner("pw", "old")
        );
        let file = AuthFile::parse(&text).unwrap();
        assert_eq!(file.len(), 3);
        assert_eq!(file.get("app"), Some(&Secret::Scram(secret)));
        assert!(matches!(file.get("old"), Some(Secret::Md5(h)) if h.len() == 32));
        assert_eq!(
            file.get("we\"ird"),
            Some(&Secret::Password("plain text".into()))
        );
        assert_eq!(
            AuthFile::parse("\"app\" \"x\"\napp secret\n").err(),
            Some(2)
        );
        assert_eq!(AuthFile::parse("\"unterminated\n").err(), Some(1));
    }

    #[test]
    fn md5_answers_match_postgres() {
        // libpq: "md5" || md5(md5(password || user) || salt).
        let inner = md5_inner("md5-secret", "md5_user");
        assert_eq!(
            format!("md5{inner}"),
            postgres_protocol::password::md5(b"md5-secret", "md5_user")
        );
        let response = md5_response(&inner, &[1, 2, 3, 4]);
        assert!(response.starts_with("md5") && response.len() == 35);
        assert_eq!(
            format!("{:?}", Secret::parse("hunter2")),
            "Secret::Password(..)"
        );
    }
}
