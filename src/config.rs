//! `cutover serve` configuration: a TOML file (optional) overridden by command-line flags,
//! validated into [`ServeConfig`] with every problem reported at once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::net::connect;

/// The configuration file, as written (every field optional; flags override).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address the proxy listens on for applications.
    pub listen: Option<String>,
    /// PostgreSQL that holds the legacy table and fature_v2. Its user and password, when
    /// given, are only for the proxy's own connections (shadow, control); applications
    /// authenticate with their own.
    pub upstream: Option<String>,
    /// Address of the admin HTTP endpoint (/metrics, /healthz, /readyz).
    pub admin: Option<String>,
    /// Client connections served at once; the next gets FATAL 53300.
    pub max_client_connections: Option<usize>,
    /// Largest protocol message accepted from a client, in bytes.
    pub max_message_bytes: Option<usize>,
    /// After SIGTERM, how long sessions may go on before they are closed with 57P01.
    pub shutdown_grace_seconds: Option<u64>,
    /// Threads that run client sessions (default: one per CPU core).
    pub worker_threads: Option<usize>,
    /// Directory of the rule files (default: rules).
    pub rules: Option<PathBuf>,
    /// TLS for client connections: both files in PEM.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS (pgbouncer's `client_tls_sslmode = require`).
    pub client_tls_required: Option<bool>,
    /// The database holding the `cutover` schema (live state, audit), with the proxy's own
    /// role. Default: the upstream URL, when it names a user.
    pub control: Option<String>,
    /// Bearer tokens allowed to change stages through the admin API, by name (the name is
    /// what the audit records). Keep them out of version control: a config file the
    /// deployment provides, or `CUTOVER_ADMIN_TOKEN` (named `default`).
    pub admin_tokens: Option<std::collections::BTreeMap<String, String>>,
    /// Bearer tokens that may read the admin API and `/status` (divergence examples) but
    /// change nothing, by name. `CUTOVER_READ_TOKEN` is named `reader`.
    pub read_tokens: Option<std::collections::BTreeMap<String, String>>,
    /// The database the shadow re-runs reads on, with its own role (read-only is enough).
    /// Default: the control database. Only sessions on that same database are shadowed.
    pub shadow: Option<String>,
    /// Connections of the shadow pool (0 turns the shadow off).
    pub shadow_connections: Option<usize>,
    /// Comparisons waiting for the shadow pool; past it they are dropped and counted.
    pub shadow_queue: Option<usize>,
    /// The shadow's `statement_timeout`, in milliseconds.
    pub shadow_timeout_ms: Option<u64>,
    /// Seconds a client may take to log in (PostgreSQL's `authentication_timeout`).
    pub authentication_timeout_seconds: Option<u64>,
    /// Logins under way at once (not yet authenticated); default: max_client_connections.
    pub max_logins_in_progress: Option<usize>,
    /// Users' password secrets in pgbouncer's `auth_file` format: the proxy then
    /// authenticates those users itself (needed for SCRAM with TLS on both legs).
    pub auth_file: Option<PathBuf>,
    /// A database URL whose role may read password secrets; the proxy then authenticates
    /// users itself with the secret `auth_query` returns.
    pub auth_url: Option<String>,
    /// The query that returns a user's secret (`$1`: the user name; the last column is the
    /// secret). Default: pgbouncer's, on `pg_authid`.
    pub auth_query: Option<String>,
    /// Problems found while merging sources (not a key of the file).
    #[serde(skip)]
    pub merge_problems: Vec<String>,
}

