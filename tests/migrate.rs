//! `cutover migrate` against a real PostgreSQL: what it creates, that it is idempotent,
//! that applied migrations are immutable, and the errors an operator can meet.

mod support;

use cutover::{
    demo::localpg::{LocalPg, Options},
    migrate::{self, MigrateError, MigrationSet},
};
use support::{cutover, empty_db, legacy_db, migrated_db};

/// Every object of the customer's plan (days 1, 2 and 4) plus what dual-write needs; without
/// the plan's indexes that no read needs (migration 0018: docs/seed-sql-changes.md).
const EXPECTED: &[(&str, &str)] = &[
    ("table", "fature_v2.affiliates_optimized"),
    ("table", "fature_v2.hierarchy_index"),
    ("table", "fature_v2.detached_affiliates"),
    ("table", "fature_v2.transactions"),
    ("table", "fature_v2.commissions"),
    ("table", "fature_v2.query_performance_log"),
    ("table", "fature_v2.performance_cache"),
    ("table", "cutover.schema_migrations"),
    ("view", "fature_v2.real_time_metrics"),
    ("sequence", "fature_v2.commission_batch_seq"),
    ("index", "fature_v2.idx_affiliates_parent"),
    ("index", "fature_v2.idx_affiliates_status"),
    ("index", "fature_v2.idx_affiliates_registration"),
    ("index", "fature_v2.idx_hierarchy_path_gist"),
    ("index", "fature_v2.idx_hierarchy_path_btree"),
    ("index", "fature_v2.idx_ancestor_level"),
    ("index", "fature_v2.idx_hierarchy_descendant"),
    ("table", "fature_v2.network_size_deltas"),
    ("view", "fature_v2.affiliate_network_sizes"),
    ("function", "fature_v2.fold_network_sizes"),
    ("function", "fature_v2.network_size"),
    ("index", "fature_v2.idx_performance_lookup"),
    ("index", "fature_v2.idx_transactions_affiliate"),
    ("index", "fature_v2.idx_transactions_processing"),
    ("index", "fature_v2.idx_transactions_type"),
    ("index", "fature_v2.idx_commissions_beneficiary"),
    ("index", "fature_v2.idx_commissions_transaction"),
    ("index", "fature_v2.idx_commissions_processing"),
    ("index", "fature_v2.idx_commissions_payment"),
    ("index", "fature_v2.idx_perf_log_type_time"),
    ("index", "fature_v2.idx_perf_log_duration"),
    ("index", "fature_v2.idx_cache_expiration"),
    ("index", "fature_v2.idx_cache_hits"),
    ("function", "fature_v2.build_hierarchy_index"),
    ("function", "fature_v2.child_position"),
    ("function", "fature_v2.refuse_cycle"),
    ("function", "fature_v2.update_hierarchy_on_insert"),
    ("function", "fature_v2.update_referral_counters"),
    ("function", "fature_v2.check_hierarchy_on_update"),
    ("function", "fature_v2.move_subtree"),
    ("function", "fature_v2.record_detached_children"),
    ("function", "fature_v2.release_deleted_affiliate"),
    ("function", "fature_v2.pay_commissions"),
    ("function", "fature_v2.calculate_commissions_auto"),
    ("function", "fature_v2.calculate_commissions_on_insert"),
    ("function", "fature_v2.check_system_health"),
    ("trigger", "trg_update_hierarchy_insert"),
    ("trigger", "trg_update_referral_counters"),
    ("trigger", "trg_check_hierarchy_update"),
    ("trigger", "trg_move_subtree"),
    ("trigger", "trg_record_detached_children"),
    ("trigger", "trg_release_deleted_affiliate"),
    ("trigger", "trg_calculate_commissions_auto"),
    ("trigger", "trg_calculate_commissions_insert"),
    ("extension", "ltree"),
];

async fn exists(client: &tokio_postgres::Client, kind: &str, name: &str) -> bool {
    let sql = match kind {
        "table" | "view" | "sequence" | "index" => "SELECT to_regclass($1) IS NOT NULL",
        "function" => "SELECT to_regproc($1) IS NOT NULL",
        "trigger" => "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $1)",
        "extension" => "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = $1)",
        other => panic!("unknown kind {other}"),
    };
    client.query_one(sql, &[&name]).await.unwrap().get(0)
}

