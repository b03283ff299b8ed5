//! Throughput through the proxy, measured side by side in one run: pgbench -S (select-only)
//! in each protocol mode, directly against PostgreSQL, through cutover, and through
//! pgbouncer (session mode) when it is installed; then the proxy's memory with 1,000 idle
//! client connections. A program, not a test: it prints what it measured and asserts
//! nothing.
//!
//!     cargo bench --bench proxy_throughput                 # 10 s per measurement, 3 rounds
//!     cargo bench --bench proxy_throughput -- 5 1          # 5 s, 1 round
//!     cargo bench --bench proxy_throughput -- 5 3 latency  # one part: modes, latency,
//!                                                          # stages or memory
//!
//! Every target gets the same pgbench invocation (8 clients, 2 threads). Each mode is
//! measured in rounds, each round running direct, cutover and pgbouncer back to back in a
//! rotating order, and the median of the rounds is printed: on a small shared machine one
//! run moves by ±10%, and the proxies must be compared under the same conditions.
//!
//! Then, on a tree of 100,000 affiliates with the app's `affiliate_by_id` at each stage: one
//! client's round trips through each proxy, interleaved query by query in a shuffled order,
//! the later stages also through a replica that compares nothing (`latency`), and with 8
//! clients the relay's CPU per query apart from the shadow's (`stages`).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use cutover::demo::localpg::LocalPg;

mod common;
use common::{Pgbench, median, pgbench_on, start_cutover};

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

/// The stages measured: a label, the stage and its percent.
const STAGES: [(&str, &str, i16); 4] = [
    ("legacy", "legacy", 0),
    ("shadow", "shadow", 0),
    ("cutover 50", "cutover", 50),
    ("target", "target", 0),
];

/// The copy of `tree_bench` whose live state holds `affiliate_by_id` at `stage` (a label of
/// [`STAGES`]).
fn copy_of(stage: &str) -> String {
    format!("tree_bench_{}", stage.replace(' ', "_"))
}

/// The repository's rules with a sample rate of 0 (a directory of its own): a replica that
/// compares nothing, the relay's own path at the later stages with the shadow's work set
/// apart.
fn unsampled_rules() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rules = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/fature.toml"))
        .expect("the repository's rules");
    assert!(
        rules.contains("\nsample_rate = 1.0\n"),
        "the rules' default sample rate"
    );
    std::fs::write(
        dir.path().join("fature.toml"),
        rules.replace("\nsample_rate = 1.0\n", "\nsample_rate = 0.0\n"),
    )
    .expect("write the unsampled rules");
    dir
}

/// A replica following `control`'s live state with the rules in `unsampled`
/// ([`unsampled_rules`]), relaying to legacy's server on `upstream`.
fn start_unsampled(
    upstream: u16,
    control: &str,
    unsampled: &tempfile::TempDir,
) -> (common::Killed, u16) {
    let rules = unsampled.path().to_str().expect("a UTF-8 path");
    common::start_cutover_with(upstream, &["--control", control, "--rules", rules])
}

/// The stages whose reads are compared: measured again through a replica that compares
/// nothing.
fn compared(stage: &str) -> bool {
    stage != "legacy"
}

