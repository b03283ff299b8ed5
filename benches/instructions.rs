//! Instructions per transaction through cutover and through pgbouncer, counted by valgrind's
//! callgrind: the proxies' own work, which this machine's noise does not move (CPU time per
//! transaction moves by more than the difference between them from one run to the next). A
//! program, not a test: it prints what it counted and asserts nothing.
//!
//!     cargo bench --bench instructions              # 2,000 transactions per client
//!     cargo bench --bench instructions -- 500       # 500
//!     cargo bench --bench instructions -- target    # only the rows whose label says so
//!     CUTOVER_BENCH_KEEP=1 cargo bench --bench instructions   # callgrind's files kept, to annotate
//!
//! Each row starts its proxy under callgrind with counting off, warms it up with a few seconds
//! of pgbench (logins, the route check a stage waits for, the caches), then counts only over
//! one run of 8 clients (one in the row that says so) × N transactions, and divides by the
//! transactions. Both proxies make the same system calls per transaction
//! (docs/performance.md: two reads and two writes), so what separates their CPU per
//! transaction is these instructions and the kernel's scheduling. cutover's are given whole
//! and for its relay's thread alone ("relay"): the rest is the shadow's comparisons at the
//! later stages, and timed upkeep (the metrics, the change feed) that valgrind's slowness
//! inflates per transaction. Of the relay's, the shadow's hand-off (each compared read
//! copied and handed to the shadow's queue) is given apart too, and the ratio to pgbouncer
//! without it. So is, at `cutover N%`, the SHA-256 block of each bucket's hash: valgrind
//! has no SHA instructions, so it runs sha2's software block function (thousands of
//! instructions) where this CPU runs a few hundred SHA-NI ones. The block's native time is
//! measured here too, in this process, and printed under the table.
//!
//! Needs `valgrind` (with `callgrind_control`) and pgbouncer: `apt install valgrind pgbouncer`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use cutover::demo::localpg::LocalPg;

mod common;
use common::{Pgbench, pgbench_on, start_cutover_wrapped, start_pgbouncer};

const CLIENTS: &str = "8";
const THREADS: &str = "2";
/// The stage rows' tree, as `proxy_throughput`'s.
const TREE: u64 = 100_000;

/// A proxy under callgrind, counting off until [`Counted::count`].
struct Counted {
    /// The valgrind process (the proxy's own pid under valgrind).
    pid: u32,
    /// Where callgrind writes, one file per thread (`out-01`, `out-02`, …).
    out: PathBuf,
    /// `callgrind_control` runs as the user valgrind runs as.
    as_postgres: bool,
}

/// Instructions counted over one run.
struct Count {
    whole: u64,
    /// The threads that ran the relay (cutover's session threads).
    relay: u64,
    /// Of `relay`, the shadow's hand-off: the copy of each compared read and its hand-over
    /// to the shadow's queue (what the issue counts apart as "the shadow's work").
    handoff: u64,
    /// Of `relay`, the buckets' SHA-256 blocks, in valgrind's software path.
    hash: u64,
    transactions: f64,
}

/// The relay's functions that are the shadow's hand-off, counted with what they call (each
/// kept out of line so that callgrind sees its calls).
const HANDOFF: [&str; 3] = [
    "cutover::shadow::Shadow::prepare",
    "cutover::proxy::session::pending::Flow::defer",
    "cutover::proxy::session::relay::ServerToClient::hand_held_offers",
];

/// The SHA-256 block function of the buckets' hash (`routing::route::bucket`), counted with
/// what it calls: under valgrind, sha2's software path.
const HASH_BLOCK: [&str; 1] = ["sha2::sha256::compress256"];

