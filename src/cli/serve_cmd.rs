//! `cutover serve`: its flags, and the proxy run until a signal stops it.

use std::{path::PathBuf, process::ExitCode};

use crate::{config::FileConfig, serve};

#[derive(clap::Args)]
pub(super) struct ServeArgs {
    /// TOML configuration file; the flags below override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for applications [default: 127.0.0.1:6432]
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// PostgreSQL with the legacy table and fature_v2: postgres://[USER[:PASSWORD]@]HOST[:PORT]/DB.
    /// Its user and password are only for the proxy's own connections.
    #[arg(
        long,
        env = "CUTOVER_UPSTREAM",
        hide_env_values = true,
        value_name = "URL"
    )]
    upstream: Option<String>,
    /// Address of /metrics, /healthz and /readyz, or "off" [default: 127.0.0.1:9187]
    #[arg(long, value_name = "IP:PORT")]
    admin: Option<String>,
    /// Client connections served at once; the next gets FATAL 53300 [default: 1000]
    #[arg(long, value_name = "N")]
    max_client_connections: Option<usize>,
    /// Largest message accepted from a client, in bytes [default: 1 GiB]
    #[arg(long, value_name = "BYTES")]
    max_message_bytes: Option<usize>,
    /// Seconds sessions may go on after SIGTERM before they are closed [default: 30]
    #[arg(long, value_name = "SECONDS")]
    shutdown_grace: Option<u64>,
    /// Directory of the rule files; invalid rules stop the proxy from starting [default: rules]
    #[arg(long, value_name = "DIR")]
    rules: Option<PathBuf>,
    /// Threads that run client sessions [default: half the CPU cores, at least one]
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
    /// PEM certificate for TLS to clients (with --tls-key)
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS to clients (with --tls-cert)
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS (with --tls-cert/--tls-key)
    #[arg(long)]
    client_tls_required: bool,
    /// Database of the cutover schema (live state, audit), with the proxy's own role
    /// [default: the upstream URL, when it names a user]
    #[arg(
        long,
        env = "CUTOVER_CONTROL",
        hide_env_values = true,
        value_name = "URL"
    )]
    control: Option<String>,
    /// Bearer token allowed to change stages through the admin API (named "default")
    #[arg(
        long,
        env = "CUTOVER_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
    /// Bearer token that may read the admin API and /status but change nothing (named "reader")
    #[arg(
        long,
        env = "CUTOVER_READ_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    read_token: Option<String>,
    /// Database the shadow re-runs reads on, with its own role [default: the control database]
    #[arg(
        long,
        env = "CUTOVER_SHADOW",
        hide_env_values = true,
        value_name = "URL"
    )]
    shadow: Option<String>,
    /// Connections of the shadow pool; 0 turns the shadow off [default: 4]
    #[arg(long, value_name = "N")]
    shadow_connections: Option<usize>,
    /// Comparisons waiting for the shadow pool before new ones are dropped [default: 1024]
    #[arg(long, value_name = "N")]
    shadow_queue: Option<usize>,
    /// statement_timeout of the shadow's statements, in milliseconds [default: 5000]
    #[arg(long, value_name = "MS")]
    shadow_timeout_ms: Option<u64>,
    /// Seconds a client may take to log in, as PostgreSQL's authentication_timeout [default: 60]
    #[arg(long, value_name = "SECONDS")]
    authentication_timeout: Option<u64>,
    /// Logins under way at once, apart from sessions [default: --max-client-connections]
    #[arg(long, value_name = "N")]
    max_logins_in_progress: Option<usize>,
    /// Users' password secrets, pgbouncer's auth_file format ("user" "secret" per line):
    /// cutover authenticates those users itself (SCRAM with TLS on both legs needs it)
    #[arg(long, value_name = "FILE")]
    auth_file: Option<PathBuf>,
    /// Database and role allowed to read users' password secrets with --auth-query
    #[arg(
        long,
        env = "CUTOVER_AUTH_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    auth_url: Option<String>,
    /// Query returning a user's secret ($1: user name; last column: the secret)
    /// [default: pgbouncer's, on pg_authid]
    #[arg(long, value_name = "SQL")]
    auth_query: Option<String>,
}

/// Runs the proxy until SIGINT or SIGTERM (SIGHUP reloads).
pub(super) async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => FileConfig::from_toml(path)?,
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        listen: args.listen,
        upstream: args.upstream,
        admin: args.admin,
        max_client_connections: args.max_client_connections,
        max_message_bytes: args.max_message_bytes,
        shutdown_grace_seconds: args.shutdown_grace,
        worker_threads: args.worker_threads,
        rules: args.rules,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        client_tls_required: args.client_tls_required.then_some(true),
        control: args.control,
        admin_tokens: args
            .admin_token
            .map(|t| [("default".to_owned(), t)].into_iter().collect()),
        read_tokens: args
            .read_token
            .map(|t| [("reader".to_owned(), t)].into_iter().collect()),
        shadow: args.shadow,
        shadow_connections: args.shadow_connections,
        shadow_queue: args.shadow_queue,
        shadow_timeout_ms: args.shadow_timeout_ms,
        authentication_timeout_seconds: args.authentication_timeout,
        max_logins_in_progress: args.max_logins_in_progress,
        auth_file: args.auth_file,
        auth_url: args.auth_url,
        auth_query: args.auth_query,
        merge_problems: Vec::new(),
    };
    let config = file.overridden_by(flags.clone()).validate()?;
    let running = serve::start(config).await?;
    eprintln!(
        "cutover: listening on {}{}",
        running.addr,
        running
            .admin_addr
            .map(|a| format!(", admin on http://{a}"))
            .unwrap_or_default()
    );
    let config_path = args.config.clone();
    running.set_config_source(Box::new(move || {
        // The file as it is now, under the same flags and environment.
        let file = match &config_path {
            Some(path) => FileConfig::from_toml(path),
            None => Ok(FileConfig::default()),
        };
        file.and_then(|f| f.overridden_by(flags.clone()).validate())
            .map_err(|e| e.to_string())
    }));
    let reload = running.reload_everything_handle();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            eprintln!("cutover: SIGHUP, reloading the configuration and the rules");
            let done = reload();
            match done.config {
                Some(Err(e)) => eprintln!("cutover: the configuration was not reloaded: {e}"),
                Some(Ok(done)) => {
                    for key in &done.applied {
                        eprintln!("cutover: reloaded {key}");
                    }
                    if !done.need_restart.is_empty() {
                        eprintln!(
                            "cutover: changed, applied only by a restart: {}",
                            done.need_restart.join(", ")
                        );
                    }
                }
                None => {}
            }
        }
    });
    let token = running.shutdown_token();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("cutover: shutting down");
        token.cancel();
    });
    running.wait().await;
    Ok(ExitCode::SUCCESS)
}
