//! What the benchmark programs share: a free port, a `cutover serve` child process that is
//! killed on drop, and pgbench's transactions per second.
#![allow(dead_code)] // each benchmark uses a different part

pub mod latency;

use std::{
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
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
    wait_for_port_within(port, Duration::from_secs(10));
}

/// `wait_for_port`, for a program that starts slowly (under valgrind).
pub fn wait_for_port_within(port: u16, patience: Duration) {
    for _ in 0..patience.as_millis() / 50 {
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

/// `start_cutover` with more flags (a control database, the shadow's settings, `--rules`
/// in place of the repository's).
pub fn start_cutover_with(upstream_port: u16, extra: &[&str]) -> (Killed, u16) {
    start_cutover_wrapped::<&str>(upstream_port, extra, &[])
}

/// `start_cutover_with`, run by `wrap` (a program and its arguments, e.g. valgrind's) when
/// it is not empty.
pub fn start_cutover_wrapped<S: AsRef<std::ffi::OsStr>>(
    upstream_port: u16,
    extra: &[&str],
    wrap: &[S],
) -> (Killed, u16) {
    start_cutover_binary(
        Path::new(env!("CARGO_BIN_EXE_cutover")),
        upstream_port,
        extra,
        wrap,
    )
}

/// `start_cutover_wrapped` for the build at `exe` (another build of cutover, to compare).
pub fn start_cutover_binary<S: AsRef<std::ffi::OsStr>>(
    exe: &Path,
    upstream_port: u16,
    extra: &[&str],
    wrap: &[S],
) -> (Killed, u16) {
    let port = free_port();
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let child = own_session(&mut command)
        .args(["serve", "--admin", "off"])
        .args(extra)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--upstream",
            &format!("postgres://127.0.0.1:{upstream_port}/postgres"),
        ])
        .args(["--max-client-connections", "2000"])
        .args(if extra.contains(&"--rules") {
            &[][..]
        } else {
            &["--rules", concat!(env!("CARGO_MANIFEST_DIR"), "/rules")][..]
        })
        .stderr(Stdio::null())
        .spawn()
        .expect("start cutover");
    let child = Killed(child);
    wait_for_port_within(
        port,
        Duration::from_secs(if wrap.is_empty() { 10 } else { 120 }),
    );
    (child, port)
}