/// Tokens from two sources, merged by name; the same name with two different tokens is a
/// problem (which one is meant cannot be guessed).
fn merged_tokens(
    key: &str,
    file: Option<std::collections::BTreeMap<String, String>>,
    flags: Option<std::collections::BTreeMap<String, String>>,
    problems: &mut Vec<String>,
) -> Option<std::collections::BTreeMap<String, String>> {
    match (file, flags) {
        (None, None) => None,
        (Some(one), None) | (None, Some(one)) => Some(one),
        (Some(mut all), Some(flags)) => {
            for (name, token) in flags {
                match all.get(&name) {
                    Some(existing) if *existing != token => problems.push(format!(
                        "{key}.{name}: the configuration file and the command line (or environment) give two different tokens named {name:?}; name them apart"
                    )),
                    _ => {
                        all.insert(name, token);
                    }
                }
            }
            Some(all)
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9187";
pub const DEFAULT_MAX_CLIENTS: usize = 1000;
/// PostgreSQL refuses messages over 1 GB; so do we, by default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 30;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_SHADOW_CONNECTIONS: usize = 4;
pub const DEFAULT_SHADOW_QUEUE: usize = 1024;
pub const DEFAULT_SHADOW_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_AUTHENTICATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Session threads when none is configured: half the CPUs the process may use, at least one.
/// Each thread sleeps and wakes for its own sessions; two on two cores wake twice as often
/// for half the events each, and take the core PostgreSQL and the clients need
/// (docs/performance.md, "How many session threads").
pub fn default_session_threads(cpus: usize) -> usize {
    (cpus / 2).max(1)
}

/// The shadow pool's settings.
#[derive(Debug, Clone)]
pub struct ShadowConfig {
    pub database: tokio_postgres::Config,
    pub connections: usize,
    pub queue: usize,
    pub statement_timeout: Duration,
}

/// Where the upstream PostgreSQL is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            UpstreamAddr::Unix(dir) => write!(f, "{}", dir.display()),
        }
    }
}

use crate::net::tls::{TlsFiles, UpstreamVerify};

/// Where the proxy finds users' password secrets (none: every login is relayed).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub file: Option<PathBuf>,
    /// The database to run the query on, and the query.
    pub query: Option<(tokio_postgres::Config, String)>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub upstream: UpstreamAddr,
    /// The whole upstream URL, for the proxy's own connections (later: shadow, control).
    pub upstream_config: tokio_postgres::Config,
    pub admin: Option<SocketAddr>,
    pub max_client_connections: usize,
    pub max_message_bytes: usize,
    pub shutdown_grace: Duration,
    pub worker_threads: usize,
    pub rules: PathBuf,
    pub tls: Option<TlsFiles>,
    /// Clients without TLS are refused.
    pub client_tls_required: bool,
    /// The control database, if any (see `FileConfig::control`).
    pub control: Option<tokio_postgres::Config>,
    /// (name, token) pairs that may change stages through the admin API.
    pub admin_tokens: Vec<(String, String)>,
    /// (name, token) pairs that may read (the admin tokens may too).
    pub read_tokens: Vec<(String, String)>,
    /// `None`: no shadow (no database for it, or zero connections).
    pub shadow: Option<ShadowConfig>,
    pub authentication_timeout: Duration,
    pub max_logins_in_progress: usize,
    pub auth: AuthConfig,
    pub upstream_verify: UpstreamVerify,
}

/// pgbouncer's default `auth_query` (1.21+), reading the server's own secrets: a role that
/// cannot log in, or whose password expired, has none.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END \
     FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin";

