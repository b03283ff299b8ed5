//! The private cluster cleans up after itself even when its owner dies without unwinding.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use cutover::demo::localpg::LocalPg;

const CHILD_ENV: &str = "CUTOVER_LOCALPG_ABORT_CHILD";

/// Run by the test below in a child process: starts a cluster, says where, then aborts
/// (no destructors, no atexit handlers).
#[test]
#[ignore = "helper: run as a child process by cluster_is_removed_after_its_owner_aborts"]
fn abort_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let pg = LocalPg::start().expect("start a cluster");
    // The harness may have printed "test abort_child ... " on the same line: mark ours.
    println!("CLUSTER {} {}", pg.socket_dir().display(), pg.port());
    std::process::abort();
}

#[test]
fn cluster_is_removed_after_its_owner_aborts() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "abort_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    while reader.read_line(&mut line).unwrap() > 0 && !line.contains("CLUSTER ") {
        line.clear();
    }
    let line = line.split("CLUSTER ").nth(1).unwrap_or_default().to_owned();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child aborts");
    let (dir, port) = line
        .trim()
        .split_once(' ')
        .expect("child printed dir and port");
    let dir = PathBuf::from(dir);
    let port: u16 = port.parse().unwrap();
    assert!(!dir.as_os_str().is_empty());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if !dir.exists() && !listening {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster still there after 30 s: dir exists {}, port open {listening}",
            dir.exists()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn drop_stops_and_removes() {
    let pg = LocalPg::start().expect("start a cluster");
    let (dir, port) = (pg.socket_dir(), pg.port());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    drop(pg);
    assert!(!dir.exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}