#[tokio::test]
async fn migrate_creates_every_object_then_does_nothing() {
    let db = legacy_db().await;
    let client = db.client().await;
    for (kind, name) in EXPECTED {
        assert!(!exists(&client, kind, name).await || *kind == "extension");
    }

    let (code, out, err) = cutover(&["migrate", "--database-url", &db.url()], &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let files = MigrationSet::embedded().iter().count();
    assert!(
        out.contains(&format!("applied {files} migrations")),
        "{out}"
    );

    for (kind, name) in EXPECTED {
        assert!(exists(&client, kind, name).await, "{kind} {name} missing");
    }
    let recorded: i64 = client
        .query_one("SELECT count(*) FROM cutover.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded as usize, files);

    // Second run: nothing to do, nothing recorded twice; DATABASE_URL works as well.
    let (code, out, _) = cutover(&["migrate"], &[("DATABASE_URL", &db.url())]);
    assert_eq!(code, 0);
    assert!(out.contains("up to date"), "{out}");
    let again: i64 = client
        .query_one("SELECT count(*) FROM cutover.schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, recorded);

    // The functions work from a session whose search_path does not name fature_v2.
    let health = client
        .query("SELECT * FROM fature_v2.check_system_health()", &[])
        .await
        .unwrap();
    assert!(health.is_empty());
    let metrics = client
        .query_one(
            "SELECT total_affiliates FROM fature_v2.real_time_metrics",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(metrics.get::<_, i64>(0), 0);
}

#[tokio::test]
async fn dry_run_lists_and_changes_nothing() {
    let db = legacy_db().await;
    let (code, out, err) = cutover(&["migrate", "--dry-run", "--database-url", &db.url()], &[]);
    assert_eq!(code, 0, "{err}");
    let first = MigrationSet::embedded().iter().next().unwrap().name.clone();
    assert!(out.contains(&format!("would apply {first}")), "{out}");
    let client = db.client().await;
    assert!(!exists(&client, "table", "fature_v2.affiliates_optimized").await);
    assert!(!exists(&client, "table", "cutover.schema_migrations").await);
}

fn copy_migrations(dir: &std::path::Path) {
    for m in MigrationSet::embedded().iter() {
        std::fs::write(dir.join(&m.name), &m.sql).unwrap();
    }
}

#[tokio::test]
async fn a_changed_applied_migration_is_refused() {
    let db = migrated_db().await;
    let dir = tempfile::tempdir().unwrap();
    copy_migrations(dir.path());
    let dir_arg = dir.path().to_str().unwrap();

    // Unchanged copies are the same migrations: nothing to do.
    let (code, out, _) = cutover(
        &[
            "migrate",
            "--database-url",
            &db.url(),
            "--migrations-dir",
            dir_arg,
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.contains("up to date"));

    let second = MigrationSet::embedded().iter().nth(1).unwrap().name.clone();
    let path = dir.path().join(&second);
    let edited = std::fs::read_to_string(&path).unwrap() + "\n-- an edit after the fact\n";
    std::fs::write(&path, edited).unwrap();
    std::fs::write(
        dir.path().join("9000_new.sql"),
        "CREATE TABLE public.should_not_exist ();",
    )
    .unwrap();

    let (code, _, err) = cutover(
        &[
            "migrate",
            "--database-url",
            &db.url(),
            "--migrations-dir",
            dir_arg,
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains(&second) && err.contains("immutable"), "{err}");
    let client = db.client().await;
    assert!(!exists(&client, "table", "public.should_not_exist").await);

    // A database that records a migration the files lack is refused too.
    std::fs::remove_file(&path).unwrap();
    let (code, _, err) = cutover(
        &[
            "migrate",
            "--database-url",
            &db.url(),
            "--migrations-dir",
            dir_arg,
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("does not have"), "{err}");
}

#[tokio::test]
async fn a_failing_migration_leaves_nothing_and_says_where() {
    let db = migrated_db().await;
    let dir = tempfile::tempdir().unwrap();
    copy_migrations(dir.path());
    std::fs::write(
        dir.path().join("9000_broken.sql"),
        "CREATE TABLE public.half_done (id int);\n\nSELEC 1;\n",
    )
    .unwrap();
    let (code, _, err) = cutover(
        &[
            "migrate",
            "--database-url",
            &db.url(),
            "--migrations-dir",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("9000_broken.sql") && err.contains("line 3, column 1"),
        "{err}"
    );
    assert!(err.contains("42601"), "{err}");
    let client = db.client().await;
    assert!(!exists(&client, "table", "public.half_done").await);
}

#[tokio::test]
async fn concurrent_runs_apply_once() {
    let db = legacy_db().await;
    let config = db.config();
    let set = MigrationSet::embedded();
    let (a, b) = tokio::join!(
        migrate::run(&config, &set, false),
        migrate::run(&config, &set, false)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.applied.len() + b.applied.len(), set.iter().count());
}

#[test]
fn bad_url_is_one_line_and_hides_the_password() {
    let (code, _, err) = cutover(
        &[
            "migrate",
            "--database-url",
            "postgres://u:s3cret@host:notaport/db",
        ],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("invalid database URL"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn unreachable_server_says_what_to_check() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://someone:s3cret@127.0.0.1:{port}/db");
    let (code, _, err) = cutover(&["migrate", "--database-url", &url], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot reach PostgreSQL") && err.contains("is running"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn missing_url_is_explained_by_clap() {
    let (code, _, err) = cutover(&["migrate"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("--database-url"), "{err}");
}

#[test]
fn help_explains_migrate() {
    let (code, out, _) = cutover(&["migrate", "--help"], &[]);
    assert_eq!(code, 0);
    for needle in [
        "--database-url",
        "DATABASE_URL",
        "--dry-run",
        "--migrations-dir",
        "checksum",
    ] {
        assert!(out.contains(needle), "{needle} not in:\n{out}");
    }
}

/// `cutover migrate` as a new login role `role` (`grants` run for it first): it must stop
/// before anything runs, exit 2, with one line; that line.
async fn refused_as(db: &support::TestDb, role: &str, grants: &str) -> String {
    let owner = db.client().await;
    owner
        .batch_execute(&format!("CREATE ROLE {role} LOGIN; {grants}"))
        .await
        .unwrap();
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        support::cluster().port(),
        db.name
    );
    let (code, _, err) = cutover(&["migrate", "--database-url", &url], &[]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!exists(&owner, "table", "fature_v2.affiliates_optimized").await);
    err
}

#[tokio::test]
async fn insufficient_privileges_are_named_before_anything_runs() {
    let db = empty_db().await;
    let role = format!("plain_{}", db.name);
    let err = refused_as(&db, &role, "").await;
    assert!(
        err.contains(&format!("role {role} lacks a privilege")) && err.contains("GRANT CREATE"),
        "{err}"
    );
}

/// Dual-write switches the legacy table's triggers with the stages (migration 0024), which
/// only its owner may do: a role that may create schemas but does not own the table is told
/// so before anything runs.
#[tokio::test]
async fn a_role_that_does_not_own_the_table_is_told_before_anything_runs() {
    let db = legacy_db().await;
    let role = format!("notowner_{}", db.name);
    let grants = format!("GRANT CREATE ON DATABASE {} TO {role}", db.name);
    let err = refused_as(&db, &role, &grants).await;
    assert!(
        err.contains(&format!("role {role} does not own public.affiliates")),
        "{err}"
    );
}

#[tokio::test]
async fn missing_ltree_is_named_before_anything_runs() {
    let install = support::install_without_extension("ltree");
    let pg = LocalPg::start_with(Options {
        bindir: Some(install.bindir.clone()),
        ..Options::default()
    })
    .expect("start a cluster without ltree");
    let result = migrate::run(&pg.config("postgres"), &MigrationSet::embedded(), false).await;
    assert!(
        matches!(result, Err(MigrateError::LtreeMissing)),
        "{result:?}"
    );
    // A dry run says the same, not "would apply N migrations" (issue 20, item 6).
    let result = migrate::run(&pg.config("postgres"), &MigrationSet::embedded(), true).await;
    assert!(
        matches!(result, Err(MigrateError::LtreeMissing)),
        "{result:?}"
    );

    let (code, _, err) = cutover(&["migrate", "--database-url", &pg.url("postgres")], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("ltree extension is not available") && err.contains("contrib"),
        "{err}"
    );
    let client = cutover::net::connect::connect(&pg.config("postgres"))
        .await
        .unwrap();
    assert!(!exists(&client, "table", "fature_v2.affiliates_optimized").await);
}

/// A command run before `cutover migrate`, or on a database without the legacy table, says
/// what to do, not only which relation is missing (issue 20, item 6).
#[tokio::test]
async fn commands_before_migrate_say_to_migrate_first() {
    let db = support::legacy_db().await;
    for command in ["verify", "backfill", "repair"] {
        let (code, out) = support::cutover_on(&db, command, &[], &[]);
        assert_ne!(code, 0, "{command}: {out}");
        assert!(out.contains("run `cutover migrate"), "{command}: {out}");
    }
    let empty = support::empty_db().await;
    let (code, out) = support::cutover_on(&empty, "verify", &[], &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("run `cutover migrate") || out.contains("no legacy table"),
        "{out}"
    );
}

/// `migrate` gives the rules' query types their rows in `cutover.query_type_state`, so that
/// the runbook's SQL fallback (`UPDATE cutover.query_type_state …`) works before any proxy
/// ran (issue 20, item 6).
#[tokio::test]
async fn migrate_seeds_the_query_types_state() {
    let db = support::legacy_db().await;
    let (code, out) = support::cutover_on(&db, "migrate", &[], &[]);
    assert_eq!(code, 0, "{out}");
    let client = db.client().await;
    let updated = client
        .execute(
            "UPDATE cutover.query_type_state SET stage = 'shadow', updated_at = now() WHERE query_type = 'new_affiliate'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(updated, 1, "{out}");
}
