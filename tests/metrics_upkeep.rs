//! The metrics recorder's upkeep keeps histogram samples from piling up between scrapes.
//! A binary of its own: it reads the process's resident memory, which tests running beside
//! it in one process would move.

use cutover::metrics::recorder;
use metrics::histogram;

/// Resident memory of this process, in bytes (Linux).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[test]
fn histogram_samples_do_not_pile_up_without_a_scrape() {
    let handle = recorder();
    let latency = histogram!("cutover_upkeep_test_seconds");
    let record = |n: usize| {
        for i in 0..n {
            latency.record(f64::from(u32::try_from(i % 1000).unwrap()) / 1e6);
        }
    };
    // Warm up (allocator, first buckets), then 2 million samples with the upkeep the
    // thread runs, here called between batches: memory stays where it was.
    record(200_000);
    handle.run_upkeep();
    let before = rss();
    for _ in 0..10 {
        record(200_000);
        handle.run_upkeep();
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 4 << 20,
        "2,000,000 samples with upkeep grew the process by {grown} bytes"
    );
    // Without upkeep samples are kept (8 bytes each at least): the test can tell the
    // difference. 4 million, so that even if the thread's upkeep (every 5 s) comes once
    // in the middle, well over 8 MB stay.
    let before = rss();
    record(4_000_000);
    let kept = rss().saturating_sub(before);
    handle.run_upkeep();
    assert!(
        kept > 8 << 20,
        "4,000,000 samples without upkeep grew the process by only {kept} bytes"
    );
}