/// A private PostgreSQL for a proxy benchmark, taking `max_connections` clients.
pub fn local_pg(max_connections: u32) -> cutover::demo::localpg::LocalPg {
    cutover::demo::localpg::LocalPg::start_with(cutover::demo::localpg::Options {
        settings: vec![("max_connections".into(), max_connections.to_string())],
        ..cutover::demo::localpg::Options::default()
    })
    .expect("start PostgreSQL")
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

/// Database `tree_bench` on `pg`: the legacy table holding a clean tree of `size`
/// affiliates, every migration, backfilled.
pub async fn tree_bench(pg: &cutover::demo::localpg::LocalPg, size: u64) -> tokio_postgres::Client {
    let admin = cutover::net::connect::connect(&pg.config("postgres"))
        .await
        .expect("connect");
    admin
        .batch_execute("CREATE DATABASE tree_bench")
        .await
        .expect("create database");
    let config = pg.config("tree_bench");
    let client = legacy_database(&config, &cutover::demo::fixture::TreeSpec::clean(size))
        .await
        .expect("a legacy tree");
    backfill(&client, &config, &rules())
        .await
        .expect("backfill");
    client
}

/// `tree_bench` (see there) with its live state seeded from the rules, by a proxy with a
/// control database started once; then a copy of it for each of `copies`, each with a live
/// state of its own (a proxy whose control database is a copy follows that copy's stages).
pub async fn seeded_tree(pg: &cutover::demo::localpg::LocalPg, size: u64, copies: &[&str]) {
    let client = tree_bench(pg, size).await;
    {
        let control = pg.url("tree_bench");
        let (_proxy, _) = start_cutover_with(pg.port(), &["--control", &control]);
        seeded(&client).await;
    }
    drop(client);
    let admin = cutover::net::connect::connect(&pg.config("postgres"))
        .await
        .expect("connect");
    for copy in copies {
        // PostgreSQL waits a few seconds for the template's last sessions to end.
        admin
            .batch_execute(&format!("CREATE DATABASE {copy} TEMPLATE tree_bench"))
            .await
            .expect("copy tree_bench");
    }
}

/// Sets `affiliate_by_id`'s stage in the live state of `client`'s database (a proxy
/// following it applies it within a second).
pub async fn set_stage(client: &tokio_postgres::Client, stage: &str, percent: i16) {
    client
        .execute(
            "UPDATE cutover.query_type_state SET stage = $1, percent = $2 WHERE query_type = 'affiliate_by_id'",
            &[&stage, &percent],
        )
        .await
        .expect("set the stage");
}

/// A pgbench script in `dir` running the app's `affiliate_by_id` on a random id of a tree of
/// `size`; its path.
pub fn by_id_script(dir: &Path, size: u64) -> String {
    let script = dir.join("by_id.sql");
    std::fs::write(
        &script,
        format!("\\set id random(1, {size})\nSELECT * FROM affiliates WHERE affiliate_id = :id;\n"),
    )
    .unwrap();
    script.display().to_string()
}

/// Waits (up to 10 s) until a proxy's control feed has seeded the live state from the rules:
/// then a stage set in `cutover.query_type_state` is the one applied.
pub async fn seeded(client: &tokio_postgres::Client) {
    for _ in 0..100 {
        let seeded: i64 = client
            .query_one("SELECT count(*) FROM cutover.query_type_state", &[])
            .await
            .map_or(0, |r| r.get(0));
        if seeded > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// pgbouncer in session mode, run as the postgres user when we are root (it refuses root).
/// pgbouncer's own process, stopped when dropped (as root it runs under runuser, and killing
/// runuser leaves it running).
pub struct Bouncer(pub u32);

impl Drop for Bouncer {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is pgbouncer's, found above.
        unsafe { libc::kill(self.0 as i32, libc::SIGTERM) };
    }
}

/// Started by `wrap` (a program and its arguments, e.g. valgrind's) when it is not empty.
/// Returns the processes to stop, the port and pgbouncer's pid (under `wrap`, the wrapper's
/// process, which is pgbouncer's).
pub fn start_pgbouncer<S: AsRef<std::ffi::OsStr>>(
    upstream_port: u16,
    dir: &Path,
    wrap: &[S],
) -> Option<((Killed, Bouncer), u16, u32)> {
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
    let root = is_root();
    let mut program: Vec<&std::ffi::OsStr> = wrap.iter().map(AsRef::as_ref).collect();
    program.push(exe.as_os_str());
    let mut cmd = if root {
        let _ = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir)
            .status();
        // runuser's session starts at the default limit of 1,024 open files: too few for
        // 1,000 idle clients and their server connections (pgbouncer then fails every
        // accept and the clients wait for ever). Raised to what the hard limit allows.
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c"])
            .arg(
                "h=$(ulimit -Hn); [ \"$h\" = unlimited ] && h=65536; \
                 ulimit -n \"$h\" 2>/dev/null; exec \"$0\" \"$@\"",
            )
            .args(&program);
        c
    } else {
        let mut c = Command::new(program[0]);
        c.args(&program[1..]);
        c
    };
    let child = own_session(&mut cmd)
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_port_within(
        port,
        Duration::from_secs(if wrap.is_empty() { 10 } else { 120 }),
    );
    // With runuser, the child is runuser; pgbouncer (or its wrapper) is its child.
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
                    .is_ok_and(|c| !matches!(c.trim(), "runuser" | "sh"))
            })
            .unwrap_or(child.id())
    } else {
        child.id()
    };
    Some(((Killed(child), Bouncer(pid)), port, pid))
}

/// Whether this process runs as root (pgbouncer and PostgreSQL refuse to).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