/// The time one client's round trip takes through each proxy beyond direct's, with
/// `affiliate_by_id` (prepared) at each stage: a proxy per stage, each following a copy of
/// the tree whose live state holds that stage, and pgbouncer (on `bouncer`). One client's
/// queries go to every target in turn, query by query (`common::latency`): what slows the
/// machine down for a while slows them all alike. The shadow's comparisons at the later
/// stages run after their reads, in the background, and so land on whichever targets come
/// next in the (shuffled) pass, every target alike. The later stages are measured twice: as
/// configured (sample rate 1.0) and through a second replica whose rules compare nothing
/// ("rate 0"), its relay's own path with the shadow's work set apart. v2's own time at
/// `target` is the row "direct, v2's SQL".
async fn round_trips(pg: &LocalPg, passes: usize, rounds: usize, bouncer: Option<u16>) {
    use common::latency::{Target, interleaved};
    let legacy_sql = "SELECT * FROM affiliates WHERE affiliate_id = $1";
    let classifier =
        cutover::routing::classify::Classifier::new(std::sync::Arc::new(common::rules()));
    let v2_sql = cutover::routing::classify::explain(&classifier, legacy_sql)
        .target_sql
        .expect("affiliate_by_id has a target SQL");
    let direct = |label: &str, sql: &str| Target {
        label: label.to_owned(),
        port: pg.port(),
        database: "tree_bench".to_owned(),
        sql: sql.to_owned(),
    };
    let mut targets = vec![
        direct("direct", legacy_sql),
        direct("direct, v2's SQL", &v2_sql),
    ];
    if let Some(port) = bouncer {
        targets.push(Target {
            port,
            ..direct("pgbouncer", legacy_sql)
        });
    }
    let unsampled = unsampled_rules();
    let mut proxies = Vec::new();
    let mut compared_never = Vec::new();
    for (label, stage, percent) in STAGES {
        let database = copy_of(label);
        let live = cutover::net::connect::connect(&pg.config(&database))
            .await
            .expect("connect");
        common::set_stage(&live, stage, percent).await;
        let control = pg.url(&database);
        let (proxy, port) = common::start_cutover_with(pg.port(), &["--control", &control]);
        proxies.push(proxy);
        targets.push(Target {
            label: format!("cutover {label}"),
            port,
            database: database.clone(),
            sql: legacy_sql.to_owned(),
        });
        if compared(stage) {
            // A second replica of the same live state, its rules sampling nothing.
            let (proxy, port) = start_unsampled(pg.port(), &control, &unsampled);
            proxies.push(proxy);
            compared_never.push(Target {
                label: format!("{label}, rate 0"),
                port,
                database,
                sql: legacy_sql.to_owned(),
            });
        }
    }
    targets.extend(compared_never);
    // The route check a stage waits for, made by each proxy as it starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut by_round = Vec::new();
    for _ in 0..rounds {
        by_round.push(interleaved(&targets, TREE as i64, 500, passes).await);
    }
    println!(
        "\none client, affiliate_by_id prepared, {TREE} affiliates, sample rate 1.0 (\"rate 0\": none): round trips interleaved query by query, in a shuffled order, {passes} passes × {rounds} rounds (medians of the rounds)"
    );
    println!(
        "{:<20} {:>9} {:>9} {:>10} {:>16}",
        "", "p50 µs", "p99 µs", "added µs", "rounds' added"
    );
    for (i, target) in targets.iter().enumerate() {
        let of_rounds = |f: &dyn Fn(&common::latency::Trips, &common::latency::Trips) -> f64| {
            by_round
                .iter()
                .map(|r| f(&r[i], &r[0]))
                .collect::<Vec<f64>>()
        };
        let added = of_rounds(&|t, base| t.added_us(base));
        let (low, high) = added
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), a| (l.min(*a), h.max(*a)));
        println!(
            "{:<20} {:>9.1} {:>9.1} {:>10} {:>16}",
            target.label,
            median(of_rounds(&|t, _| t.quantile_us(0.5))),
            median(of_rounds(&|t, _| t.quantile_us(0.99))),
            if i == 0 {
                "-".to_owned()
            } else {
                format!("{:+.1}", median(added))
            },
            if i == 0 {
                "-".to_owned()
            } else {
                format!("{low:+.0} … {high:+.0}")
            },
        );
    }
    drop(proxies);
}

/// Context switches of a process (`"PID"`: its first thread's) or thread (`"PID/task/TID"`)
/// so far, voluntary (it waited) and not (it was preempted).
fn switches(which: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{which}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

/// What process `pid`'s threads have used so far: the CPU time, in microseconds, of those
/// named `cutover-session*` (the relay) and of the rest (the shadow, the control feed,
/// metrics), and the relay's context switches.
fn thread_use(pid: u32) -> [f64; 3] {
    let mut used = [0.0; 3];
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return used;
    };
    for task in tasks.flatten() {
        let tid: u32 = task.file_name().to_string_lossy().parse().unwrap_or(0);
        let which = format!("{pid}/task/{tid}");
        let comm = std::fs::read_to_string(format!("/proc/{which}/comm")).unwrap_or_default();
        if comm.starts_with("cutover-session") {
            used[0] += cpu_us(&which);
            used[2] += switches(&which);
        } else {
            used[1] += cpu_us(&which);
        }
    }
    used
}

