//! What the benchmark programs share: a free port, a `cutover serve` child process that is
//! killed on drop, and pgbench's transactions per second.
#![allow(dead_code)] // each benchmark uses a different part

use std::{
    net::TcpListener,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {port}");
}

/// A child process, killed and reaped when dropped.
pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cutover serve` in front of PostgreSQL on `upstream_port` (the repository's rules, no
/// admin endpoint); returns the child and the port it listens on.
pub fn start_cutover(upstream_port: u16) -> (Killed, u16) {
    start_cutover_with(upstream_port, &[])
}

/// Starts `command` in a session of its own, as a service runs. With the kernel's autogroups
/// on (Debian's default) a process in the benchmark's session shares one scheduling group
/// with pgbench and is preempted by it; every proxy measured starts this way, so that none
/// shares pgbench's group (docs/performance.md, "Scheduling groups").
pub fn own_session(command: &mut Command) -> &mut Command {
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    }
}

/// `start_cutover` with more flags (a control database, the shadow's settings).
pub fn start_cutover_with(upstream_port: u16, extra: &[&str]) -> (Killed, u16) {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_cutover"));
    let child = own_session(&mut command)
        .args(["serve", "--admin", "off"])
        .args(extra)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--upstream",
            &format!("postgres://127.0.0.1:{upstream_port}/postgres"),
        ])
        .args(["--max-client-connections", "2000"])
        .args(["--rules", concat!(env!("CARGO_MANIFEST_DIR"), "/rules")])
        .stderr(Stdio::null())
        .spawn()
        .expect("start cutover");
    let child = Killed(child);
    wait_for_port(port);
    (child, port)
}

/// What a pgbench run reported.
#[derive(Debug, Clone, Copy)]
pub struct Pgbench {
    pub tps: f64,
    /// Transactions it made.
    pub transactions: f64,
}

/// Runs pgbench with `args` against `database` on `port`.
pub fn pgbench_on(bindir: &Path, port: u16, database: &str, args: &[&str]) -> Pgbench {
    let out = Command::new(bindir.join("pgbench"))
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", database])
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    // "tps = 123.4 (without …)", "number of transactions actually processed: 617/617"
    let find = |prefix: &str| {
        text.lines().find_map(|l| {
            l.trim_start()
                .strip_prefix(prefix)?
                .split(|c: char| c == '/' || c.is_whitespace())
                .find(|w| !w.is_empty())?
                .parse::<f64>()
                .ok()
        })
    };
    let tps = find("tps = ").unwrap_or_else(|| {
        panic!(
            "pgbench {args:?} on {port} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Pgbench {
        tps,
        transactions: find("number of transactions actually processed: ").unwrap_or(0.0),
    }
}

/// Runs pgbench with `args` against the `postgres` database on `port`; its tps.
pub fn pgbench_tps(bindir: &Path, port: u16, args: &[&str]) -> f64 {
    pgbench_on(bindir, port, "postgres", args).tps
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The repository's rules.
pub fn rules() -> cutover::routing::rules::RuleSet {
    cutover::routing::rules::RuleSet::load_dir(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rules"
    )))
    .expect("the repository's rules load")
}

/// A database (by `config`) given the legacy table, every migration, and a generated tree.
pub async fn legacy_database(
    config: &tokio_postgres::Config,
    spec: &cutover::demo::fixture::TreeSpec,
) -> anyhow::Result<tokio_postgres::Client> {
    use cutover::{demo::fixture, migrate, net::connect};
    let client = connect::connect(config).await?;
    fixture::create_legacy_table(&client).await?;
    migrate::run(config, &migrate::MigrationSet::embedded(), false).await?;
    fixture::load(&client, spec).await?;
    Ok(client)
}

/// `cutover backfill` with its defaults, quietly.
pub async fn backfill(
    client: &tokio_postgres::Client,
    config: &tokio_postgres::Config,
    rules: &cutover::routing::rules::RuleSet,
) -> Result<cutover::migrate::backfill::Summary, cutover::migrate::backfill::BackfillError> {
    use cutover::migrate::backfill;
    backfill::run(
        client,
        config,
        &rules.table,
        &backfill::Options {
            batch: backfill::DEFAULT_BATCH,
            dry_run: false,
            progress: cutover::migrate::progress::Show::Nothing,
            abort_after_batches: None,
        },
    )
    .await
}
