//! Write throughput with dual-write, measured side by side in one run: the application's
//! write transactions (../shared/workloads/fature_app.sql: a new affiliate with its parent's
//! counter bumped, a deposit, a status change) driven by pgbench against legacy alone
//! (directly, dual-write off), through cutover with dual-write on, and after the flip
//! (every query type at `target`: v2 written first, legacy mirrored) — and the parts of the
//! difference: the proxy alone (through cutover, off), the mirror alone (directly, on), and
//! what cutover's triggers cost while dual-write is off (legacy without them) — and the floor
//! of any dual-write (legacy's row and v2's written in one statement, no trigger on either
//! table: what writing v2's row at all costs). Then the same
//! inserts with 1 writer and with 8, all under one root: whether writers under one root
//! still run one at a time. A program, not a test: it prints what it measured and asserts
//! nothing.
//!
//!     cargo bench --bench dual_write              # 100,000 affiliates, 10 s, 3 rounds
//!     cargo bench --bench dual_write -- 5 1       # 5 s, 1 round
//!
//! The tree is the seed's shape (10% roots) with every root but the first hung under it:
//! every write is under one root, the worst case for counters kept up the tree. Each round
//! runs the set-ups back to back in a rotating order; the median of the rounds is printed
//! (one run on a small shared machine moves by ±10%).

use std::path::Path;

use cutover::{
    demo::fixture::TreeSpec,
    demo::localpg::{LocalPg, Options},
};

mod common;
use common::{median, pgbench_on, start_cutover_with};

const AFFILIATES: u64 = 100_000;
const CLIENTS: &str = "8";
const THREADS: &str = "2";

const SCRIPT: &str = r"
\set parent random(1, 100000)
\set who random(1, 100000)
\set cents random(1, 100000)
BEGIN;
INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date) VALUES (:parent, gen_random_uuid()::text, 'Bench', 'bench@example.com', now()) RETURNING affiliate_id;
UPDATE affiliates SET level_1_referrals = level_1_referrals + 1, updated_at = now() WHERE affiliate_id = :parent;
END;
UPDATE affiliates SET total_deposits = total_deposits + :cents / 100.0, updated_at = now() WHERE affiliate_id = :who;
UPDATE affiliates SET status = 'active', updated_at = now() WHERE affiliate_id = :who;
";

/// The floor of any dual-write: the same transactions, each statement writing legacy's row
/// and v2's row in one statement (v2's columns from legacy's `RETURNING`), run with
/// `session_replication_role = replica` so that no trigger fires on either table — no
/// closure rows, paths or counters in v2, no mirror, no foreign-key checks. What writing v2's
/// row at all costs, on top of legacy's; no design of the mirror can cost less.
const FLOOR: &str = r"
\set parent random(1, 100000)
\set who random(1, 100000)
\set cents random(1, 100000)
BEGIN;
WITH l AS (INSERT INTO public.affiliates (parent_affiliate_id, external_id, name, email, registration_date) VALUES (:parent, gen_random_uuid()::text, 'Bench', 'bench@example.com', now()) RETURNING *) INSERT INTO fature_v2.affiliates_optimized (affiliate_id, parent_affiliate_id, external_id, name, email, status, registration_date, hierarchy_path, hierarchy_level, created_at, updated_at) SELECT affiliate_id, parent_affiliate_id, external_id, name, email, status, registration_date, text2ltree('1.' || affiliate_id), 2, created_at, updated_at FROM l RETURNING affiliate_id;
WITH l AS (UPDATE public.affiliates SET level_1_referrals = level_1_referrals + 1, updated_at = now() WHERE affiliate_id = :parent RETURNING affiliate_id, level_1_referrals, updated_at) UPDATE fature_v2.affiliates_optimized v SET direct_referrals_count = direct_referrals_count + 1, legacy_level_1_referrals = l.level_1_referrals, updated_at = l.updated_at FROM l WHERE v.affiliate_id = l.affiliate_id;
END;
WITH l AS (UPDATE public.affiliates SET total_deposits = total_deposits + :cents / 100.0, updated_at = now() WHERE affiliate_id = :who RETURNING affiliate_id, total_deposits, updated_at) UPDATE fature_v2.affiliates_optimized v SET total_deposits = l.total_deposits, updated_at = l.updated_at FROM l WHERE v.affiliate_id = l.affiliate_id;
WITH l AS (UPDATE public.affiliates SET status = 'active', updated_at = now() WHERE affiliate_id = :who RETURNING affiliate_id, status, updated_at) UPDATE fature_v2.affiliates_optimized v SET status = l.status, updated_at = l.updated_at FROM l WHERE v.affiliate_id = l.affiliate_id;
";

/// Connections on which no trigger fires (the benchmark's role is a superuser): the floor's,
/// and legacy's as before `cutover migrate`.
const NO_TRIGGERS: &str = "dbname=postgres options='-c session_replication_role=replica'";

