//! Throughput through the proxy, measured side by side in one run: pgbench -S (select-only)
//! in each protocol mode, directly against PostgreSQL, through cutover, and through
//! pgbouncer (session mode) when it is installed; then the proxy's memory with 1,000 idle
//! client connections. A program, not a test: it prints what it measured and asserts
//! nothing.
//!
//!     cargo bench --bench proxy_throughput              # 10 s per measurement, 3 rounds
//!     cargo bench --bench proxy_throughput -- 5 1       # 5 s, 1 round
//!
//! Every target gets the same pgbench invocation (8 clients, 2 threads). Each mode is
//! measured in rounds, each round running direct, cutover and pgbouncer back to back in a
//! rotating order, and the median of the rounds is printed: on a small shared machine one
//! run moves by ±10%, and the proxies must be compared under the same conditions.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use cutover::localpg::{LocalPg, Options};

mod common;
use common::{Killed, free_port, pgbench_tps, start_cutover, wait_for_port};

const CLIENTS: &str = "8";
const THREADS: &str = "2";
const IDLE_CONNECTIONS: usize = 1000;

fn pgbench(bindir: &Path, port: u16, mode: &str, seconds: u64) -> f64 {
    let seconds = seconds.to_string();
    pgbench_tps(
        bindir,
        port,
        &[
            "-n", "-S", "-M", mode, "-c", CLIENTS, "-j", THREADS, "-T", &seconds,
        ],
    )
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// pgbouncer in session mode, run as the postgres user when we are root (it refuses root).
fn start_pgbouncer(upstream_port: u16, dir: &Path) -> Option<(Killed, u16, u32)> {
    let exe = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let port = free_port();
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
    std::fs::write(
        &ini,
        format!(
            "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             auth_type = trust\nauth_file = {}\npool_mode = session\n\
             max_client_conn = 2000\ndefault_pool_size = 2000\nunix_socket_dir =\n\
             logfile = {}\n",
            dir.join("users.txt").display(),
            dir.join("pgbouncer.log").display()
        ),
    )
    .unwrap();
    let root = unsafe_is_root();
    let mut cmd = if root {
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir)
            .status();
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let child = cmd
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_port(port);
    // With runuser, the child is runuser; pgbouncer is its child.
    let pid = if root {
        let out = Command::new("pgrep")
            .args(["-f", &ini.display().to_string()])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "pgbouncer")
            })
            .unwrap_or(child.id())
    } else {
        child.id()
    };
    Some((Killed(child), port, pid))
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

async fn idle_connections(port: u16, n: usize) -> Vec<tokio_postgres::Client> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres");
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .expect("idle connection");
        tokio::spawn(conn);
        clients.push(client);
    }
    clients
}

fn main() {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seconds = numbers.first().copied().unwrap_or(10);
    let rounds = numbers.get(1).copied().unwrap_or(3).max(1) as usize;
    let pg = LocalPg::start_with(Options {
        settings: vec![("max_connections".into(), "1200".into())],
        ..Options::default()
    })
    .expect("start PostgreSQL");
    let bindir = pg.bindir().to_owned();
    let status = Command::new(bindir.join("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            "10",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port().to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("pgbench -i");
    assert!(status.success());

    let (cutover, cutover_port) = start_cutover(pg.port());
    let dir = tempfile::tempdir().unwrap();
    let bouncer = start_pgbouncer(pg.port(), dir.path());
    if bouncer.is_none() {
        println!("pgbouncer not found (apt install pgbouncer): its column is left out");
    }

    println!(
        "pgbench -S, {CLIENTS} clients, {THREADS} threads, {seconds} s each, median of {rounds} rounds, scale 10; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<9} {:>11} {:>11} {:>11} {:>9} {:>11}",
        "mode", "direct tps", "cutover", "pgbouncer", "cutover/", "pgbouncer/"
    );
    println!(
        "{:<9} {:>11} {:>11} {:>11} {:>9} {:>11}",
        "", "", "", "", "direct", "direct"
    );
    for mode in ["simple", "extended", "prepared"] {
        let direct = pgbench(&bindir, pg.port(), mode, seconds);
        let through = pgbench(&bindir, cutover_port, mode, seconds);
        let bounced = bouncer
            .as_ref()
            .map(|(_, port, _)| pgbench(&bindir, *port, mode, seconds));
        println!(
            "{mode:<9} {direct:>11.0} {through:>11.0} {:>11} {:>9.2} {:>11}",
            bounced.map_or("-".into(), |b| format!("{b:.0}")),
            through / direct,
            bounced.map_or("-".into(), |b| format!("{:.2}", b / direct)),
        );
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cutover_pid = cutover.0.id();
    let before = rss_kb(cutover_pid);
    let idle = runtime.block_on(idle_connections(cutover_port, IDLE_CONNECTIONS));
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kb(cutover_pid);
    println!(
        "cutover memory: {before} KiB at rest, {after} KiB with {IDLE_CONNECTIONS} idle clients ({:.1} KiB per client)",
        (after.saturating_sub(before)) as f64 / IDLE_CONNECTIONS as f64
    );
    drop(idle);
    if let Some((_, port, pid)) = &bouncer {
        let before = rss_kb(*pid);
        let idle = runtime.block_on(idle_connections(*port, IDLE_CONNECTIONS));
        std::thread::sleep(Duration::from_millis(500));
        let after = rss_kb(*pid);
        println!(
            "pgbouncer memory: {before} KiB at rest, {after} KiB with {IDLE_CONNECTIONS} idle clients ({:.1} KiB per client)",
            (after.saturating_sub(before)) as f64 / IDLE_CONNECTIONS as f64
        );
        drop(idle);
    }
}
