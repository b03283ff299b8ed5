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
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use cutover::demo::localpg::{LocalPg, Options};

mod common;
use common::{Pgbench, median, pgbench_on, pgbench_tps, start_cutover};

const CLIENTS: &str = "8";
const THREADS: &str = "2";
const IDLE_CONNECTIONS: usize = 1000;

/// pgbench -S in `mode` on the `postgres` database.
fn pgbench(bindir: &Path, port: u16, mode: &str, seconds: u64) -> Pgbench {
    pgbench_on(
        bindir,
        port,
        "postgres",
        &[
            "-n",
            "-S",
            "-M",
            mode,
            "-c",
            CLIENTS,
            "-j",
            THREADS,
            "-T",
            &seconds.to_string(),
        ],
    )
}

/// One pgbench run against a target: its tps, and the CPU time the proxy process (`pid`)
/// spent per transaction, from /proc/PID/stat before and after.
#[derive(Clone, Copy, Default)]
struct Measured {
    tps: f64,
    cpu_us_per_tx: f64,
}

impl Measured {
    fn median(runs: &[Measured]) -> Option<Measured> {
        (!runs.is_empty()).then(|| Measured {
            tps: median(runs.iter().map(|r| r.tps).collect()),
            cpu_us_per_tx: median(runs.iter().map(|r| r.cpu_us_per_tx).collect()),
        })
    }
}

/// CPU time (user + system) of a process (`"PID"`) or thread (`"PID/task/TID"`) so far, in
/// microseconds.
fn cpu_us(which: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{which}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field of the
    // line, stime the 15th; counted after ") " they are the 12th and 13th.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e6 / hz
}

fn measure(pid: Option<u32>, run: impl FnOnce() -> Pgbench) -> Measured {
    let before = pid.map(|p| cpu_us(&p.to_string()));
    let Pgbench { tps, transactions } = run();
    let cpu = match (pid, before) {
        (Some(pid), Some(before)) => (cpu_us(&pid.to_string()) - before) / transactions.max(1.0),
        _ => 0.0,
    };
    Measured {
        tps,
        cpu_us_per_tx: cpu,
    }
}

const TREE: u64 = 100_000;

/// CPU time of process `pid`'s threads, in microseconds: those named `cutover-sessions-*`
/// (the relay) and the rest (the shadow, the control feed, metrics).
fn thread_cpu_us(pid: u32) -> (f64, f64) {
    let mut sessions = 0.0;
    let mut rest = 0.0;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0.0, 0.0);
    };
    for task in tasks.flatten() {
        let tid: u32 = task.file_name().to_string_lossy().parse().unwrap_or(0);
        let comm =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
        let us = cpu_us(&format!("{pid}/task/{tid}"));
        if comm.starts_with("cutover-session") {
            sessions += us;
        } else {
            rest += us;
        }
    }
    (sessions, rest)
}