/// The CPU cost of serving `affiliate_by_id` (prepared) in each stage: with 8 clients, the
/// proxy's CPU per query, the relay's threads apart from the rest (the shadow's
/// comparisons), and how often the relay's threads were switched out per query (they wait
/// more, or are preempted, when the shadow's threads and connections take the CPU between).
/// A second proxy with a control database, on `tree_bench` (a migrated and
/// backfilled tree of 100,000 affiliates); then pgbouncer (`bouncer`: its port and pid)
/// relaying the same query, the bar.
async fn stage_costs(
    pg: &LocalPg,
    bindir: &Path,
    seconds: u64,
    rounds: usize,
    bouncer: Option<(u16, u32)>,
) {
    let client = cutover::net::connect::connect(&pg.config("tree_bench"))
        .await
        .expect("connect");
    let control = pg.url("tree_bench");
    let (proxy, port) = common::start_cutover_with(pg.port(), &["--control", &control]);
    let pid = proxy.0.id();
    // A replica of the same live state comparing nothing: its relay's own CPU.
    let unsampled = unsampled_rules();
    let (quiet, quiet_port) = start_unsampled(pg.port(), &control, &unsampled);
    let quiet_pid = quiet.0.id();
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
    // One sample: with 8 clients, the CPU per query `cpu` reads from the proxy (its relay, the
    // rest).
    let sample = |port: u16, used: &dyn Fn() -> [f64; 3]| {
        let before = used();
        let queries = run(port, CLIENTS).transactions;
        let after = used();
        [0, 1, 2].map(|i| (after[i] - before[i]) / queries.max(1.0))
    };
    println!(
        "\naffiliate_by_id prepared, {TREE} affiliates, every other query type at legacy, sample rate 1.0 (\"rate 0\": a replica whose rules compare nothing); {seconds} s each, median of {rounds} rounds, the rows rotated within each"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12}",
        "stage", "relay CPU", "other CPU", "relay"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12}",
        "", "µs/query", "µs/query", "switches/q"
    );
    // pgbouncer has no stages: it relays the query to legacy; its whole process is its relay
    // (no other CPU: shown as "-").
    enum Row<'a> {
        /// `affiliate_by_id` at a stage and percent, through cutover (its port and pid:
        /// the replica that compares, or the one that does not).
        Stage(&'a str, i16, u16, u32),
        /// Through pgbouncer (its port and pid).
        Bouncer(u16, u32),
    }
    let mut rows: Vec<(String, Row)> = STAGES
        .iter()
        .map(|(label, stage, percent)| (label.to_string(), Row::Stage(stage, *percent, port, pid)))
        .collect();
    rows.extend(STAGES.iter().filter(|(_, stage, _)| compared(stage)).map(
        |(label, stage, percent)| {
            (
                format!("{label}, rate 0"),
                Row::Stage(stage, *percent, quiet_port, quiet_pid),
            )
        },
    ));
    if let Some((port, pid)) = bouncer {
        rows.push(("pgbouncer".to_owned(), Row::Bouncer(port, pid)));
    }
    let mut samples = vec![Vec::new(); rows.len()];
    for round in 0..rounds {
        for i in (0..rows.len()).map(|i| (i + round) % rows.len()) {
            let taken = match rows[i].1 {
                Row::Stage(stage, percent, port, pid) => {
                    common::set_stage(&client, stage, percent).await;
                    // Every replica applies a change within a second; then the route check
                    // is made.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    let _ = run(port, "1");
                    sample(port, &|| thread_use(pid))
                }
                Row::Bouncer(port, pid) => sample(port, &|| {
                    let which = pid.to_string();
                    [cpu_us(&which), f64::NAN, switches(&which)]
                }),
            };
            samples[i].push(taken);
        }
    }
    for ((label, _), taken) in rows.iter().zip(samples) {
        let column = |c: usize| median(taken.iter().map(|s| s[c]).collect());
        let (relay, other, switched) = (column(0), column(1), column(2));
        let other = if other.is_nan() {
            "-".to_owned()
        } else {
            format!("{other:.1}")
        };
        println!("{label:<18} {relay:>6.1} {other:>12} {switched:>12.2}");
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
    // Words pick the parts to run (all when none is given).
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.parse::<u64>().is_err() && !a.starts_with('-'))
        .collect();
    let wants = |part: &str| words.is_empty() || words.iter().any(|w| w == part);
    let pg = common::local_pg(1200);
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
    if wants("modes") {
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
    }
    let modes: &[&str] = if wants("modes") {
        &["simple", "extended", "prepared"]
    } else {
        &[]
    };
    for &mode in modes {
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

    let runtime = tokio::runtime::Runtime::new().unwrap();
    if wants("latency") || wants("stages") {
        let copies: Vec<String> = STAGES.iter().map(|s| copy_of(s.0)).collect();
        let copies: Vec<&str> = copies.iter().map(String::as_str).collect();
        runtime.block_on(common::seeded_tree(&pg, TREE, &copies));
    }
    if wants("latency") {
        // One client: its own thread's runtime, as a client's driver has.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(round_trips(
                &pg,
                seconds as usize * 1000,
                rounds,
                bouncer.as_ref().map(|(_, port, _)| *port),
            ));
    }
    if wants("stages") {
        runtime.block_on(stage_costs(
            &pg,
            &bindir,
            seconds,
            rounds,
            bouncer.as_ref().map(|(_, port, pid)| (*port, *pid)),
        ));
    }
    if !wants("memory") {
        return;
    }
    if !wants("modes") {
        // "At rest" is after serving, as in a whole run (a second of each mode): a proxy
        // that has served nothing yet counts its workers' first buffers and the allocator's
        // first pages against the idle clients (4.4-4.6 KiB a client instead of 3.7-4.0).
        for mode in ["simple", "extended", "prepared"] {
            pgbench(&bindir, cutover_port, mode, 1);
            if let Some((_, port, _)) = &bouncer {
                pgbench(&bindir, *port, mode, 1);
            }
        }
    }
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
