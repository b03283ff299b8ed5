//! One client's round trips through two or more builds of cutover side by side, interleaved
//! query by query with direct's and pgbouncer's (`common::latency`): whether a change to the
//! build or the code moves the time the proxy adds, on a machine whose noise moves it by
//! more from one run to the next. A program, not a test: it prints what it measured.
//!
//!     cp target/release/cutover /tmp/before     # then change something, build again
//!     cargo build --release && cp target/release/cutover /tmp/after
//!     cargo bench --bench builds -- /tmp/before /tmp/after [passes]
//!
//! Each build serves the app's `affiliate_by_id` (prepared, at `legacy`) on a tree of
//! 100,000 affiliates, with the repository's rules; each round prints the median of what a
//! round trip through it took beyond direct's in the same pass.

mod common;
use common::latency::{Target, interleaved};

const TREE: u64 = 100_000;
const ROUNDS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let passes: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(4000);
    let builds: Vec<&String> = args
        .iter()
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    if builds.is_empty() {
        println!("usage: cargo bench --bench builds -- BINARY [BINARY ...] [passes]");
        return;
    }
    let pg = common::local_pg(200);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(common::seeded_tree(&pg, TREE, &[]));
    let control = pg.url("tree_bench");
    let target = |label: &str, port: u16| Target {
        label: label.to_owned(),
        port,
        database: "tree_bench".to_owned(),
        sql: "SELECT * FROM affiliates WHERE affiliate_id = $1".to_owned(),
    };
    let mut targets = vec![target("direct", pg.port())];
    let mut proxies = Vec::new();
    for build in &builds {
        let (proxy, port) = common::start_cutover_binary::<&str>(
            std::path::Path::new(build.as_str()),
            pg.port(),
            &["--control", &control],
            &[],
        );
        proxies.push(proxy);
        targets.push(target(build, port));
    }
    let dir = tempfile::tempdir().unwrap();
    let bouncer = common::start_pgbouncer::<&str>(pg.port(), dir.path(), &[]);
    if let Some((_, port, _)) = &bouncer {
        targets.push(target("pgbouncer", *port));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    println!(
        "one client, affiliate_by_id prepared at legacy: µs a round trip adds beyond direct's (median of {passes} interleaved passes)"
    );
    for round in 0..ROUNDS {
        let trips = runtime.block_on(interleaved(&targets, TREE as i64, 500, passes));
        let added: Vec<String> = trips[1..]
            .iter()
            .map(|t| format!("{} {:+.1}", t.label, t.added_us(&trips[0])))
            .collect();
        println!(
            "round {round}: {}   (direct's median {:.1} µs)",
            added.join("  "),
            trips[0].quantile_us(0.5)
        );
    }
    drop(proxies);
}
