//! `cutover serve` as a process: flags, config file, SIGTERM.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tokio_postgres::{NoTls, error::SqlState};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cutover serve --config FILE --listen 127.0.0.1:PORT` with `env`; the child, its stderr,
/// and the first line it printed (where it listens).
fn serve(
    config: &std::path::Path,
    port: u16,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    String,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    (child, stderr, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_sessions_finish_then_closes_them_with_57p01() {
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "upstream = \"postgres://127.0.0.1:{}/postgres\"\nadmin = \"127.0.0.1:{admin}\"\nshutdown_grace_seconds = 1\n",
            support::cluster().port()
        ),
    )
    .unwrap();
    let (mut child, _stderr, line) = serve(&config, port, &[]);
    assert!(
        line.contains(&format!("listening on 127.0.0.1:{port}")),
        "{line}"
    );
    assert!(
        line.contains(&format!("admin on http://127.0.0.1:{admin}")),
        "{line}"
    );

    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres");
    let (client, conn) = config.connect(NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    client.simple_query("SELECT 1").await.unwrap();

    let started = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .simple_query("SELECT 2")
        .await
        .expect("sessions go on during the grace period");
    assert!(
        config.connect(NoTls).await.is_err(),
        "no new connections after SIGTERM"
    );

    let err = conn
        .await
        .unwrap()
        .expect_err("closed at the end of the grace period");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn bad_configuration_is_reported_whole() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "listen = \"nowhere\"\nmax_client_connections = 0\n",
    )
    .unwrap();
    let (code, _, err) = support::cutover(&["serve", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    for needle in [
        "listen: \"nowhere\"",
        "upstream: required",
        "max_client_connections",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }

    std::fs::write(&config, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let (code, _, err) = support::cutover(&["serve", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.toml:1:1") && err.contains("lisen"),
        "{err}"
    );
}

#[test]
fn help_lists_the_settings() {
    let (code, out, _) = support::cutover(&["serve", "--help"], &[]);
    assert_eq!(code, 0);
    for needle in [
        "--listen",
        "--upstream",
        "--admin",
        "--config",
        "--max-client-connections",
        "--tls-cert",
        "SIGTERM",
    ] {
        assert!(out.contains(needle), "{needle} not in {out}");
    }
}

/// Tokens from every source are merged (issue 20, item 2): the config file's named tokens and
/// `CUTOVER_ADMIN_TOKEN` (named `default`) all work; on SIGHUP the file is read again and a
/// changed token takes effect without a restart, while a setting only a restart applies is
/// named in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_merged_and_reloaded_on_sighup() {
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cutover.toml");
    let file = |ops_token: &str, max_clients: u32| {
        format!(
            "upstream = \"postgres://127.0.0.1:{}/postgres\"\nadmin = \"127.0.0.1:{admin}\"\nrules = \"{}\"\nmax_client_connections = {max_clients}\n[admin_tokens]\nops = \"{ops_token}\"\n",
            support::cluster().port(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/rules"),
        )
    };
    std::fs::write(&config, file("ops-token-0123456789", 100)).unwrap();
    let (mut child, mut stderr, line) = serve(
        &config,
        port,
        &[("CUTOVER_ADMIN_TOKEN", "env-token-0123456789")],
    );
    assert!(line.contains("listening on"), "{line}");
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let status = |token: &'static str| async move {
        support::http_request(admin_addr, "GET", "/api/state", Some(token), None)
            .await
            .0
    };
    let console = |user: &'static str, token: &'static str| async move {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(port)
            .user(user)
            .password(token)
            .dbname("cutover");
        c.connect(NoTls)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert_eq!(status("ops-token-0123456789").await, 200);
    assert_eq!(
        status("env-token-0123456789").await,
        200,
        "the environment's token too"
    );
    console("ops", "ops-token-0123456789").await.unwrap();
    console("default", "env-token-0123456789").await.unwrap();

    // A new token for ops, and a setting that needs a restart.
    std::fs::write(&config, file("new-ops-token-0123456789", 50)).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.contains("applied only by a restart") {
        assert!(Instant::now() < deadline, "no reload in the log: {log}");
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        log.push_str(&line);
    }
    assert!(log.contains("reloaded admin_tokens"), "{log}");
    assert!(log.contains("max_client_connections"), "{log}");
    assert_eq!(status("new-ops-token-0123456789").await, 200);
    assert_eq!(
        status("ops-token-0123456789").await,
        401,
        "the old token is gone"
    );
    assert_eq!(status("env-token-0123456789").await, 200);

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}
