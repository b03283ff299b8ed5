//! Real clients whose reads are served by the target see exactly what legacy gives them: the
//! customer's reads through psql, pgbench, psycopg, asyncpg, node-postgres and JDBC, once
//! directly on legacy and once through a proxy serving them from fature_v2 (by id at
//! `target`, the tree reads at `cutover 50%`), the two transcripts compared.

mod support;

use std::{path::Path, process::Command};

use support::{Proxy, TestDb, cluster, metric};

async fn setup() -> (TestDb, Proxy, tempfile::TempDir) {
    let db = support::tree_db(300).await;
    let rules = support::rules_with(
        &[
            ("affiliate_by_id", "stage = \"target\""),
            ("direct_referrals", "stage = \"cutover\"\npercent = 50"),
            ("network_size", "stage = \"target\""),
            ("count_active", "stage = \"cutover\"\npercent = 50"),
        ],
        "",
    );
    let proxy = support::proxy_on(&db, &rules, |_| {}).await;
    (db, proxy, rules)
}

/// Runs a program off the runtime's threads (the proxy under test runs on them).
async fn run(mut cmd: Command) -> String {
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run a client program"))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cmd = "client"
    );
    stdout
}

fn clients() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// The program's transcript directly and through the proxy must be equal, and the proxy must
/// have served some of it from the target.
async fn same_through_target(
    proxy: &Proxy,
    db: &TestDb,
    program: &str,
    args: &[&str],
    url: fn(u16, &str) -> String,
    counter: &str,
) {
    let before = metric(&proxy.metrics().await, counter);
    let transcript = |port| {
        let mut cmd = Command::new(program);
        cmd.args(args).arg(url(port, &db.name));
        run(cmd)
    };
    let direct = transcript(cluster().port()).await;
    let through = transcript(proxy.addr.port()).await;
    assert!(direct.lines().count() >= 20, "{direct}");
    assert_eq!(through, direct, "{program} saw a difference");
    let served = metric(&proxy.metrics().await, counter) - before;
    assert!(
        served > 0.0,
        "{program}: nothing served by the target ({counter})"
    );
}

fn pg_url(port: u16, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

const BY_ID_TARGET: &str =
    "cutover_queries_total{query_type=\"affiliate_by_id\",served_by=\"target\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_served_by_the_target_see_what_legacy_gives() {
    let (db, proxy, _rules) = setup().await;
    let dir = clients().join("routed");
    let psycopg = dir.join("psycopg_reads.py");
    same_through_target(
        &proxy,
        &db,
        "python3",
        &[psycopg.to_str().unwrap()],
        pg_url,
        BY_ID_TARGET,
    )
    .await;
    let asyncpg = dir.join("asyncpg_reads.py");
    same_through_target(
        &proxy,
        &db,
        "python3",
        &[asyncpg.to_str().unwrap()],
        pg_url,
        BY_ID_TARGET,
    )
    .await;
    let node = clients().join("node/reads.js");
    same_through_target(
        &proxy,
        &db,
        "node",
        &[node.to_str().unwrap()],
        pg_url,
        BY_ID_TARGET,
    )
    .await;
    let jdbc = dir.join("JdbcReads.java");
    same_through_target(
        &proxy,
        &db,
        "java",
        &[
            "-cp",
            "/usr/share/java/postgresql.jar",
            jdbc.to_str().unwrap(),
        ],
        |port, db| format!("jdbc:postgresql://127.0.0.1:{port}/{db}"),
        BY_ID_TARGET,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_served_by_the_target() {
    let (db, proxy, _rules) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("reads.sql");
    let mut sql = String::new();
    for id in 1..=30 {
        sql.push_str(&format!(
            "SELECT * FROM affiliates WHERE affiliate_id = {id};\n"
        ));
        sql.push_str(&format!(
            "SELECT affiliate_id, name, registration_date FROM affiliates WHERE parent_affiliate_id = {id} ORDER BY registration_date, affiliate_id;\n"
        ));
    }
    sql.push_str("SELECT COUNT(*) FROM affiliates WHERE status = 'active';\n");
    std::fs::write(&script, &sql).unwrap();
    // A read is served by the target once its route check is in; reads do not wait for it
    // (only writes do). psql's 30 reads take a few milliseconds, less than the check can on a
    // loaded machine: the check of their fingerprint is made first.
    let client = proxy.client(&db.name).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(&proxy.metrics().await, BY_ID_TARGET) == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the route check of affiliate_by_id never came in"
        );
        client
            .simple_query("SELECT * FROM affiliates WHERE affiliate_id = 1")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let psql = cluster().bindir().join("psql");
    let script_arg = script.to_str().unwrap().to_owned();
    let args = ["-X", "-a", "-f", script_arg.as_str()];
    same_through_target(
        &proxy,
        &db,
        psql.to_str().unwrap(),
        &args,
        pg_url,
        BY_ID_TARGET,
    )
    .await;

    let bench = dir.path().join("bench.sql");
    std::fs::write(
        &bench,
        "\\set id random(1, 300)\n\
         SELECT * FROM affiliates WHERE affiliate_id = :id;\n\
         SELECT affiliate_id, name, registration_date FROM affiliates WHERE parent_affiliate_id = :id ORDER BY registration_date, affiliate_id;\n",
    )
    .unwrap();
    for mode in ["simple", "extended", "prepared"] {
        let before = metric(&proxy.metrics().await, BY_ID_TARGET);
        let mut cmd = Command::new(cluster().bindir().join("pgbench"));
        cmd.args(["-n", "-M", mode, "-c", "4", "-t", "100", "-f"])
            .arg(&bench)
            .args(["-h", "127.0.0.1", "-p", &proxy.addr.port().to_string()])
            .args(["-U", "postgres", &db.name]);
        let out = run(cmd).await;
        assert!(
            out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
        let served = metric(&proxy.metrics().await, BY_ID_TARGET) - before;
        assert!(
            served > 0.0,
            "pgbench -M {mode}: nothing served by the target"
        );
    }
}
