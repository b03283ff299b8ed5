//! What the shadow costs the application, measured side by side in one run: the customer's
//! hottest read (an affiliate by id, twice per transaction) at a fixed offered load
//! (pgbench --rate, prepared statements), with client latency percentiles from pgbench's
//! per-transaction log, in three set-ups:
//!
//! - directly against PostgreSQL;
//! - through cutover, the query type in `legacy` (the shadow idle);
//! - through cutover, in `shadow` with sampling at 100%: every read run again on both
//!   schemas by the shadow pool, compared, counted.
//!
//! and the share of comparisons the shadow dropped (queue full) at that load. A program,
//! not a test: it prints what it measured and asserts nothing.
//!
//!     cargo bench --bench shadow                 # 400 tx/s, 15 s, 2 rounds
//!     cargo bench --bench shadow -- 800 10 1     # rate, seconds, rounds

use std::{path::Path, process::Command};

use cutover::{
    demo::fixture::TreeSpec,
    demo::localpg::{LocalPg, Options},
};

mod common;
use common::{median, start_cutover_with};

const AFFILIATES: u64 = 100_000;
const CLIENTS: &str = "8";
const THREADS: &str = "2";

// Both by primary key: legacy has no index on parent_affiliate_id, so the app's other reads
// are sequential scans whose cost would hide the proxy's and the shadow's.
const SCRIPT: &str = r"
\set a random(1, 100000)
\set b random(1, 100000)
SELECT * FROM affiliates WHERE affiliate_id = :a;
SELECT * FROM affiliates WHERE affiliate_id = :b;
";

/// Per-transaction latencies (µs) of one pgbench run at `rate` transactions per second.
fn latencies(bindir: &Path, port: u16, script: &Path, rate: u64, seconds: u64) -> Vec<f64> {
    let logs = tempfile::tempdir().expect("a temporary directory");
    let prefix = logs.path().join("tx");
    let status = Command::new(bindir.join("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-n", "-M", "prepared", "-c", CLIENTS, "-j", THREADS])
        .args(["-R", &rate.to_string(), "-T", &seconds.to_string()])
        .arg("-f")
        .arg(script)
        .arg("-l")
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg("postgres")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run pgbench");
    assert!(status.success(), "pgbench failed");
    let mut all = Vec::new();
    for entry in std::fs::read_dir(logs.path()).expect("pgbench logs") {
        let text = std::fs::read_to_string(entry.expect("a log").path()).expect("a log");
        // client_id transaction_no time_us script_no epoch epoch_us [lag_us]
        all.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()),
        );
    }
    all.sort_by(f64::total_cmp);
    all
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rate = numbers.first().copied().unwrap_or(400);
    let seconds = numbers.get(1).copied().unwrap_or(15);
    let rounds = numbers.get(2).copied().unwrap_or(2).max(1) as usize;

    let pg = LocalPg::start_with(Options::default())?;
    let config = pg.config("postgres");
    let client = common::legacy_database(&config, &TreeSpec::clean(AFFILIATES)).await?;
    common::backfill(&client, &config, &common::rules()).await?;

    let dir = tempfile::tempdir()?;
    let script = dir.path().join("reads.sql");
    std::fs::write(&script, SCRIPT)?;
    let control = pg.url("postgres");
    let (_cutover, proxy_port) = start_cutover_with(pg.port(), &["--control", &control]);
    let bindir = pg.bindir().to_owned();

    let set_stage = |stage: &'static str| {
        let client = &client;
        async move {
            client
                .execute(
                    "UPDATE cutover.query_type_state SET stage = $1
                     WHERE query_type = 'affiliate_by_id'",
                    &[&stage],
                )
                .await?;
            // Every replica applies a change within a second.
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            anyhow::Ok(())
        }
    };
    let offered = || {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT coalesce(sum(matched + confirmed + expected + transient + nondeterministic + skipped + dropped), 0)::int8,
                            coalesce(sum(dropped), 0)::int8, coalesce(sum(confirmed), 0)::int8
                     FROM cutover.comparison_stats",
                    &[],
                )
                .await?;
            anyhow::Ok((
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, i64>(2),
            ))
        }
    };

    // (label, through the proxy, shadow on)
    let setups = [
        ("direct", false, false),
        ("cutover, shadow off", true, false),
        ("cutover, shadow 100%", true, true),
    ];
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let (mut compared, mut dropped, mut confirmed) = (0, 0, 0);
    for round in 0..rounds {
        for i in 0..setups.len() {
            let at = (i + round) % setups.len();
            let (_, proxied, shadow) = setups[at];
            set_stage(if shadow { "shadow" } else { "legacy" }).await?;
            let before = offered().await?;
            let port = if proxied { proxy_port } else { pg.port() };
            let l = latencies(&bindir, port, &script, rate, seconds);
            if shadow {
                // The last comparisons reach the store within a second or two.
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                let after = offered().await?;
                compared += after.0 - before.0;
                dropped += after.1 - before.1;
                confirmed += after.2 - before.2;
            }
            p50[at].push(percentile(&l, 0.50));
            p99[at].push(percentile(&l, 0.99));
        }
    }
    set_stage("legacy").await?;
    let p50: Vec<f64> = p50.into_iter().map(median).collect();
    let p99: Vec<f64> = p99.into_iter().map(median).collect();

    println!(
        "two reads per transaction (affiliate by id), pgbench -M prepared --rate {rate}, {CLIENTS} clients, {seconds} s each, median of {rounds} rounds, {AFFILIATES} affiliates; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<24} {:>10} {:>10} {:>12} {:>12}",
        "set-up", "p50 ms", "p99 ms", "p50 vs off", "p99 vs off"
    );
    for (i, (label, _, _)) in setups.iter().enumerate() {
        println!(
            "{label:<24} {:>10.3} {:>10.3} {:>12.2} {:>12.2}",
            p50[i] / 1000.0,
            p99[i] / 1000.0,
            p50[i] / p50[1],
            p99[i] / p99[1]
        );
    }
    println!(
        "shadow: {compared} comparisons offered, {dropped} dropped ({:.2}%), {confirmed} confirmed divergences",
        if compared > 0 {
            dropped as f64 * 100.0 / compared as f64
        } else {
            0.0
        }
    );
    Ok(())
}
