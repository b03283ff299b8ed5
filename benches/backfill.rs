//! How long a backfill and a verify take: a generated legacy tree of N affiliates (default
//! 1,000,000, with a few orphans, a cycle and drifted counters) into a freshly migrated
//! private PostgreSQL. A program: it prints what it measured and asserts nothing.
//!
//!     cargo bench --bench backfill              # 1,000,000 affiliates
//!     cargo bench --bench backfill -- 200000

use std::time::Instant;

use cutover::{
    connect,
    fixture::{self, TreeSpec},
    localpg::{LocalPg, Options},
    migrate::{self, backfill, verify},
    rules::RuleSet,
};

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
    let config = pg.config("postgres");
    let client = connect::connect(&config).await?;
    fixture::create_legacy_table(&client).await?;
    migrate::run(&config, &migrate::MigrationSet::embedded(), false).await?;
    let spec = TreeSpec {
        orphans: 10,
        cycle_len: 3,
        drifted_counters: 100,
        ..TreeSpec::clean(affiliates)
    };
    fixture::load(&client, &spec).await?;
    let rules = RuleSet::load_dir(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rules"
    )))?;

    let started = Instant::now();
    let summary = backfill::run(
        &client,
        &rules.table,
        &backfill::Options {
            batch: backfill::DEFAULT_BATCH,
            dry_run: false,
            progress: false,
            abort_after_batches: None,
        },
    )
    .await?;
    let backfill_s = started.elapsed().as_secs_f64();
    println!(
        "phases: {}",
        summary
            .phases
            .iter()
            .map(|(name, s)| format!("{name} {s:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "backfill: {} affiliates ({} copied, {} quarantined, {} closure rows) in {backfill_s:.1} s = {:.0} rows/s",
        summary.legacy_rows,
        summary.copied,
        summary.quarantined.len(),
        summary.closure_rows,
        summary.legacy_rows as f64 / backfill_s
    );
    let started = Instant::now();
    let report = verify::verify(&client, &rules.table, verify::DEFAULT_CHUNK).await?;
    println!(
        "verify: {} in {:.1} s ({})",
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
    Ok(())
}