/// Reads the configuration again as the proxy was started: its file, under the same flags
/// and environment (validated; the error says what is wrong). A reload (SIGHUP, the
/// console's `RELOAD`) calls it.
pub type ConfigSource = Box<dyn Fn() -> Result<ServeConfig, String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl FileConfig {
    pub fn from_toml(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))?;
        toml::from_str(&text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
            ConfigError(vec![format!(
                "{}:{line}:{col}: {}",
                path.display(),
                e.message()
            )])
        })
    }

    /// Fields set in `other` win; tokens are merged from both.
    pub fn overridden_by(self, other: FileConfig) -> FileConfig {
        let mut merge_problems = [self.merge_problems, other.merge_problems].concat();
        let admin_tokens = merged_tokens(
            "admin_tokens",
            self.admin_tokens,
            other.admin_tokens,
            &mut merge_problems,
        );
        let read_tokens = merged_tokens(
            "read_tokens",
            self.read_tokens,
            other.read_tokens,
            &mut merge_problems,
        );
        FileConfig {
            merge_problems,
            admin_tokens,
            read_tokens,
            listen: other.listen.or(self.listen),
            upstream: other.upstream.or(self.upstream),
            admin: other.admin.or(self.admin),
            max_client_connections: other.max_client_connections.or(self.max_client_connections),
            max_message_bytes: other.max_message_bytes.or(self.max_message_bytes),
            shutdown_grace_seconds: other.shutdown_grace_seconds.or(self.shutdown_grace_seconds),
            worker_threads: other.worker_threads.or(self.worker_threads),
            rules: other.rules.or(self.rules),
            tls_cert: other.tls_cert.or(self.tls_cert),
            tls_key: other.tls_key.or(self.tls_key),
            client_tls_required: other.client_tls_required.or(self.client_tls_required),
            control: other.control.or(self.control),
            shadow: other.shadow.or(self.shadow),
            shadow_connections: other.shadow_connections.or(self.shadow_connections),
            shadow_queue: other.shadow_queue.or(self.shadow_queue),
            shadow_timeout_ms: other.shadow_timeout_ms.or(self.shadow_timeout_ms),
            authentication_timeout_seconds: other
                .authentication_timeout_seconds
                .or(self.authentication_timeout_seconds),
            max_logins_in_progress: other.max_logins_in_progress.or(self.max_logins_in_progress),
            auth_file: other.auth_file.or(self.auth_file),
            auth_url: other.auth_url.or(self.auth_url),
            auth_query: other.auth_query.or(self.auth_query),
        }
    }

    /// Validates every field, reporting all problems together.
    pub fn validate(self) -> Result<ServeConfig, ConfigError> {
        let mut problems = self.merge_problems.clone();
        let mut addr = |name: &str, value: &str| -> Option<SocketAddr> {
            value
                .parse()
                .map_err(|_| problems.push(format!("{name}: {value:?} is not an IP:PORT address")))
                .ok()
        };
        let listen = addr("listen", self.listen.as_deref().unwrap_or(DEFAULT_LISTEN));
        let admin = match self.admin.as_deref() {
            Some("" | "off") => Some(None),
            other => addr("admin", other.unwrap_or(DEFAULT_ADMIN)).map(Some),
        };

        let mut upstream_verify = UpstreamVerify::None;
        let upstream = match self.upstream.as_deref() {
            None => {
                problems
                    .push("upstream: required (e.g. postgres://db.internal:5432/fature)".into());
                None
            }
            Some(url) => match connect::take_verify(url) {
                Err(e) => {
                    problems.push(format!("upstream: {e}"));
                    None
                }
                Ok((url, verify)) => {
                    upstream_verify = verify;
                    match connect::parse_url(&url) {
                        Ok(config) => upstream_addr(&config)
                            .map(|addr| (addr, config))
                            .map_err(|e| problems.push(format!("upstream: {e}")))
                            .ok(),
                        Err(e) => {
                            problems.push(format!("upstream: {e}"));
                            None
                        }
                    }
                }
            },
        };

        let max_clients = self.max_client_connections.unwrap_or(DEFAULT_MAX_CLIENTS);
        if max_clients == 0 {
            problems.push("max_client_connections: must be at least 1".into());
        }
        let max_logins = self.max_logins_in_progress.unwrap_or(max_clients);
        if self.max_logins_in_progress == Some(0) {
            problems.push("max_logins_in_progress: must be at least 1".into());
        }
        if self.authentication_timeout_seconds == Some(0) {
            problems.push("authentication_timeout_seconds: must be at least 1".into());
        }
        let auth_query = match self.auth_url.as_deref() {
            Some(url) => connect::parse_url(url)
                .map(|config| {
                    Some((
                        config,
                        self.auth_query
                            .clone()
                            .unwrap_or_else(|| DEFAULT_AUTH_QUERY.to_owned()),
                    ))
                })
                .map_err(|e| problems.push(format!("auth_url: {e}")))
                .unwrap_or(None),
            None => {
                if self.auth_query.is_some() {
                    problems.push(
                        "auth_query: give auth_url too (the database and role to run it with)"
                            .into(),
                    );
                }
                None
            }
        };
        if self.worker_threads == Some(0) {
            problems.push("worker_threads: must be at least 1".into());
        }
        let max_message = self.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if max_message < 1024 {
            problems.push("max_message_bytes: must be at least 1024".into());
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                problems.push("tls_cert and tls_key: give both or neither".into());
                None
            }
        };

        let client_tls_required = self.client_tls_required.unwrap_or(false);
        if client_tls_required && tls.is_none() {
            problems.push("client_tls_required: needs tls_cert and tls_key".into());
        }
        let control = match self.control.as_deref() {
            Some(url) => connect::parse_url(url)
                .map(Some)
                .map_err(|e| problems.push(format!("control: {e}")))
                .unwrap_or(None),
            None => upstream
                .as_ref()
                .filter(|(_, config)| config.get_user().is_some())
                .map(|(_, config)| config.clone()),
        };
        let admin_tokens: Vec<(String, String)> =
            self.admin_tokens.unwrap_or_default().into_iter().collect();
        let read_tokens: Vec<(String, String)> =
            self.read_tokens.unwrap_or_default().into_iter().collect();
        for (key, tokens) in [
            ("admin_tokens", &admin_tokens),
            ("read_tokens", &read_tokens),
        ] {
            for (name, token) in tokens {
                if token.len() < 16 {
                    problems.push(format!(
                        "{key}.{name}: a token of at least 16 characters, please"
                    ));
                }
            }
        }

        let shadow_database = match self.shadow.as_deref() {
            Some(url) => connect::parse_url(url)
                .map(Some)
                .map_err(|e| problems.push(format!("shadow: {e}")))
                .unwrap_or(None),
            None => control.clone(),
        };
        let queue = self.shadow_queue.unwrap_or(DEFAULT_SHADOW_QUEUE);
        if queue == 0 {
            problems.push("shadow_queue: must be at least 1".into());
        }
        if self.shadow_timeout_ms == Some(0) {
            problems.push("shadow_timeout_ms: must be at least 1".into());
        }
        let connections = self
            .shadow_connections
            .unwrap_or(DEFAULT_SHADOW_CONNECTIONS);
        let shadow = shadow_database
            .filter(|_| connections > 0)
            .map(|database| ShadowConfig {
                database,
                connections,
                queue,
                statement_timeout: self
                    .shadow_timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(DEFAULT_SHADOW_TIMEOUT),
            });

        match (listen, admin, upstream) {
            (Some(listen), Some(admin), Some((upstream, upstream_config)))
                if problems.is_empty() =>
            {
                Ok(ServeConfig {
                    listen,
                    upstream,
                    upstream_config,
                    admin,
                    max_client_connections: max_clients,
                    max_message_bytes: max_message,
                    shutdown_grace: self
                        .shutdown_grace_seconds
                        .map(Duration::from_secs)
                        .unwrap_or(DEFAULT_SHUTDOWN_GRACE),
                    rules: self.rules.unwrap_or_else(|| PathBuf::from("rules")),
                    worker_threads: self.worker_threads.unwrap_or_else(|| {
                        default_session_threads(
                            std::thread::available_parallelism().map_or(1, |n| n.get()),
                        )
                    }),
                    tls,
                    client_tls_required,
                    control,
                    admin_tokens,
                    read_tokens,
                    shadow,
                    authentication_timeout: self
                        .authentication_timeout_seconds
                        .map(Duration::from_secs)
                        .unwrap_or(DEFAULT_AUTHENTICATION_TIMEOUT),
                    max_logins_in_progress: max_logins,
                    auth: AuthConfig {
                        file: self.auth_file,
                        query: auth_query,
                    },
                    upstream_verify,
                })
            }
            _ => Err(ConfigError(problems)),
        }
    }
}

