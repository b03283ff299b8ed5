//! How long a backfill and a verify take: a generated legacy tree of N affiliates (default
//! 1,000,000, with a few orphans, a cycle and drifted counters) into a freshly migrated
//! private PostgreSQL, in both shapes of ids: independent of the tree (`cutover fixture
//! --shuffle-ids`, as imported ids are) and in tree order. A program: it prints what it
//! measured and asserts nothing.
//!
//!     cargo bench --bench backfill              # 1,000,000 affiliates
//!     cargo bench --bench backfill -- 200000
//!
//! Then, in the same run, 100,000 affiliates backfilled by the seed's own method (its batch
//! function through v2's per-row triggers) and by ours, and the ratio.

use std::time::Instant;

use cutover::{
    demo::fixture::TreeSpec,
    demo::localpg::{LocalPg, Options},
    migrate::verify,
    net::connect,
    routing::rules::RuleSet,
};

mod common;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let affiliates: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    // A server sized like a small production one (measured: the time is the same with the
    // test cluster's 128 MB of shared buffers — it goes to per-row work, not I/O).
    let pg = LocalPg::start_with(Options {
        settings: vec![
            ("shared_buffers".into(), "1GB".into()),
            ("maintenance_work_mem".into(), "256MB".into()),
            ("max_wal_size".into(), "4GB".into()),
        ],
        ..Options::default()
    })?;
    let rules = common::rules();
    let admin = connect::connect(&pg.config("postgres")).await?;
    // Both shapes, the harder first: ids assigned independently of the tree (as imported ids
    // are: about half of the children below their parent), then every parent's id below its
    // children's (the generator's natural order).
    for (database, label, shuffle_ids) in [
        ("shuffled_ids", "ids independent of the tree", true),
        ("ordered_ids", "ids in tree order", false),
    ] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await?;
        let spec = TreeSpec {
            orphans: 10,
            cycle_len: 3,
            drifted_counters: 100,
            shuffle_ids,
            ..TreeSpec::clean(affiliates)
        };
        let client = common::legacy_database(&pg.config(database), &spec).await?;
        println!("{label}:");
        let started = Instant::now();
        let summary = common::backfill(&client, &pg.config(database), &rules).await?;
        let backfill_s = started.elapsed().as_secs_f64();
        println!(
            "  phases: {}",
            summary
                .phases
                .iter()
                .map(|(name, s)| format!("{name} {s:.1} s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  backfill: {} affiliates ({} copied, {} quarantined, {} closure rows) in {backfill_s:.1} s = {:.0} rows/s",
            summary.legacy_rows,
            summary.copied,
            summary.quarantined.len(),
            summary.closure_rows,
            summary.legacy_rows as f64 / backfill_s
        );
        let started = Instant::now();
        let report = verify::verify(&client, &rules.table, verify::DEFAULT_CHUNK).await?;
        println!(
            "  verify: {} in {:.1} s ({})",
            if report.ok {
                "OK"
            } else {
                "drift or failed checks"
            },
            started.elapsed().as_secs_f64(),
            report
                .performance
                .iter()
                .map(|p| format!("{} {:.2} ms", p.name, p.millis))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    seed_method_ratio(&pg, &rules, COMPARISON_AFFILIATES).await
}

/// Affiliates of the side-by-side comparison with the seed's own method.
const COMPARISON_AFFILIATES: u64 = 100_000;

/// The seed's `migrate_affiliates_batch` (plan, day 3), made to run, against ours, on the
/// same clean tree in two fresh databases of the same server. The seed's function commits
/// inside a function, which PostgreSQL refuses: the same loop runs here from the client, one
/// transaction per batch of 5,000 ids, each row through v2's per-row triggers (path, closure
/// rows, counters of every ancestor), as the plan meant. It needs a clean tree: ids in
/// parent-before-child order, no orphan, no cycle (the generator's clean trees are).
async fn seed_method_ratio(pg: &LocalPg, rules: &RuleSet, affiliates: u64) -> anyhow::Result<()> {
    let admin = connect::connect(&pg.config("postgres")).await?;
    let mut seconds = Vec::new();
    for name in ["seed_method", "cutover_backfill"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let client =
            common::legacy_database(&pg.config(name), &TreeSpec::clean(affiliates)).await?;
        let started = Instant::now();
        if name == "seed_method" {
            let max: i64 = client
                .query_one("SELECT max(affiliate_id) FROM public.affiliates", &[])
                .await?
                .get(0);
            let batch = client
                .prepare(
                    "INSERT INTO fature_v2.affiliates_optimized (
                         affiliate_id, parent_affiliate_id, external_id, name, status,
                         registration_date, total_deposits, total_bets, total_withdrawals,
                         total_cpa_earned, total_rev_earned, total_commissions_paid, created_at,
                         hierarchy_path, hierarchy_level)
                     SELECT a.affiliate_id, a.parent_affiliate_id, a.external_id, a.name, a.status,
                            a.registration_date, COALESCE(a.total_deposits, 0), COALESCE(a.total_bets, 0),
                            COALESCE(a.total_withdrawals, 0), COALESCE(a.total_cpa_earned, 0),
                            COALESCE(a.total_rev_earned, 0), COALESCE(a.total_commissions_paid, 0),
                            a.created_at, a.affiliate_id::text::ltree, 1
                     FROM public.affiliates a
                     WHERE a.affiliate_id > $1 AND a.affiliate_id <= $1 + 5000
                     ORDER BY a.affiliate_id",
                )
                .await?;
            let mut start = 0i64;
            while start < max {
                client.execute(&batch, &[&start]).await?;
                start += 5000;
            }
        } else {
            common::backfill(&client, &pg.config(name), rules).await?;
        }
        seconds.push(started.elapsed().as_secs_f64());
        let report = verify::verify(&client, &rules.table, verify::DEFAULT_CHUNK).await?;
        let verdict = if report.ok {
            "verify OK".to_owned()
        } else {
            let failed: Vec<String> = report
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| c.name.clone())
                .chain(
                    report
                        .columns
                        .iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(c, n)| format!("{c} differs in {n} rows")),
                )
                .collect();
            format!("verify: {}", failed.join(", "))
        };
        println!(
            "{affiliates} affiliates, {name}: {:.1} s = {:.0} rows/s; {verdict}",
            seconds[seconds.len() - 1],
            affiliates as f64 / seconds[seconds.len() - 1],
        );
    }
    println!(
        "the seed's method takes {:.1}x as long as cutover backfill",
        seconds[0] / seconds[1]
    );
    Ok(())
}
