//! How fast the legacy fixture loads: generates a seed-shaped tree of N affiliates
//! (default 1,000,000; `cargo bench --bench fixture_load -- 200000` for another size)
//! into a private PostgreSQL and prints the time and rate. A program, not a test: it
//! measures and prints, it asserts nothing.

use std::time::Instant;

use cutover::{
    demo::fixture::{self, TreeSpec},
    demo::localpg::LocalPg,
    net::connect,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let affiliates: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let pg = LocalPg::start()?;
    let client = connect::connect(&pg.config("postgres")).await?;
    fixture::create_legacy_table(&client).await?;

    let spec = TreeSpec {
        orphans: 10,
        cycle_len: 3,
        drifted_counters: 100,
        ..TreeSpec::clean(affiliates)
    };
    let started = Instant::now();
    let generated = fixture::load(&client, &spec).await?;
    let took = started.elapsed();
    println!(
        "fixture_load: {} affiliates ({} roots, {} orphans, cycle of {}, {} drifted counters) in {:.2} s = {:.0} rows/s",
        generated.rows,
        generated.roots,
        generated.orphans.len(),
        generated.cycle.len(),
        generated.drifted.len(),
        took.as_secs_f64(),
        generated.rows as f64 / took.as_secs_f64()
    );
    Ok(())
}