/// The inclusive instructions of the calls to each group of `functions` in one callgrind
/// file, read in one pass: each `calls=` line's next line ends with what that call cost,
/// callee included. Function names are given once as `fn=(id) name` (or `cfn=`) and by
/// `(id)` after.
fn called_costs<const N: usize>(text: &str, groups: [&[&str]; N]) -> [u64; N] {
    let mut names: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    let mut callee: Option<&str> = None;
    let mut lines = text.lines();
    let mut totals = [0; N];
    while let Some(line) = lines.next() {
        let named = line
            .strip_prefix("cfn=")
            .map(|rest| (true, rest))
            .or_else(|| line.strip_prefix("fn=").map(|rest| (false, rest)));
        if let Some((is_callee, rest)) = named {
            let (id, name) = rest.split_once(' ').unwrap_or((rest, ""));
            if !name.is_empty() {
                names.insert(id, name);
            }
            if is_callee {
                callee = names.get(id).copied();
            }
        } else if line.starts_with("calls=") {
            let cost = lines
                .next()
                .and_then(|l| l.split_whitespace().last())
                .and_then(|c| c.parse::<u64>().ok())
                .unwrap_or(0);
            if let Some(callee) = callee
                && let Some(group) = groups
                    .iter()
                    .position(|functions| functions.iter().any(|f| callee.starts_with(f)))
            {
                totals[group] += cost;
            }
        }
    }
    totals
}

impl Counted {
    /// valgrind's arguments to start a proxy under it, writing to `out`.
    fn wrap(out: &Path) -> [String; 5] {
        [
            "valgrind".into(),
            "--tool=callgrind".into(),
            "--instr-atstart=no".into(),
            "--separate-threads=yes".into(),
            format!("--callgrind-out-file={}", out.display()),
        ]
    }

    fn control(&self, what: &str) {
        let pid = self.pid.to_string();
        let status = if self.as_postgres {
            Command::new("runuser")
                .args([
                    "-u",
                    "postgres",
                    "--",
                    "callgrind_control",
                    "-i",
                    what,
                    &pid,
                ])
                .output()
        } else {
            Command::new("callgrind_control")
                .args(["-i", what, &pid])
                .output()
        };
        assert!(
            status.is_ok_and(|o| o.status.success()),
            "callgrind_control -i {what} {pid}"
        );
    }

