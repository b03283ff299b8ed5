//! Write throughput with dual-write, measured side by side in one run: the application's
//! write transactions (../shared/workloads/fature_app.sql: a new affiliate with its parent's
//! counter bumped, a deposit, a status change) driven by pgbench against legacy alone
//! (directly, dual-write off) and through cutover with dual-write on — and the two halves of
//! the difference: the proxy alone (through cutover, off) and the mirror alone (directly,
//! on) — and what cutover's triggers cost while dual-write is off (legacy without them). A program, not a test: it prints what it measured and asserts nothing.
//!
//!     cargo bench --bench dual_write              # 100,000 affiliates, 10 s, 3 rounds
//!     cargo bench --bench dual_write -- 5 1       # 5 s, 1 round
//!
//! Each round runs the four set-ups back to back in a rotating order; the median of the
//! rounds is printed (one run on a small shared machine moves by ±10%).

use std::path::Path;

use cutover::{
    fixture::TreeSpec,
    localpg::{LocalPg, Options},
};

mod common;
use common::{median, pgbench_tps, start_cutover};

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

/// Transactions per second of the script (one pgbench transaction = the script once).
fn pgbench(bindir: &Path, script: &Path, port: u16, seconds: u64) -> f64 {
    let (seconds, script) = (seconds.to_string(), script.to_string_lossy());
    pgbench_tps(
        bindir,
        port,
        &[
            "-n", "-M", "prepared", "-c", CLIENTS, "-j", THREADS, "-T", &seconds, "-f", &script,
        ],
    )
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
    common::backfill(&client, &common::rules()).await?;
    // The benchmark's own session must not mirror its setup writes twice.
    client.batch_execute("RESET cutover.mirroring").await?;

    let dir = tempfile::tempdir()?;
    let script = dir.path().join("writes.sql");
    std::fs::write(&script, SCRIPT)?;
    let (_cutover, proxy_port) = start_cutover(pg.port());
    let bindir = pg.bindir().to_owned();

    let set_dual_write = |on: bool| {
        let client = &client;
        async move {
            client
                .execute(
                    "INSERT INTO cutover.query_type_state (query_type, stage) VALUES ('new_affiliate', $1)
                     ON CONFLICT (query_type) DO UPDATE SET stage = EXCLUDED.stage",
                    &[&if on { "shadow" } else { "legacy" }],
                )
                .await
        }
    };

    // (label, through the proxy, dual-write on); the last one without cutover's triggers at
    // all, as legacy was before `cutover migrate`.
    let setups = [
        ("legacy only, direct", false, false),
        ("dual-write, cutover", true, true),
        ("proxy only (no dual-write)", true, false),
        ("mirror only (direct, dual-write)", false, true),
        ("before cutover (no triggers), direct", false, false),
    ];
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        for i in 0..setups.len() {
            let at = (i + round) % setups.len();
            let (_, proxied, on) = setups[at];
            set_dual_write(on).await?;
            let bare = at == setups.len() - 1;
            if bare {
                client
                    .batch_execute("ALTER TABLE public.affiliates DISABLE TRIGGER USER")
                    .await?;
            }
            let port = if proxied { proxy_port } else { pg.port() };
            tps[at].push(pgbench(&bindir, &script, port, seconds));
            if bare {
                client
                    .batch_execute("ALTER TABLE public.affiliates ENABLE TRIGGER USER")
                    .await?;
            }
        }
    }
    let medians: Vec<f64> = tps.into_iter().map(median).collect();
    let drift: i64 = client
        .query_one(
            "SELECT count(*) FROM public.affiliates l
             FULL JOIN fature_v2.affiliates_optimized v USING (affiliate_id)
             WHERE l.affiliate_id IS NULL OR v.affiliate_id IS NULL",
            &[],
        )
        .await?
        .get(0);

    println!(
        "write transactions (new affiliate + parent bump; deposit; status), pgbench -M prepared, {CLIENTS} clients, {seconds} s each, median of {rounds} rounds, {AFFILIATES} affiliates; {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:<34} {:>9} {:>12}", "set-up", "tps", "vs legacy");
    for ((label, _, _), tps) in setups.iter().zip(&medians) {
        println!("{label:<34} {tps:>9.0} {:>12.2}", tps / medians[0]);
    }
    println!(
        "(keys on one side only after the runs with dual-write off: {drift}; expected, they were not mirrored)"
    );
    Ok(())
}
