//! Classification and rewriting cost per statement, for every example statement of
//! rules/fature.toml: the pre-check alone (statements that do not name the table), a cached
//! classification (the same SQL text again), and an uncached one (parse, fingerprint, rule
//! lookup, rewrite or bind). A program: it prints what it measured and asserts nothing.
//!
//!     cargo bench --bench classify

use std::{hint::black_box, path::PathBuf, sync::Arc, time::Instant};

use cutover::{routing::classify::Classifier, routing::rules::RuleSet};

fn per_call(iterations: u32, mut f: impl FnMut(u32)) -> f64 {
    let started = Instant::now();
    for i in 0..iterations {
        f(i);
    }
    started.elapsed().as_secs_f64() / f64::from(iterations)
}

fn main() {
    let rules = RuleSet::load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules"))
        .expect("rules/ is valid");
    let classifier = Classifier::new(Arc::new(rules.clone()));

    let passthrough = "SELECT now(), current_user, version()";
    let t = per_call(1_000_000, |_| {
        black_box(classifier.classify(black_box(passthrough)));
    });
    println!(
        "passthrough (pre-check only): {:.0} ns per statement",
        t * 1e9
    );

    // The bucket of a key at `cutover N%`: a SHA-256 of the key's text (the CPU's SHA
    // instructions where it has them; valgrind hides them, so the instructions bench counts
    // the software path).
    let keys: Vec<String> = (0..1_000).map(|i| (i * 7919).to_string()).collect();
    let t = per_call(1_000_000, |i| {
        black_box(cutover::routing::route::bucket(black_box(
            keys[i as usize % keys.len()].as_bytes(),
        )));
    });
    println!("bucket of a key (SHA-256): {:.0} ns", t * 1e9);

    println!("{:<26} {:>12} {:>14}", "query type", "cached", "uncached");
    let (mut worst_cached, mut worst_uncached) = (0f64, 0f64);
    for qt in &rules.query_types {
        let Some(sql) = &qt.example_sql else { continue };
        classifier.classify(sql);
        let cached = per_call(200_000, |_| {
            black_box(classifier.classify(black_box(sql)));
        });
        // A distinct text each time (a comment the parser drops) defeats the cache.
        let texts: Vec<String> = (0..2_000).map(|i| format!("{sql} /* {i} */")).collect();
        let uncached = per_call(2_000, |i| {
            black_box(classifier.classify(&texts[i as usize]));
        });
        worst_cached = worst_cached.max(cached);
        worst_uncached = worst_uncached.max(uncached);
        println!(
            "{:<26} {:>9.2} µs {:>11.1} µs",
            qt.name,
            cached * 1e6,
            uncached * 1e6
        );
    }
    println!(
        "worst: cached {:.2} µs (aim < 2), uncached {:.1} µs (aim < 100)",
        worst_cached * 1e6,
        worst_uncached * 1e6
    );
}
