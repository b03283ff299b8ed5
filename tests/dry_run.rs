//! Every `--dry-run` (migrate, backfill, repair) leaves the database as it was: `pg_dump`
//! before and after are the same text, whatever state the database is in (fresh, half
//! backfilled, backfilled, drifted). A dry run after a finished backfill must not hand the
//! application's writes to a backfill that is not coming (issue 15, item 6).

mod support;

use std::process::Command;

use cutover::demo::fixture::{self, TreeSpec};
use support::{TestDb, cluster, cutover, cutover_on, legacy_db, migrated_db, tree_db};
use tokio_postgres::Client;

/// The whole database, schema and rows (sequences' positions included), as `pg_dump` prints it.
fn dump(db: &TestDb) -> String {
    let out = Command::new(cluster().bindir().join("pg_dump"))
        .args(["--no-owner", "-d", &db.url()])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("pg_dump prints UTF-8");
    // `\restrict KEY` lines carry a random key per dump.
    text.lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails with the first lines that differ.
fn assert_same(what: &str, before: &str, after: &str) {
    if before == after {
        return;
    }
    let changed: Vec<String> = before
        .lines()
        .zip(after.lines())
        .filter(|(b, a)| b != a)
        .take(10)
        .map(|(b, a)| format!("- {b}\n+ {a}"))
        .collect();
    panic!(
        "{what} changed the database ({} lines before, {} after):\n{}",
        before.lines().count(),
        after.lines().count(),
        changed.join("\n")
    );
}

/// Runs `cutover COMMAND --dry-run` and checks the dump did not move; returns its output.
fn dry_run(db: &TestDb, command: &str) -> (i32, String) {
    let before = dump(db);
    let (code, out) = if command == "migrate" {
        let (code, out, err) = cutover(&["migrate", "--dry-run", "--database-url", &db.url()], &[]);
        (code, format!("{out}{err}"))
    } else {
        cutover_on(db, command, &["--dry-run"], &[])
    };
    assert_same(&format!("{command} --dry-run"), &before, &dump(db));
    (code, out)
}

async fn phase(client: &Client) -> Option<String> {
    client
        .query_opt("SELECT phase FROM cutover.backfill_progress", &[])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test]
async fn migrate_dry_run_changes_nothing_before_or_after_migrating() {
    let db = legacy_db().await;
    let (code, out) = dry_run(&db, "migrate");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would apply"), "{out}");

    let db = migrated_db().await;
    let (code, out) = dry_run(&db, "migrate");
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn backfill_dry_run_changes_nothing_on_a_fresh_database_with_anomalies() {
    let db = migrated_db().await;
    let client = db.client().await;
    fixture::load(
        &client,
        &TreeSpec {
            affiliates: 2000,
            seed: 15,
            orphans: 2,
            cycle_len: 3,
            drifted_counters: 2,
            shuffle_ids: false,
        },
    )
    .await
    .unwrap();
    let (code, out) = dry_run(&db, "backfill");
    assert_eq!(code, 1, "anomalies are reported: {out}");
    assert!(
        out.contains("would copy") && out.contains("quarantined: "),
        "{out}"
    );
    assert!(
        out.contains("orphan"),
        "the dry run names the reasons: {out}"
    );
    assert_eq!(phase(&client).await, None, "no progress row was written");

    // The real run that follows plans from its own snapshot, not the dry run's.
    let (code, out) = cutover_on(&db, "backfill", &[], &[]);
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("(resumed)"), "{out}");
    assert_eq!(phase(&client).await.as_deref(), Some("done"));
}

#[tokio::test]
async fn backfill_dry_run_after_a_backfill_leaves_it_done_and_dual_write_syncing() {
    let db = tree_db(500).await;
    let client = db.client().await;
    // Dual-write on: a write query type in shadow.
    client
        .batch_execute(
            "INSERT INTO cutover.query_type_state (query_type, stage) VALUES ('set_status', 'shadow')
             ON CONFLICT (query_type) DO UPDATE SET stage = EXCLUDED.stage",
        )
        .await
        .unwrap();
    let (code, out) = dry_run(&db, "backfill");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would copy 0"), "{out}");
    assert_eq!(phase(&client).await.as_deref(), Some("done"));

    // A write after it is synced into v2 at once, not handed to a backfill.
    client
        .batch_execute("UPDATE public.affiliates SET status = 'banned' WHERE affiliate_id = 7")
        .await
        .unwrap();
    let v2: String = client
        .query_one(
            "SELECT status FROM fature_v2.affiliates_optimized WHERE affiliate_id = 7",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v2, "banned");
    let handed: i64 = client
        .query_one("SELECT count(*) FROM cutover.backfill_catchup", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(handed, 0);
}

#[tokio::test]
async fn backfill_dry_run_half_way_changes_nothing_and_the_run_resumes() {
    let db = migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(3000))
        .await
        .unwrap();
    let (code, _) = cutover_on(
        &db,
        "backfill",
        &["--batch", "500"],
        &[("CUTOVER_TEST_ABORT_AFTER_BATCHES", "3")],
    );
    assert_ne!(code, 0, "aborted");
    let (code, out) = dry_run(&db, "backfill");
    assert_eq!(code, 0, "{out}");
    assert_eq!(phase(&client).await.as_deref(), Some("rows"));
    let (code, out) = cutover_on(&db, "backfill", &["--batch", "500"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(resumed)"), "{out}");
}

#[tokio::test]
async fn repair_dry_run_changes_nothing() {
    let db = tree_db(500).await;
    let client = db.client().await;
    // Drift of every kind: a changed row, a missing one, an extra one.
    client
        .batch_execute(
            "SET cutover.mirroring = 'on';
             UPDATE fature_v2.affiliates_optimized SET name = 'drifted' WHERE affiliate_id = 3;
             DELETE FROM fature_v2.affiliates_optimized
                 WHERE affiliate_id = (SELECT max(affiliate_id) FROM fature_v2.affiliates_optimized);
             INSERT INTO fature_v2.affiliates_optimized (affiliate_id, external_id, name, registration_date)
             VALUES (9000, 'extra-9000', 'extra', now());",
        )
        .await
        .unwrap();
    let (code, out) = dry_run(&db, "repair");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would"), "{out}");
    let (code, out) = cutover_on(&db, "verify", &[], &[]);
    assert_eq!(code, 1, "the drift is still there: {out}");
}
