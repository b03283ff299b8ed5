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
    let mut child = Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
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