fn upstream_addr(config: &tokio_postgres::Config) -> Result<UpstreamAddr, String> {
    use tokio_postgres::config::Host;
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts() {
        [] => Err("the URL names no host".into()),
        [Host::Tcp(host)] => Ok(UpstreamAddr::Tcp {
            host: host.clone(),
            port,
        }),
        [Host::Unix(dir)] => Ok(UpstreamAddr::Unix(dir.join(format!(".s.PGSQL.{port}")))),
        _ => Err("several hosts are not supported; give one".into()),
    }
}

/// 1-based line and column of a byte offset into a text (for TOML spans).
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_threads_are_half_the_cpus_and_at_least_one() {
        for (cpus, threads) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (16, 8)] {
            assert_eq!(default_session_threads(cpus), threads, "{cpus} CPUs");
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let file = FileConfig {
            upstream: Some("postgres://db:5433/app".into()),
            listen: Some("0.0.0.0:7000".into()),
            ..FileConfig::default()
        };
        let flags = FileConfig {
            listen: Some("127.0.0.1:7001".into()),
            ..FileConfig::default()
        };
        let config = file.overridden_by(flags).validate().unwrap();
        assert_eq!(config.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(
            config.upstream,
            UpstreamAddr::Tcp {
                host: "db".into(),
                port: 5433
            }
        );
        assert_eq!(config.admin, Some(DEFAULT_ADMIN.parse().unwrap()));
        assert_eq!(config.max_client_connections, DEFAULT_MAX_CLIENTS);
    }

    #[test]
    fn every_problem_is_reported() {
        let err = FileConfig {
            listen: Some("nowhere".into()),
            max_client_connections: Some(0),
            tls_cert: Some("c.pem".into()),
            ..FileConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
    }

    #[test]
    fn the_control_database_and_admin_tokens() {
        // By default the upstream URL, when it names a user (the proxy's own role).
        let with_user = FileConfig {
            upstream: Some("postgres://cutover_proxy@db:5432/app".into()),
            ..FileConfig::default()
        }
        .validate()
        .unwrap();
        assert_eq!(with_user.control.unwrap().get_user(), Some("cutover_proxy"));
        let without = FileConfig {
            upstream: Some("postgres://db:5432/app".into()),
            ..FileConfig::default()
        }
        .validate()
        .unwrap();
        assert!(without.control.is_none());

        let err = FileConfig {
            upstream: Some("postgres://db:5432/app".into()),
            control: Some("mysql://x".into()),
            admin_tokens: Some(
                [("ops".to_owned(), "short".to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..FileConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.0.iter().any(|p| p.starts_with("control:")), "{err}");
        assert!(
            err.0.iter().any(|p| p.contains("admin_tokens.ops")),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cutover.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\nlisten_adress = \"x\"\n").unwrap();
        let err = FileConfig::from_toml(&path).unwrap_err();
        assert!(err.0[0].contains("cutover.toml:2:1"), "{err}");
    }

    #[test]
    fn libpq_verification_modes_are_taken_out_of_the_upstream_url() {
        let url = "postgres://db.internal:5432/fature?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x";
        let (rest, verify) = connect::take_verify(url).unwrap();
        assert_eq!(
            rest,
            "postgres://db.internal:5432/fature?application_name=x&sslmode=require"
        );
        assert_eq!(verify, UpstreamVerify::Full("/etc/ca.pem".into()));
        let (_, verify) =
            connect::take_verify("host=db sslmode=require sslrootcert=ca.pem").unwrap();
        assert_eq!(verify, UpstreamVerify::Ca("ca.pem".into()));
        let (rest, verify) = connect::take_verify("postgres://db/fature?sslmode=prefer").unwrap();
        assert_eq!(
            (rest.as_str(), verify),
            ("postgres://db/fature?sslmode=prefer", UpstreamVerify::None)
        );
        assert!(
            connect::take_verify("postgres://db/f?sslmode=verify-ca")
                .unwrap_err()
                .contains("sslrootcert")
        );
        assert_eq!(
            connect::take_verify("postgres://db/f").unwrap().0,
            "postgres://db/f"
        );
        // The rest still parses.
        connect::parse_url(&rest).unwrap();
        // The proxy's own connections encrypt without verifying: asking them to verify is
        // refused with the way out, not ignored.
        let err = FileConfig {
            upstream: Some("postgres://db/f".into()),
            control: Some("postgres://cutover@db/f?sslmode=verify-full&sslrootcert=ca.pem".into()),
            ..FileConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.0[0].contains("control") && err.0[0].contains("sslmode=require"),
            "{err}"
        );
    }

    #[test]
    fn tokens_from_every_source_are_merged() {
        let token =
            |name: &str, t: &str| Some([(name.to_owned(), t.to_owned())].into_iter().collect());
        let file = FileConfig {
            upstream: Some("postgres://db/f".into()),
            admin_tokens: token("ops", "ops-token-0123456789"),
            ..FileConfig::default()
        };
        let flags = FileConfig {
            admin_tokens: token("default", "env-token-0123456789"),
            ..FileConfig::default()
        };
        let config = file.clone().overridden_by(flags).validate().unwrap();
        assert_eq!(config.admin_tokens.len(), 2);
        // The same name with another token: refused, not guessed.
        let clash = FileConfig {
            admin_tokens: token("ops", "another-token-0123456789"),
            ..FileConfig::default()
        };
        let err = file.overridden_by(clash).validate().unwrap_err();
        assert!(err.0[0].contains("admin_tokens.ops"), "{err}");
    }
}