    /// Counts over `run`, then stops the proxy (callgrind writes its counts as it exits).
    fn count(self, run: impl FnOnce() -> Pgbench, stop: impl FnOnce()) -> Count {
        self.control("on");
        let transactions = run().transactions;
        self.control("off");
        stop();
        for _ in 0..600 {
            if !Path::new(&format!("/proc/{}", self.pid)).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let dir = self.out.parent().expect("a file in a directory");
        let name = self.out.file_name().unwrap().to_string_lossy().into_owned();
        let (mut whole, mut relay, mut handoff, mut hash) = (0, 0, 0, 0);
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if !entry.file_name().to_string_lossy().starts_with(&name) {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let total = text
                .lines()
                .find_map(|l| l.strip_prefix("totals: "))
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            whole += total;
            if text.contains("session::relay::Relay") {
                relay += total;
                let [h, b] = called_costs(&text, [&HANDOFF, &HASH_BLOCK]);
                handoff += h;
                hash += b;
            }
        }
        Count {
            whole,
            relay,
            handoff,
            hash,
            transactions,
        }
    }
}

fn found(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let per_client: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(2000);
    // Words that are not numbers pick the rows whose label has one of them.
    let only: Vec<&str> = args
        .iter()
        .filter(|a| a.parse::<u64>().is_err() && !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    if !found("valgrind") || !found("callgrind_control") {
        println!("valgrind not found (apt install valgrind): nothing counted");
        return;
    }
    let pg = common::local_pg(200);
    let bindir = pg.bindir().to_owned();
    let init = pgbench_init(&bindir, pg.port());
    assert!(init, "pgbench -i");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tree = runtime.block_on(tree(&pg));
    let tempdir = tempfile::tempdir().unwrap();
    let (dir, _removed_at_the_end) = if std::env::var_os("CUTOVER_BENCH_KEEP").is_some() {
        let kept = tempdir.keep();
        println!("callgrind's files are kept in {}", kept.display());
        (kept, None)
    } else {
        (tempdir.path().to_owned(), Some(tempdir))
    };
    // valgrind as postgres (pgbouncer's user when we are root) writes here too.
    let _ = Command::new("chmod").arg("777").arg(dir.as_path()).status();
    let script = common::by_id_script(dir.as_path(), TREE);
    let transactions = per_client.to_string();
    println!(
        "instructions per transaction (callgrind), {CLIENTS} clients × {per_client} transactions after a 5 s warm-up"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "",
        "cutover",
        "cutover",
        "of it the",
        "of it the",
        "pgbouncer",
        "cutover /",
        "less the",
        "less both"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "process", "relay", "hand-off", "SHA block", "process", "pgbouncer", "hand-off", ""
    );
    let mut rows: Vec<(String, Option<&str>, Vec<&str>)> = ["simple", "extended", "prepared"]
        .into_iter()
        .map(|mode| (format!("pgbench -S {mode}"), None, vec!["-S", "-M", mode]))
        .collect();
    // The application's own statement, in the extended protocol with an unnamed statement
    // (a Parse per execution, each classified), at legacy.
    rows.push((
        "affiliate_by_id extended".to_owned(),
        Some("legacy"),
        vec!["-M", "extended", "-f", script.as_str()],
    ));
    for stage in ["legacy", "shadow", "cutover 50", "target"] {
        rows.push((
            format!("affiliate_by_id {stage}"),
            Some(stage),
            vec!["-M", "prepared", "-f", script.as_str()],
        ));
    }
    // One client, as the latency figures of proxy_throughput have it: each transaction a
    // wake-up of its own (pgbench takes the last -c and -j given).
    rows.push((
        "affiliate_by_id 1 client".to_owned(),
        Some("legacy"),
        vec![
            "-M",
            "prepared",
            "-f",
            script.as_str(),
            "-c",
            "1",
            "-j",
            "1",
        ],
    ));
    rows.retain(|(label, _, _)| only.is_empty() || only.iter().any(|w| label.contains(w)));
    for (label, stage, args) in rows {
        let database = if stage.is_some() {
            "tree_bench"
        } else {
            "postgres"
        };
        let out = dir.join(format!("cutover-{}", label.replace(' ', "_")));
        let wrap = Counted::wrap(&out);
        let control = pg.url("tree_bench");
        let extra: Vec<&str> = match stage {
            Some(_) => vec!["--control", &control, "--worker-threads", "1"],
            None => vec!["--worker-threads", "1"],
        };
        if let Some(stage) = stage {
            let (name, percent) = stage.split_once(' ').unwrap_or((stage, "0"));
            let percent: i16 = percent.parse().unwrap();
            runtime.block_on(common::set_stage(&tree, name, percent));
        }
        let (proxy, port) = start_cutover_wrapped(pg.port(), &extra, &wrap);
        let counted = Counted {
            pid: proxy.0.id(),
            out,
            as_postgres: false,
        };
        let run = warmed(&bindir, port, database, &args, &transactions);
        let pid = counted.pid;
        let cutover = counted.count(run, || {
            // SAFETY: kill has no memory preconditions; the pid is our child's.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        });
        drop(proxy);

        let bouncer_out = dir.join(format!("pgbouncer-{}", label.replace(' ', "_")));
        let wrap = Counted::wrap(&bouncer_out);
        let bouncer_dir = tempfile::tempdir().unwrap();
        let bouncer = start_pgbouncer(pg.port(), bouncer_dir.path(), &wrap).map(
            |((child, bouncer), port, pid)| {
                let counted = Counted {
                    pid,
                    out: bouncer_out.clone(),
                    as_postgres: common::is_root(),
                };
                let run = warmed(&bindir, port, database, &args, &transactions);
                let count = counted.count(run, || drop(bouncer));
                drop(child);
                count
            },
        );
        if stage.is_some_and(|s| s != "legacy") && cutover.handoff == 0 {
            // The stage compares every read: its hand-off cannot be nothing.
            eprintln!(
                "{label}: no call to {HANDOFF:?} in callgrind's file (renamed, or inlined?): the hand-off column is wrong"
            );
        }
        let per = |n: u64, c: &Count| n as f64 / c.transactions.max(1.0);
        let bouncer_column = bouncer
            .as_ref()
            .map_or("-".to_owned(), |b| format!("{:.0}", per(b.whole, b)));
        let ratio = |relay: u64| {
            bouncer.as_ref().map_or("-".to_owned(), |b| {
                format!("{:.2}", per(relay, &cutover) / per(b.whole, b))
            })
        };
        if stage.is_some_and(|s| s.starts_with("cutover")) && cutover.hash == 0 {
            eprintln!(
                "{label}: no call to {HASH_BLOCK:?} in callgrind's file (renamed, or inlined?): the SHA block column is wrong"
            );
        }
        println!(
            "{label:<24} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {bouncer_column:>10} {:>10} {:>10} {:>10}",
            per(cutover.whole, &cutover),
            per(cutover.relay, &cutover),
            per(cutover.handoff, &cutover),
            per(cutover.hash, &cutover),
            ratio(cutover.relay),
            ratio(cutover.relay - cutover.handoff),
            ratio(cutover.relay - cutover.handoff - cutover.hash),
        );
    }
    println!(
        "(cutover / pgbouncer: cutover's relay against pgbouncer's whole process; the hand-off is the \
         shadow's work on the relay's thread: each compared read copied and handed to its queue; \
         the SHA block is the buckets' SHA-256 compression in valgrind's software path; \
         \"less both\" takes out the two)"
    );
    let (native, bucket) = native_sha256();
    println!(
        "natively, in this process: a SHA-256 block {native:.0} ns ({}), a whole bucket {bucket:.0} ns",
        if std::arch::is_x86_feature_detected!("sha") {
            "SHA-NI"
        } else {
            "no SHA-NI: software"
        }
    );
}

/// Nanoseconds of one SHA-256 block and of one whole bucket (`routing::route::bucket`: the
/// hash of a key with its padding, and the modulo), run natively (the path sha2 picks on
/// this CPU), best of five rounds of 200,000.
fn native_sha256() -> (f64, f64) {
    let mut state = [0u32; 8];
    let block = best_ns(|i| {
        let mut block = [0u8; 64];
        block[..4].copy_from_slice(&i.to_le_bytes());
        sha2::block_api::compress256(&mut state, &[block]);
        std::hint::black_box(&state);
    });
    let bucket = best_ns(|i| {
        let mut key = itoa::Buffer::new();
        std::hint::black_box(cutover::routing::route::bucket(key.format(i).as_bytes()));
    });
    (block, bucket)
}

/// Nanoseconds a call of `each`, the best of five rounds of 200,000.
fn best_ns(mut each: impl FnMut(u32)) -> f64 {
    const N: u32 = 200_000;
    (0..5)
        .map(|_| {
            let start = std::time::Instant::now();
            for i in 0..N {
                each(i);
            }
            start.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .fold(f64::INFINITY, f64::min)
}

/// pgbench with `args` (8 clients unless they say otherwise) on `port`: 5 s of it now, uncounted; then, from the
/// closure returned, the counted run of `transactions` per client.
fn warmed<'a>(
    bindir: &'a Path,
    port: u16,
    database: &'a str,
    args: &[&'a str],
    transactions: &'a str,
) -> impl FnOnce() -> Pgbench + 'a {
    let mut all = vec!["-n", "-c", CLIENTS, "-j", THREADS];
    all.extend_from_slice(args);
    let mut warm = all.clone();
    warm.extend_from_slice(&["-T", "5"]);
    pgbench_on(bindir, port, database, &warm);
    all.extend_from_slice(&["-t", transactions]);
    move || pgbench_on(bindir, port, database, &all)
}

fn pgbench_init(bindir: &Path, port: u16) -> bool {
    Command::new(bindir.join("pgbench"))
        .args(["-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-U", "postgres", "postgres"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The stage rows' database: a migrated, backfilled tree, its live state seeded from the
/// rules.
async fn tree(pg: &LocalPg) -> tokio_postgres::Client {
    common::seeded_tree(pg, TREE, &[]).await;
    cutover::net::connect::connect(&pg.config("tree_bench"))
        .await
        .expect("connect")
}