/// The cost of serving `affiliate_by_id` (prepared) in each stage: one client's time per
/// query, and with 8 clients the proxy's CPU per query, the relay's threads apart from the
/// rest (the shadow's comparisons). A second proxy with a control database, on a migrated and
/// backfilled tree of 100,000 affiliates; then pgbouncer (`bouncer`: its port and pid)
/// relaying the same query, the bar.
async fn stage_costs(
    pg: &LocalPg,
    bindir: &Path,
    seconds: u64,
    rounds: usize,
    bouncer: Option<(u16, u32)>,
) {
    let client = common::tree_bench(pg, TREE).await;
    let control = pg.url("tree_bench");
    let (proxy, port) = common::start_cutover_with(pg.port(), &["--control", &control]);
    let pid = proxy.0.id();
    let dir = tempfile::tempdir().unwrap();
    let script = common::by_id_script(dir.path(), TREE);
    let run = |port: u16, clients: &str| {
        let seconds = seconds.to_string();
        let threads = if clients == "1" { "1" } else { THREADS };
        let args = [
            "-n", "-M", "prepared", "-f", &script, "-c", clients, "-j", threads, "-T", &seconds,
        ];
        pgbench_on(bindir, port, "tree_bench", &args)
    };
    common::seeded(&client).await;
    // One sample: one client's time per query direct and through `port`, and with 8 clients
    // the CPU per query `cpu` reads from the proxy (its relay, the rest).
    let sample = |port: u16, cpu: &dyn Fn() -> (f64, f64)| {
        let direct = 1000.0 / run(pg.port(), "1").tps;
        let through = 1000.0 / run(port, "1").tps;
        let before = cpu();
        let queries = run(port, CLIENTS).transactions;
        let after = cpu();
        [
            direct,
            through,
            (after.0 - before.0) / queries.max(1.0),
            (after.1 - before.1) / queries.max(1.0),
        ]
    };
    println!(
        "\naffiliate_by_id prepared, {TREE} affiliates, every other query type at legacy, sample rate 1.0; {seconds} s each, median of {rounds} rounds, the rows rotated within each"
    );
    println!(
        "{:<12} {:>10} {:>10} {:>8} {:>12} {:>12}",
        "stage", "direct ms", "cutover ms", "added", "relay CPU", "other CPU"
    );
    println!(
        "{:<12} {:>10} {:>10} {:>8} {:>12} {:>12}",
        "", "1 client", "1 client", "µs", "µs/query", "µs/query"
    );
    // pgbouncer has no stages: it relays the query to legacy; its whole process is its relay
    // (no other CPU: shown as "-").
    enum Row<'a> {
        /// `affiliate_by_id` at a stage and percent, through cutover.
        Stage(&'a str, i16),
        /// Through pgbouncer (its port and pid).
        Bouncer(u16, u32),
    }
    let mut rows = vec![
        ("legacy", Row::Stage("legacy", 0)),
        ("shadow", Row::Stage("shadow", 0)),
        ("cutover 50", Row::Stage("cutover", 50)),
        ("target", Row::Stage("target", 0)),
    ];
    if let Some((port, pid)) = bouncer {
        rows.push(("pgbouncer", Row::Bouncer(port, pid)));
    }
    let mut samples = vec![Vec::new(); rows.len()];
    for round in 0..rounds {
        for i in (0..rows.len()).map(|i| (i + round) % rows.len()) {
            let taken = match rows[i].1 {
                Row::Stage(stage, percent) => {
                    client
                        .execute(
                            "UPDATE cutover.query_type_state SET stage = $1, percent = $2 WHERE query_type = 'affiliate_by_id'",
                            &[&stage, &percent],
                        )
                        .await
                        .expect("set the stage");
                    // Every replica applies a change within a second; then the route check
                    // is made.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let _ = run(port, "1");
                    sample(port, &|| thread_cpu_us(pid))
                }
                Row::Bouncer(port, pid) => sample(port, &|| (cpu_us(&pid.to_string()), f64::NAN)),
            };
            samples[i].push(taken);
        }
    }
    for ((label, _), taken) in rows.iter().zip(samples) {
        let column = |c: usize| median(taken.iter().map(|s| s[c]).collect());
        let (direct, through, relay, other) = (column(0), column(1), column(2), column(3));
        let other = if other.is_nan() {
            "-".to_owned()
        } else {
            format!("{other:.1}")
        };
        println!(
            "{label:<12} {direct:>10.3} {through:>10.3} {:>8.0} {relay:>12.1} {other:>12}",
            (through - direct) * 1000.0,
        );
    }
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
    let bouncer = common::start_pgbouncer::<&str>(pg.port(), dir.path(), &[]);
    if bouncer.is_none() {
        println!("pgbouncer not found (apt install pgbouncer): its column is left out");
    }

    let cutover_pid = cutover.0.id();
    println!(
        "pgbench -S, {CLIENTS} clients, {THREADS} threads, {seconds} s each, median of {rounds} rounds, scale 10; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<9} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "mode", "direct", "cutover/", "bouncer/", "", "cutover", "pgbouncer"
    );
    println!(
        "{:<9} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "", "tps", "direct", "direct", "", "CPU µs/tx", "CPU µs/tx"
    );
    for mode in ["simple", "extended", "prepared"] {
        let mut runs: [Vec<Measured>; 3] = Default::default();
        for round in 0..rounds {
            for i in 0..3 {
                let at = (i + round) % 3;
                let (port, pid) = match at {
                    0 => (pg.port(), None),
                    1 => (cutover_port, Some(cutover_pid)),
                    _ => match &bouncer {
                        Some((_, port, pid)) => (*port, Some(*pid)),
                        None => continue,
                    },
                };
                runs[at].push(measure(pid, || pgbench(&bindir, port, mode, seconds)));
            }
        }
        let [direct, through, bounced] = runs.map(|r| Measured::median(&r));
        let (direct, through) = (direct.unwrap_or_default(), through.unwrap_or_default());
        println!(
            "{mode:<9} {:>10.0} {:>9.2} {:>9} {:>9} {:>10.1} {:>10}",
            direct.tps,
            through.tps / direct.tps,
            bounced.map_or("-".into(), |b| format!("{:.2}", b.tps / direct.tps)),
            "",
            through.cpu_us_per_tx,
            bounced.map_or("-".into(), |b| format!("{:.1}", b.cpu_us_per_tx)),
        );
    }

    // One client, prepared: the time each proxy adds to a round trip.
    let one = |port: u16| {
        let tps = pgbench_tps(
            &bindir,
            port,
            &[
                "-n",
                "-S",
                "-M",
                "prepared",
                "-c",
                "1",
                "-j",
                "1",
                "-T",
                &seconds.to_string(),
            ],
        );
        1000.0 / tps
    };
    let mut latency: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for i in 0..3 {
            let at = (i + round) % 3;
            let port = match at {
                0 => pg.port(),
                1 => cutover_port,
                _ => match &bouncer {
                    Some((_, port, _)) => *port,
                    None => continue,
                },
            };
            latency[at].push(one(port));
        }
    }
    let [direct_ms, cutover_ms, bouncer_ms] = latency.map(|l| (!l.is_empty()).then(|| median(l)));
    let direct_ms = direct_ms.unwrap_or_default();
    let cutover_ms = cutover_ms.unwrap_or_default();
    println!(
        "one client, prepared: direct {direct_ms:.3} ms per tx, cutover {cutover_ms:.3} ms (+{:.0} µs){}",
        (cutover_ms - direct_ms) * 1000.0,
        bouncer_ms.map_or(String::new(), |b| format!(
            ", pgbouncer {b:.3} ms (+{:.0} µs)",
            (b - direct_ms) * 1000.0
        ))
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(stage_costs(
        &pg,
        &bindir,
        seconds,
        rounds,
        bouncer.as_ref().map(|(_, port, pid)| (*port, *pid)),
    ));
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