/// The scaling script: the new-affiliate transaction alone.
const INSERTS: &str = r"
\set parent random(1, 100000)
BEGIN;
INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date) VALUES (:parent, gen_random_uuid()::text, 'Bench', 'bench@example.com', now()) RETURNING affiliate_id;
UPDATE affiliates SET level_1_referrals = level_1_referrals + 1, updated_at = now() WHERE affiliate_id = :parent;
END;
";

/// What the query types are set to for a run.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Every query type at legacy: dual-write off.
    Off,
    /// One query type at shadow: dual-write on, legacy written first.
    DualWrite,
    /// Every query type at target: v2 written first, legacy mirrored.
    Flipped,
}

/// CPU time the whole machine spent (user, system, irq), in milliseconds, from /proc/stat:
/// PostgreSQL, cutover and pgbench together.
fn machine_busy_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: f64 = stat
        .lines()
        .next()
        .map(|cpu| {
            cpu.split_whitespace()
                .skip(1)
                .enumerate()
                // user, nice, system, (idle, iowait skipped), irq, softirq, steal
                .filter(|(i, _)| ![3, 4].contains(i) && *i < 8)
                .filter_map(|(_, v)| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks * 10.0
}

/// A run's transactions per second and the machine's CPU milliseconds per transaction.
#[derive(Clone, Copy)]
struct Run {
    tps: f64,
    cpu_ms: f64,
    /// Share of the machine's CPUs busy during the run.
    busy: f64,
}

/// `script` with `clients` (one pgbench transaction = the script once) on `database` (a
/// name or a connection string).
fn pgbench(
    bindir: &Path,
    (script, database): (&Path, &str),
    port: u16,
    seconds: u64,
    clients: &str,
) -> Run {
    let (secs, script) = (seconds.to_string(), script.to_string_lossy());
    let threads = if clients == "1" { "1" } else { THREADS };
    let busy = machine_busy_ms();
    let tps = pgbench_on(
        bindir,
        port,
        database,
        &[
            "-n", "-M", "prepared", "-c", clients, "-j", threads, "-T", &secs, "-f", &script,
        ],
    )
    .tps;
    let spent = machine_busy_ms() - busy;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Run {
        tps,
        cpu_ms: spent / (tps * seconds as f64).max(1.0),
        busy: spent / (seconds as f64 * 1000.0 * cores),
    }
}

/// The medians of some runs' throughput and CPU per transaction.
fn medians(runs: &[Run]) -> Run {
    Run {
        tps: median(runs.iter().map(|r| r.tps).collect()),
        cpu_ms: median(runs.iter().map(|r| r.cpu_ms).collect()),
        busy: median(runs.iter().map(|r| r.busy).collect()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seconds = numbers.first().copied().unwrap_or(10);
    let rounds = numbers.get(1).copied().unwrap_or(3).max(1) as usize;

    let pg = LocalPg::start_with(Options::default())?;
    let config = pg.config("postgres");
    let client = common::legacy_database(&config, &TreeSpec::clean(AFFILIATES)).await?;
    // One root: the seed's other roots hung under the first, before the backfill.
    client
        .batch_execute(
            "UPDATE public.affiliates SET parent_affiliate_id = 1
             WHERE parent_affiliate_id IS NULL AND affiliate_id <> 1;
             ANALYZE public.affiliates",
        )
        .await?;
    common::backfill(&client, &config, &common::rules()).await?;
    // The benchmark's own session must not mirror its setup writes twice.
    client.batch_execute("RESET cutover.mirroring").await?;

    let dir = tempfile::tempdir()?;
    let script = dir.path().join("writes.sql");
    std::fs::write(&script, SCRIPT)?;
    let inserts = dir.path().join("inserts.sql");
    std::fs::write(&inserts, INSERTS)?;
    let floor = dir.path().join("floor.sql");
    std::fs::write(&floor, FLOOR)?;
    let (app, floor, inserts) = (
        (script.as_path(), "postgres"),
        (floor.as_path(), NO_TRIGGERS),
        (inserts.as_path(), "postgres"),
    );
    let control = pg.url("postgres");
    let (_cutover, proxy_port) = start_cutover_with(pg.port(), &["--control", &control]);
    let bindir = pg.bindir().to_owned();

    let set_mode = |mode: Mode| {
        let client = &client;
        async move {
            let (all, first) = match mode {
                Mode::Off => ("legacy", "legacy"),
                Mode::DualWrite => ("legacy", "shadow"),
                Mode::Flipped => ("target", "target"),
            };
            client
                .execute(
                    "UPDATE cutover.query_type_state
                     SET stage = CASE WHEN query_type = 'new_affiliate' THEN $2 ELSE $1 END,
                         percent = 0",
                    &[&all, &first],
                )
                .await?;
            // Every replica applies a change within a second.
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            anyhow::Ok(())
        }
    };

    // (label, through the proxy, mode, script and database). The last two run with no
    // trigger firing: legacy as it was before `cutover migrate` (`bare`), and the floor of
    // any dual-write.
    let bare_app = (app.0, NO_TRIGGERS);
    let setups = [
        ("legacy only, direct", false, Mode::Off, app),
        ("dual-write, cutover", true, Mode::DualWrite, app),
        ("proxy only (no dual-write)", true, Mode::Off, app),
        (
            "mirror only (direct, dual-write)",
            false,
            Mode::DualWrite,
            app,
        ),
        ("after the flip, cutover", true, Mode::Flipped, app),
        (
            "before cutover (no triggers), direct",
            false,
            Mode::Off,
            bare_app,
        ),
        (
            "floor: both rows, no triggers, direct",
            false,
            Mode::Off,
            floor,
        ),
    ];
    let (bare, floor_row) = (setups.len() - 2, setups.len() - 1);
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        for i in 0..setups.len() {
            let at = (i + round) % setups.len();
            let (_, proxied, mode, script) = setups[at];
            set_mode(mode).await?;
            let port = if proxied { proxy_port } else { pg.port() };
            runs[at].push(pgbench(&bindir, script, port, seconds, CLIENTS));
        }
    }
    let results: Vec<Run> = runs.iter().map(|r| medians(r)).collect();
    let tps: Vec<f64> = results.iter().map(|r| r.tps).collect();

    // Scaling under one root: 1 writer, then 8.
    let scaled = [
        ("legacy only, direct", false, Mode::Off),
        ("mirror only (direct, dual-write)", false, Mode::DualWrite),
        ("dual-write, cutover", true, Mode::DualWrite),
        ("after the flip, cutover", true, Mode::Flipped),
    ];
    let mut scaling: Vec<(Vec<Run>, Vec<Run>)> = vec![(Vec::new(), Vec::new()); scaled.len()];
    for round in 0..rounds {
        for i in 0..scaled.len() {
            let at = (i + round) % scaled.len();
            let (_, proxied, mode) = scaled[at];
            set_mode(mode).await?;
            let port = if proxied { proxy_port } else { pg.port() };
            scaling[at]
                .0
                .push(pgbench(&bindir, inserts, port, seconds, "1"));
            scaling[at]
                .1
                .push(pgbench(&bindir, inserts, port, seconds, CLIENTS));
        }
    }
    set_mode(Mode::DualWrite).await?;

    let (drift, pending): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM public.affiliates l
                         FULL JOIN fature_v2.affiliates_optimized v USING (affiliate_id)
                         WHERE l.affiliate_id IS NULL OR v.affiliate_id IS NULL),
                        (SELECT count(*) FROM fature_v2.network_size_deltas)",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };

    println!(
        "write transactions (new affiliate + parent bump; deposit; status), pgbench -M prepared, {CLIENTS} clients, {seconds} s each, median of {rounds} rounds, {AFFILIATES} affiliates under one root; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<38} {:>9} {:>10} {:>14}",
        "set-up", "tps", "vs legacy", "CPU ms per tx"
    );
    for ((label, _, _, _), run) in setups.iter().zip(&results) {
        println!(
            "{label:<38} {:>9.0} {:>10.2} {:>14.2}",
            run.tps,
            run.tps / tps[0],
            run.cpu_ms
        );
    }
    println!(
        "dual-write through cutover / proxy only: {:.2}   mirror only / legacy only: {:.2}   after the flip / proxy only: {:.2}   triggers' cost with dual-write off: {:.0}%",
        tps[1] / tps[2],
        tps[3] / tps[0],
        tps[4] / tps[2],
        (1.0 - tps[0] / tps[bare]) * 100.0
    );
    println!(
        "floor / before cutover: {:.2} (legacy's rows and v2's written in one statement each, no trigger on either table: no closure, paths or counters in v2, no mirror; no dual-write costs less)",
        tps[floor_row] / tps[bare]
    );
    println!(
        "(CPU ms per tx: the whole machine's busy time over the run — PostgreSQL, cutover and pgbench — per transaction)"
    );
    println!();
    println!("new affiliate + parent bump, under one root, 1 writer vs {CLIENTS}");
    println!(
        "{:<38} {:>9} {:>9} {:>7} {:>11} {:>11} {:>9}",
        "set-up", "1 writer", "8 writers", "8 / 1", "CPU ms (1)", "CPU ms (8)", "busy (8)"
    );
    for ((label, _, _), (one, eight)) in scaled.iter().zip(&scaling) {
        let (one, eight) = (medians(one), medians(eight));
        println!(
            "{label:<38} {:>9.0} {:>9.0} {:>7.2} {:>11.2} {:>11.2} {:>8.0}%",
            one.tps,
            eight.tps,
            eight.tps / one.tps,
            one.cpu_ms,
            eight.cpu_ms,
            eight.busy * 100.0
        );
    }
    println!(
        "(busy: the machine's CPUs in use with 8 writers. Near 100%, the CPU is the limit and 8 writers can go at most as many times as fast as 1 as there are cores ({}); well below, writers wait for each other)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "(keys on one side only after the runs with dual-write off: {drift}, expected: they were not mirrored; network-size deltas not folded yet: {pending})"
    );
    Ok(())
}
