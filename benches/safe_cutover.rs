//! The safe-cutover model (tests/safe_cutover.rs, tests/model/) as a long run: random
//! transactions in random mixes of stages, directly and through cutover, every answer and both
//! tables compared, until `--transactions` have run. A program, not a test: it prints how many
//! transactions and cases it ran and how long they took; on a difference it prints the
//! shortest case that shows it (proptest's shrinking) and exits 1.
//!
//!     cargo bench --bench safe_cutover -- --transactions 20000 --seed 7
//!
//! The same `--seed` gives the same cases.

#[path = "../tests/drivers/mod.rs"]
mod drivers;
// The test's lock checks use parts of the model this program does not.
#[allow(dead_code, unused_imports)]
#[path = "../tests/model/mod.rs"]
mod model;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};

/// Cases per round of the runner (the count is checked between rounds).
const ROUND: u32 = 10;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
        })
        .unwrap_or(default)
}

fn main() {
    let want = arg("--transactions", 2000);
    let seed = arg("--seed", 0);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: ROUND,
        max_shrink_iters: 500,
        failure_persistence: None,
        ..Config::default()
    };
    // A runner counts the cases it ran: each round gets its own, its randomness drawn from
    // this one (deterministic from the seed).
    let mut seeds = TestRunner::new_with_rng(
        config.clone(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let started = Instant::now();
    let mut cases = 0u64;
    while model::transactions_run() < want {
        let before = model::transactions_run();
        let mut runner = TestRunner::new_with_rng(config.clone(), seeds.new_rng());
        let outcome = runner.run(&model::case(), |phases| {
            model::runtime()
                .block_on(model::check_case(&phases))
                .map_err(proptest::test_runner::TestCaseError::fail)
        });
        match outcome {
            Ok(()) => cases += u64::from(ROUND),
            Err(TestError::Fail(reason, minimal)) => {
                eprintln!(
                    "DIFFERENCE after {} transactions: {reason}",
                    model::transactions_run()
                );
                eprintln!("shortest case (seed {seed}):\n{minimal:#?}");
                std::process::exit(1);
            }
            Err(TestError::Abort(reason)) => {
                eprintln!("aborted: {reason}");
                std::process::exit(2);
            }
        }
        assert!(
            model::transactions_run() > before,
            "a round of {ROUND} cases ran no transaction"
        );
        eprintln!(
            "{} transactions in {cases} cases, {:.0} s",
            model::transactions_run(),
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "safe cutover model: {} transactions ({cases} cases, seed {seed}), every answer and both tables as legacy alone gives them; {:.0} s",
        model::transactions_run(),
        started.elapsed().as_secs_f64()
    );
}
