//! Dual-write: every write on the legacy table lands in fature_v2 in the same transaction,
//! exactly, and the client sees what PostgreSQL alone would have shown it.
//!
//! Each test starts from a generated tree backfilled into v2 (so `cutover verify` is clean)
//! and turns dual-write on the way the control plane does: a query type in a stage that
//! dual-writes, in `cutover.query_type_state`.

mod support;

use std::{path::Path, process::Command};

use cutover::demo::fixture::{self, TreeSpec};
use support::{TestDb, cluster, cutover_on, metric, proxy, set_state, tree_db};
use tokio_postgres::{Client, error::SqlState};

/// Puts a query type in a stage (dual-write is on while any is in shadow, cutover or
/// target).
async fn set_stage(client: &Client, query_type: &str, stage: &str) {
    set_state(client, query_type, "stage", stage).await;
}

/// A backfilled tree of `affiliates` with dual-write on (`query_type` in shadow), and a
/// direct connection to it.
async fn dual_written(affiliates: u64, query_type: &str) -> (TestDb, Client) {
    let db = tree_db(affiliates).await;
    let admin = db.client().await;
    set_stage(&admin, query_type, "shadow").await;
    (db, admin)
}

async fn set_mode(client: &Client, query_type: &str, mode: &str) {
    set_state(client, query_type, "dual_write", mode).await;
}

fn verify(db: &TestDb) -> (i32, String) {
    cutover_on(db, "verify", &[], &[])
}

fn assert_verify_clean(db: &TestDb) {
    let (code, out) = verify(db);
    assert_eq!(code, 0, "verify found drift:\n{out}");
}

/// Pending entries of the repair queue: (key, SQLSTATE, query type).
async fn queue(client: &Client) -> Vec<(Option<i64>, String, Option<String>)> {
    client
        .query(
            "SELECT affiliate_id, sqlstate, query_type FROM cutover.write_divergences
             WHERE repaired_at IS NULL ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn psql_transcript(url: &str, script: &Path) -> String {
    let mut cmd = Command::new(cluster().bindir().join("psql"));
    cmd.args(["-X", "-a", "-f"])
        .arg(script)
        .arg(url)
        .env("PGCLIENTENCODING", "UTF8")
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run psql"))
        .await
        .unwrap();
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_is_mirrored_and_the_client_sees_what_postgres_says() {
    let p = proxy().await;
    let direct = tree_db(300).await;
    let (proxied, _) = dual_written(300, "new_affiliate").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dual_write/writes.sql");

    let expected = psql_transcript(&direct.url(), &script).await;
    let through = psql_transcript(&p.url(&proxied.name), &script).await;
    if let Ok(dir) = std::env::var("CUTOVER_TEST_SAVE") {
        std::fs::write(Path::new(&dir).join("dual_write_direct.txt"), &expected).unwrap();
        std::fs::write(Path::new(&dir).join("dual_write_proxied.txt"), &through).unwrap();
    }
    for needle in [
        "INSERT 0 3",
        "COPY 2",
        "UPDATE 2",
        "ERROR:  23505",
        "ERROR:  42703",
        "ERROR:  22012",
        "dw-tx-2",
        "done",
    ] {
        assert!(expected.contains(needle), "{needle:?} not in:\n{expected}");
    }
    // Rolled back work is in neither table.
    assert!(!expected.contains("| dw-tx-gone") && !expected.contains("| dw-rolled-back"));
    assert_eq!(through, expected, "the proxy changed what the client sees");

    // v2 holds what legacy holds, every mapped column, in one snapshot; nothing failed.
    assert_verify_clean(&proxied);
    let client = proxied.client().await;
    assert_eq!(queue(&client).await, vec![]);
    // The direct database, without dual-write, drifted.
    assert_eq!(verify(&direct).0, 1);

    let metrics = p.metrics().await;
    assert!(
        metric(&metrics, r#"cutover_dual_writes_total{outcome="mirrored"}"#) >= 10.0,
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"cutover_query_duration_seconds_count{query_type="record_deposit",side="target"}"#
        ),
        "{metrics}"
    );
    p.shutdown().await;
}

/// One statement on both databases: its rows (as text) or its error's code, message and
/// position.
type Outcome = Result<Vec<String>, (String, String, Option<String>)>;

async fn run(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Outcome {
    match client.query(sql, params).await {
        Ok(rows) => Ok(rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        r.try_get::<_, Option<i64>>(i)
                            .map(|v| format!("{v:?}"))
                            .or_else(|_| {
                                r.try_get::<_, Option<String>>(i).map(|v| format!("{v:?}"))
                            })
                            .unwrap_or_else(|_| "?".into())
                    })
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect()),
        Err(e) => {
            let db = e.as_db_error().expect("a server error");
            Err((
                db.code().code().to_owned(),
                db.message().to_owned(),
                db.position().map(|p| format!("{p:?}")),
            ))
        }
    }
}

/// The workload's writes in the extended protocol, as prepared statements executed again
/// and again (tokio-postgres prepares every statement).
async fn extended_workload(client: &Client) -> Vec<Outcome> {
    let mut out = Vec::new();
    for i in 0..20i64 {
        let parent = 1 + i % 7;
        out.push(
            run(
                client,
                "INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date)
                 VALUES ($1, $2, $3, $4, now())
                 RETURNING affiliate_id",
                &[&parent, &format!("ext-{i}"), &format!("Nome {i}"), &format!("e{i}@example.com")],
            )
            .await,
        );
        out.push(
            run(
                client,
                "UPDATE affiliates SET level_1_referrals = level_1_referrals + 1, updated_at = now()
                 WHERE affiliate_id = $1",
                &[&parent],
            )
            .await,
        );
        let amount = rust_decimal::Decimal::new(1050 + i, 2);
        out.push(
            run(
                client,
                "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now()
                 WHERE affiliate_id = $2",
                &[&amount, &(20 + i)],
            )
            .await,
        );
        let status = if i % 2 == 0 { "inactive" } else { "active" };
        out.push(
            run(
                client,
                "UPDATE affiliates SET status = $1, updated_at = now() WHERE affiliate_id = $2",
                &[&status, &(40 + i)],
            )
            .await,
        );
        out.push(
            run(
                client,
                "INSERT INTO affiliates (external_id, name, email, registration_date)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (external_id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, updated_at = now()",
                &[&format!("ext-{}", i / 2), &"Upserted", &None::<String>],
            )
            .await,
        );
    }
    // Moves of the rows inserted above (never under their own subtree) and deletes.
    let ids: Vec<i64> = client
        .query(
            "SELECT affiliate_id FROM affiliates WHERE external_id LIKE 'ext-%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (n, id) in ids.iter().enumerate() {
        let n = n as i64;
        if n % 3 == 0 {
            out.push(
                run(
                    client,
                    "UPDATE affiliates SET parent_affiliate_id = $1, updated_at = now() WHERE affiliate_id = $2",
                    &[&(100 + n), id],
                )
                .await,
            );
        } else if n % 5 == 0 {
            out.push(
                run(
                    client,
                    "DELETE FROM affiliates WHERE affiliate_id = $1",
                    &[id],
                )
                .await,
            );
        }
    }
    // An error with a position, in the extended protocol.
    out.push(
        run(
            client,
            "UPDATE affiliates SET nme = $1 WHERE affiliate_id = 1",
            &[&"x"],
        )
        .await,
    );
    out.push(
        run(
            client,
            "INSERT INTO affiliates (external_id, name, registration_date) VALUES ($1, 'dup', now())",
            &[&"ext-1"],
        )
        .await,
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_in_the_extended_protocol_are_mirrored() {
    let p = proxy().await;
    let direct = tree_db(300).await;
    let (proxied, _) = dual_written(300, "record_deposit").await;

    let expected = extended_workload(&direct.client().await).await;
    let through = extended_workload(&p.client(&proxied.name).await).await;
    assert!(expected.iter().filter(|o| o.is_ok()).count() > 100);
    assert!(matches!(expected.last(), Some(Err((code, _, _))) if code == "23505"));
    assert_eq!(through, expected);
    assert_verify_clean(&proxied);
    p.shutdown().await;
}

/// A trigger on v2 that fails for one key, as any v2 constraint or trigger could.
async fn inject_v2_failure(client: &Client, key: i64) {
    client
        .batch_execute(&format!(
            "CREATE FUNCTION public.injected_failure() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'injected v2 failure' USING ERRCODE = 'P0001'; END $$;
             CREATE TRIGGER injected_failure BEFORE UPDATE ON fature_v2.affiliates_optimized
                 FOR EACH ROW WHEN (NEW.affiliate_id = {key})
                 EXECUTE FUNCTION public.injected_failure();"
        ))
        .await
        .unwrap();
}

async fn deposits(client: &Client, key: i64) -> (String, String) {
    let row = client
        .query_one(
            "SELECT l.total_deposits::text, v.total_deposits::text
             FROM public.affiliates l JOIN fature_v2.affiliates_optimized v USING (affiliate_id)
             WHERE affiliate_id = $1",
            &[&key],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_failure_never_fails_the_app_is_recorded_and_repaired() {
    let p = proxy().await;
    let (db, admin) = dual_written(200, "record_deposit").await;
    admin
        .batch_execute("UPDATE affiliates SET total_deposits = 0 WHERE affiliate_id IN (42, 43)")
        .await
        .unwrap();
    inject_v2_failure(&admin, 42).await;

    let app = p.client(&db.name).await;
    app.batch_execute("BEGIN").await.unwrap();
    let n = app
        .execute(
            "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now() WHERE affiliate_id = $2",
            &[&rust_decimal::Decimal::new(500, 2), &42i64],
        )
        .await
        .expect("the app's write is untouched by v2's failure");
    assert_eq!(n, 1);
    // Other writes of the same transaction still mirror.
    app.execute(
        "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now() WHERE affiliate_id = $2",
        &[&rust_decimal::Decimal::new(700, 2), &43i64],
    )
    .await
    .unwrap();
    app.batch_execute("COMMIT")
        .await
        .expect("and so is its COMMIT");

    assert_eq!(deposits(&admin, 42).await, ("5.00".into(), "0.00".into()));
    assert_eq!(deposits(&admin, 43).await, ("7.00".into(), "7.00".into()));
    assert_eq!(
        queue(&admin).await,
        vec![(Some(42), "P0001".into(), Some("record_deposit".into()))]
    );
    // The statement's fingerprint is recorded with it (the rule's name says which statement
    // kind, the fingerprint which exact form).
    let fingerprint: Option<String> = admin
        .query_one("SELECT fingerprint FROM cutover.write_divergences", &[])
        .await
        .unwrap()
        .get(0);
    assert!(fingerprint.is_some_and(|f| f.starts_with("fp_")));
    let metrics = p.metrics().await;
    // (metrics are per process: other tests of this binary count too)
    assert!(
        metric(
            &metrics,
            r#"cutover_dual_writes_total{outcome="isolated_failure"}"#
        ) >= 1.0,
        "{metrics}"
    );
    let (code, out) = verify(&db);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("1 write divergences queued for repair"),
        "{out}"
    );

    // Repair brings the key back to legacy's truth and empties the queue.
    admin
        .batch_execute("DROP TRIGGER injected_failure ON fature_v2.affiliates_optimized")
        .await
        .unwrap();
    let (code, out) = cutover_on(&db, "repair", &[], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("dual-write queue: 1 resolved, 0 pending"),
        "{out}"
    );
    assert_eq!(deposits(&admin, 42).await, ("5.00".into(), "5.00".into()));
    assert_eq!(queue(&admin).await, vec![]);
    assert_verify_clean(&db);
    assert!(
        verify(&db)
            .1
            .contains("0 write divergences queued for repair")
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_v2_lacks_is_contained_before_commit() {
    // v2's parent key is deferred: the mirror checks it inside its own subtransaction, so the
    // app's COMMIT never meets it.
    let p = proxy().await;
    let (db, admin) = dual_written(100, "new_affiliate").await;
    let app = p.client(&db.name).await;
    app.batch_execute(
        "BEGIN;
         INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)
             VALUES (987654, 'orphan', 'Órfã', now());
         INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)
             VALUES (1, 'fine', 'Boa', now());
         COMMIT;",
    )
    .await
    .expect("the app's transaction commits");
    let pending = queue(&admin).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].1, SqlState::FOREIGN_KEY_VIOLATION.code());
    let in_v2: i64 = admin
        .query_one(
            "SELECT count(*) FROM fature_v2.affiliates_optimized WHERE external_id IN ('orphan', 'fine')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_v2, 1);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_fails_the_statement_with_the_v2_error() {
    let p = proxy().await;
    let (db, admin) = dual_written(100, "record_deposit").await;
    set_mode(&admin, "record_deposit", "strict").await;
    admin
        .batch_execute("UPDATE affiliates SET total_deposits = 0 WHERE affiliate_id = 42")
        .await
        .unwrap();
    inject_v2_failure(&admin, 42).await;

    let app = p.client(&db.name).await;
    let err = app
        .execute(
            "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now() WHERE affiliate_id = $2",
            &[&rust_decimal::Decimal::new(500, 2), &42i64],
        )
        .await
        .expect_err("strict: v2's error fails the statement");
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code(), &SqlState::RAISE_EXCEPTION);
    assert_eq!(db_err.message(), "injected v2 failure");
    assert_eq!(deposits(&admin, 42).await, ("0.00".into(), "0.00".into()));
    assert_eq!(queue(&admin).await, vec![]);
    // A query type that is not strict is still isolated.
    set_mode(&admin, "record_deposit", "isolated").await;
    app.execute(
        "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now() WHERE affiliate_id = $2",
        &[&rust_decimal::Decimal::new(500, 2), &42i64],
    )
    .await
    .unwrap();
    let metrics = p.metrics().await;
    assert!(
        metric(
            &metrics,
            r#"cutover_dual_writes_total{outcome="strict_failure"}"#
        ) >= 1.0
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_target_on_v2_is_written_first_and_legacy_mirrored() {
    // What the proxy sends from stage target on: the rewritten statements, on v2.
    let db = tree_db(300).await;
    let client = db.client().await;
    set_stage(&client, "new_affiliate", "target").await;
    client
        .batch_execute(
            "INSERT INTO fature_v2.affiliates_optimized (affiliate_id, parent_affiliate_id, external_id, name, email, registration_date, hierarchy_path, hierarchy_level)
                 VALUES (nextval('public.affiliates_affiliate_id_seq'), 3, 'v2-first', 'Primeiro', 'p@example.com', now(), '0', 1);
             UPDATE fature_v2.affiliates_optimized SET total_deposits = total_deposits + 12.34, updated_at = now() WHERE affiliate_id = 17;
             UPDATE fature_v2.affiliates_optimized SET status = 'banned' WHERE affiliate_id = 18;
             UPDATE fature_v2.affiliates_optimized SET parent_affiliate_id = 2 WHERE external_id = 'v2-first';",
        )
        .await
        .unwrap();
    // (one statement per call: BEGIN inside a multi-statement query would take in the
    // statements before it)
    for sql in [
        "BEGIN",
        "UPDATE fature_v2.affiliates_optimized SET total_bets = 1 WHERE affiliate_id = 19",
        "ROLLBACK",
        "DELETE FROM fature_v2.affiliates_optimized WHERE affiliate_id = 250",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let row = client
        .query_one(
            "SELECT parent_affiliate_id, name FROM public.affiliates WHERE external_id = 'v2-first'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, Option<i64>>(0), row.get::<_, String>(1)),
        (Some(2), "Primeiro".into())
    );
    // Legacy's counter is legacy's own, carried in v2 (the app's value, not v2's derived
    // count): a child v2 gained does not change it, so a way back finds what legacy had.
    let (legacy, carried, before): (i32, i32, i32) = {
        let r = client
            .query_one(
                "SELECT l.level_1_referrals, v.legacy_level_1_referrals,
                        (SELECT count(*)::int FROM public.affiliates c
                         WHERE c.parent_affiliate_id = 2 AND c.external_id <> 'v2-first')
                 FROM public.affiliates l
                 JOIN fature_v2.affiliates_optimized v USING (affiliate_id) WHERE affiliate_id = 2",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((legacy, carried), (before, before));
    assert_eq!(queue(&client).await, vec![]);
    assert_verify_clean(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_target_a_write_on_v2_is_drift_not_a_new_legacy_truth() {
    // Dual-write on (a type in shadow): legacy is the truth. A write made on v2 by anything
    // but cutover must not reach legacy; verify shows it.
    let db = tree_db(200).await;
    let client = db.client().await;
    set_stage(&client, "new_affiliate", "shadow").await;
    client
        .batch_execute(
            "UPDATE fature_v2.affiliates_optimized SET name = 'by hand' WHERE affiliate_id = 5",
        )
        .await
        .unwrap();
    let legacy: String = client
        .query_one(
            "SELECT name FROM public.affiliates WHERE affiliate_id = 5",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(legacy, "by hand");
    let (code, out) = verify(&db);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("name"), "{out}");
    // From target on, the same write is mirrored (v2 is the truth then).
    set_stage(&client, "new_affiliate", "target").await;
    client
        .batch_execute("UPDATE fature_v2.affiliates_optimized SET name = 'by hand, later' WHERE affiliate_id = 6")
        .await
        .unwrap();
    let legacy: String = client
        .query_one(
            "SELECT name FROM public.affiliates WHERE affiliate_id = 6",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(legacy, "by hand, later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_empties_v2_or_is_recorded() {
    let p = proxy().await;
    let (db, admin) = dual_written(100, "new_affiliate").await;
    let app = p.client(&db.name).await;
    app.batch_execute("TRUNCATE affiliates").await.unwrap();
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM fature_v2.affiliates_optimized)
                  + (SELECT count(*) FROM fature_v2.hierarchy_index)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert_verify_clean(&db);

    // v2 data that references the affiliates is never cascaded away: recorded instead.
    let (db, admin) = dual_written(100, "new_affiliate").await;
    admin
        .batch_execute(
            "INSERT INTO fature_v2.transactions (affiliate_id, transaction_type, amount, transaction_date)
             VALUES (5, 'deposit', 10, now())",
        )
        .await
        .unwrap();
    let app = p.client(&db.name).await;
    app.batch_execute("TRUNCATE affiliates").await.unwrap();
    let pending = queue(&admin).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].0, None);
    assert_eq!(pending[0].1, SqlState::FOREIGN_KEY_VIOLATION.code());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_bypass_the_proxy_are_mirrored_silently() {
    let db = tree_db(100).await;
    let client = db.client().await;
    set_stage(&client, "new_affiliate", "shadow").await;
    // No tag, no proxy: mirrored all the same, and no notice reaches this client.
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    let (direct, connection) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut connection = connection;
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(message)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notice(n) = message {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    direct
        .batch_execute("UPDATE affiliates SET name = 'direto' WHERE affiliate_id = 9")
        .await
        .unwrap();
    assert!(notices.try_recv().is_err());
    assert_verify_clean(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_mirrored_while_every_query_type_is_legacy() {
    let p = proxy().await;
    let db = tree_db(100).await;
    let app = p.client(&db.name).await;
    app.batch_execute("UPDATE affiliates SET name = 'só legado' WHERE affiliate_id = 9")
        .await
        .unwrap();
    let v2: String = db
        .client()
        .await
        .query_one(
            "SELECT name FROM fature_v2.affiliates_optimized WHERE affiliate_id = 9",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(v2, "só legado");
    p.shutdown().await;
}

/// Which of the mirror's triggers are enabled: (legacy's four, v2's three).
async fn mirror_triggers_enabled(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE tgrelid = 'public.affiliates'::regclass),
                    count(*) FILTER (WHERE tgrelid = 'fature_v2.affiliates_optimized'::regclass)
             FROM pg_trigger WHERE tgname LIKE 'cutover\\_mirror\\_%' AND tgenabled <> 'D'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// With every query type at `legacy` the mirror's triggers are disabled, so legacy's writes
/// pay nothing for them (issue 16); they follow every change of the live state, by any path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_triggers_follow_the_stages() {
    let db = tree_db(30).await;
    let admin = db.client().await;
    let no_state = mirror_triggers_enabled(&admin).await;
    assert_eq!(no_state, (0, 0), "no state yet");
    // (statement on the live state, legacy's four and v2's three enabled after it)
    let steps = [
        ("record_deposit legacy", (0, 0)),
        ("record_deposit shadow", (4, 0)),
        ("affiliate_by_id target", (4, 3)),
        ("record_deposit complete", (4, 3)),
        (
            "DELETE FROM cutover.query_type_state WHERE query_type = 'affiliate_by_id'",
            (0, 0),
        ),
        ("record_deposit cutover", (4, 0)),
    ];
    for (step, enabled) in steps {
        match step.split_once(' ') {
            Some((query_type, stage)) if !step.starts_with("DELETE") => {
                set_stage(&admin, query_type, stage).await
            }
            _ => admin.batch_execute(step).await.unwrap(),
        }
        assert_eq!(
            mirror_triggers_enabled(&admin).await,
            enabled,
            "after {step}"
        );
    }
    // A write now is mirrored; after TRUNCATE of the state, nothing is.
    admin
        .batch_execute("UPDATE affiliates SET name = 'espelhado' WHERE affiliate_id = 3")
        .await
        .unwrap();
    admin
        .batch_execute("TRUNCATE cutover.query_type_state")
        .await
        .unwrap();
    assert_eq!(mirror_triggers_enabled(&admin).await, (0, 0));
    admin
        .batch_execute("UPDATE affiliates SET name = 'só legado' WHERE affiliate_id = 4")
        .await
        .unwrap();
    let names: Vec<String> = admin
        .query(
            "SELECT name FROM fature_v2.affiliates_optimized WHERE affiliate_id IN (3, 4)
             ORDER BY affiliate_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names[0], "espelhado");
    assert_ne!(names[1], "só legado");

    // At REPEATABLE READ the state could be decided from a stale snapshot: refused.
    let err = admin
        .batch_execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ;
             UPDATE cutover.query_type_state SET stage = 'shadow';
             INSERT INTO cutover.query_type_state (query_type, stage) VALUES ('x', 'shadow')",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{err}");
    admin.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(mirror_triggers_enabled(&admin).await, (0, 0));
}

/// A database whose default isolation is REPEATABLE READ, where a change of the live state
/// is refused (it could decide from a stale snapshot): cutover's own changes ask for READ
/// COMMITTED, so the proxy still seeds the rules' stages and switches dual-write on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_are_seeded_whatever_the_database_default_isolation() {
    let db = tree_db(30).await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
            db.name
        ))
        .await
        .unwrap();
    let rules = support::rules_with(&[("record_deposit", "stage = \"shadow\"")], "");
    let p = support::proxy_on(&db, &rules, |_| {}).await;
    let fresh = db.client().await;
    assert_eq!(mirror_triggers_enabled(&fresh).await, (4, 0));
    // By hand at that default: refused, and nothing changed.
    let err = fresh
        .batch_execute("UPDATE cutover.query_type_state SET stage = 'legacy'")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{err}");
    assert_eq!(mirror_triggers_enabled(&fresh).await, (4, 0));
    p.shutdown().await;
}

/// Switching dual-write on takes a lock that waits for the application's open write
/// transactions, so none is half mirrored; a writer that stays open makes the stage change
/// give up after its attempts with 55P03 (the control plane's `Busy`), changing nothing, and
/// the same change goes through once the writer is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_waits_for_open_writers_or_changes_nothing() {
    use cutover::control::{self, Change, ChangeError, behaviour};
    use cutover::routing::rules::Stage;
    let db = tree_db(30).await;
    let writer = db.client().await;
    writer
        .batch_execute("BEGIN; UPDATE affiliates SET name = 'aberta' WHERE affiliate_id = 5")
        .await
        .unwrap();
    let mut operator = db.client().await;
    operator
        .batch_execute("SET cutover.switch_attempts = 3; SET cutover.switch_lock_timeout = '20ms'")
        .await
        .unwrap();
    let change = Change {
        query_type: "record_deposit".into(),
        stage: Stage::Shadow,
        reason: "test".into(),
        who: "test".into(),
        via: "sql",
        force: true,
        writes: true,
        declared: behaviour::Declared::default(),
    };
    let err = control::set_stage(&mut operator, &change)
        .await
        .unwrap_err();
    assert!(matches!(err, ChangeError::Busy(_)), "{err}");
    assert_eq!(err.failure(), control::Failure::Busy);
    assert_eq!(mirror_triggers_enabled(&operator).await, (0, 0));
    let states: i64 = operator
        .query_one("SELECT count(*) FROM cutover.query_type_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(states, 0, "the stage did not change");

    // With the default attempts, the change waits while the writer finishes.
    operator
        .batch_execute("RESET cutover.switch_attempts; RESET cutover.switch_lock_timeout")
        .await
        .unwrap();
    let finish = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        writer.batch_execute("COMMIT").await.unwrap();
    };
    let (changed, ()) = tokio::join!(control::set_stage(&mut operator, &change), finish);
    changed.unwrap();
    assert_eq!(mirror_triggers_enabled(&operator).await, (4, 0));
    // The writer's transaction committed wholly before the switch: not mirrored at all.
    let v2: String = operator
        .query_one(
            "SELECT name FROM fature_v2.affiliates_optimized WHERE affiliate_id = 5",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(v2, "aberta");
}

/// What one concurrent writer did.
#[derive(Debug, Default)]
struct Writes {
    committed: u64,
    rolled_back: u64,
    savepoints_rolled_back: u64,
    /// Errors the writer got (none expected: every statement is valid on legacy).
    errors: Vec<String>,
}

/// One of sixteen writers: the application's transactions — a new affiliate with its
/// parent's counter bumped, deposits (often on the few roots every path goes through),
/// status changes, subtree moves and deletes of its own affiliates — a share rolled back,
/// some work undone by a savepoint. Moves only hang a writer's own affiliate under an
/// affiliate that existed before the test, so no move can close a cycle on legacy (which
/// has no guard, and which v2 would refuse).
async fn writer(client: Client, id: u64, old_max: i64, transactions: usize) -> Writes {
    use rand::{RngExt, SeedableRng, rngs::ChaCha8Rng};
    let mut rng = ChaCha8Rng::seed_from_u64(id);
    let mut mine: Vec<i64> = Vec::new();
    let mut done = Writes::default();
    let insert = client
        .prepare(
            "INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date)
             VALUES ($1, $2, $3, $4, now()) RETURNING affiliate_id",
        )
        .await
        .unwrap();
    let bump = client
        .prepare(
            "UPDATE affiliates SET level_1_referrals = level_1_referrals + 1, updated_at = now()
             WHERE affiliate_id = $1",
        )
        .await
        .unwrap();
    let deposit = client
        .prepare(
            "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now()
             WHERE affiliate_id = $2",
        )
        .await
        .unwrap();
    let status = client
        .prepare("UPDATE affiliates SET status = $1, updated_at = now() WHERE affiliate_id = $2")
        .await
        .unwrap();
    let moving = client
        .prepare("UPDATE affiliates SET parent_affiliate_id = $1, updated_at = now() WHERE affiliate_id = $2")
        .await
        .unwrap();
    let delete = client
        .prepare("DELETE FROM affiliates WHERE affiliate_id = $1")
        .await
        .unwrap();

    for t in 0..transactions {
        let result: Result<Vec<i64>, tokio_postgres::Error> = async {
            client.batch_execute("BEGIN").await?;
            let mut created = Vec::new();
            let savepoint = rng.random_range(0..5) == 0;
            let steps = rng.random_range(1..4);
            let mut before_savepoint = 0;
            for step in 0..steps {
                if savepoint && step == steps - 1 {
                    client.batch_execute("SAVEPOINT sp").await?;
                    before_savepoint = created.len();
                }
                match rng.random_range(0..10) {
                    0..=2 => {
                        let parent = if !mine.is_empty() && rng.random_range(0..3) == 0 {
                            mine[rng.random_range(0..mine.len())]
                        } else {
                            rng.random_range(1..=old_max)
                        };
                        let external = format!("w{id}-{t}-{step}");
                        let row = client
                            .query_one(&insert, &[&parent, &external, &"Nova", &"n@example.com"])
                            .await?;
                        created.push(row.get::<_, i64>(0));
                        client.execute(&bump, &[&parent]).await?;
                    }
                    3..=5 => {
                        // A third of deposits go to the first ten affiliates, the roots
                        // and near-roots that every new affiliate's path locks on v2.
                        let who = if rng.random_range(0..3) == 0 {
                            rng.random_range(1..=10)
                        } else {
                            rng.random_range(1..=old_max)
                        };
                        let amount = rust_decimal::Decimal::new(rng.random_range(1..100_000), 2);
                        client.execute(&deposit, &[&amount, &who]).await?;
                    }
                    6 => {
                        let s = ["active", "inactive", "suspended"][rng.random_range(0..3)];
                        client
                            .execute(&status, &[&s, &rng.random_range(1..=old_max)])
                            .await?;
                    }
                    7 | 8 if !mine.is_empty() => {
                        let who = mine[rng.random_range(0..mine.len())];
                        client
                            .execute(&moving, &[&rng.random_range(1..=old_max), &who])
                            .await?;
                    }
                    _ if !mine.is_empty() => {
                        let who = mine.swap_remove(rng.random_range(0..mine.len()));
                        client.execute(&delete, &[&who]).await?;
                    }
                    _ => {}
                }
                if savepoint && step == steps - 1 {
                    if rng.random_range(0..2) == 0 {
                        client.batch_execute("ROLLBACK TO SAVEPOINT sp").await?;
                        done.savepoints_rolled_back += 1;
                        created.truncate(before_savepoint);
                    } else {
                        client.batch_execute("RELEASE SAVEPOINT sp").await?;
                    }
                }
            }
            Ok(created)
        }
        .await;
        match result {
            Ok(created) if rng.random_range(0..5) == 0 => {
                client.batch_execute("ROLLBACK").await.unwrap();
                done.rolled_back += 1;
                let _ = created;
            }
            Ok(created) => {
                client.batch_execute("COMMIT").await.unwrap();
                done.committed += 1;
                mine.extend(created);
            }
            Err(e) => {
                done.errors.push(e.as_db_error().map_or(e.to_string(), |d| {
                    format!("{}: {}", d.code().code(), d.message())
                }));
                client.batch_execute("ROLLBACK").await.unwrap();
            }
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_writers_leave_zero_drift() {
    let p = proxy().await;
    let (db, _) = dual_written(2000, "new_affiliate").await;
    let mut writers = Vec::new();
    for id in 0..16 {
        let client = p.client(&db.name).await;
        writers.push(tokio::spawn(writer(client, id, 2000, 60)));
    }
    let mut total = Writes::default();
    for w in writers {
        let w = w.await.unwrap();
        total.committed += w.committed;
        total.rolled_back += w.rolled_back;
        total.savepoints_rolled_back += w.savepoints_rolled_back;
        total.errors.extend(w.errors);
    }
    assert!(
        total.errors.is_empty(),
        "the proxy made writes fail: {:?}",
        total.errors
    );
    assert!(
        total.committed > 500 && total.rolled_back > 50 && total.savepoints_rolled_back > 20,
        "{total:?}"
    );
    let admin = db.client().await;
    assert_eq!(queue(&admin).await, vec![]);
    // Zero drift, and the seed's integrity checks green on v2 (verify runs both).
    assert_verify_clean(&db);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_writes_are_mirrored_and_see_what_postgres_says() {
    let p = proxy().await;
    let direct = tree_db(200).await;
    let (proxied, _) = dual_written(200, "record_deposit").await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dual_write/psycopg_writes.py");
    let transcript = |url: String| {
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg(url);
        async move {
            let out = tokio::task::spawn_blocking(move || cmd.output().expect("run python3"))
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "psycopg scenario failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        }
    };
    let expected = transcript(direct.url()).await;
    let through = transcript(format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        p.addr.port(),
        proxied.name
    ))
    .await;
    for needle in ["23505", "pipeline delete", "\"notices\", []"] {
        assert!(expected.contains(needle), "{needle:?} not in:\n{expected}");
    }
    assert_eq!(through, expected);
    assert_verify_clean(&proxied);
    assert_eq!(queue(&proxied.client().await).await, vec![]);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_alongside_eight_writers_ends_with_verify_clean() {
    let p = proxy().await;
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(20_000))
        .await
        .unwrap();
    // Dual-write on before the backfill: every write meanwhile is handed to the backfill.
    set_stage(&client, "new_affiliate", "shadow").await;
    let mut writers = Vec::new();
    for id in 0..8 {
        let app = p.client(&db.name).await;
        writers.push(tokio::spawn(writer(app, 100 + id, 20_000, 60)));
    }
    let same_db = TestDb {
        name: db.name.clone(),
    };
    let (code, out) = tokio::task::spawn_blocking(move || {
        cutover_on(&same_db, "backfill", &["--batch", "500", "--json"], &[])
    })
    .await
    .unwrap();
    let summary: serde_json::Value = serde_json::from_str(&out).expect("backfill --json");
    // Exit 1 only for anomalies, and the only ones are legacy's own: counters the writers
    // left drifted, and orphans (a writer deleted one of its affiliates that had children
    // before the plan was taken: legacy keeps them pointing at nothing).
    let quarantined = summary["quarantined"].as_array().unwrap();
    assert!(code == 0 || code == 1, "{out}");
    assert!(
        quarantined
            .iter()
            .all(|q| q["reason"].as_str().unwrap().contains("orphan")),
        "{out}"
    );
    let mut errors = Vec::new();
    for w in writers {
        errors.extend(w.await.unwrap().errors);
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        summary["caught_up"].as_i64().unwrap() > 0,
        "the writers did not overlap the backfill: {summary}"
    );
    assert_eq!(queue(&client).await, vec![]);
    // Nothing is both quarantined and in v2.
    let both: Vec<String> = client
        .query(
            "SELECT format('%s %s legacy parent %s, v2 parent %s', q.affiliate_id, q.reason,
                           l.parent_affiliate_id, v.parent_affiliate_id)
             FROM cutover.backfill_quarantine q
             JOIN fature_v2.affiliates_optimized v USING (affiliate_id)
             LEFT JOIN public.affiliates l USING (affiliate_id)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(both, Vec::<String>::new());
    assert_verify_clean(&db);
    p.shutdown().await;
}

/// 8 writers × 60 SERIALIZABLE transactions through the proxy; how many failed to serialize.
async fn serializable_failures(p: &support::Proxy, db: &TestDb) -> i64 {
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let client = p.client(&db.name).await;
        writers.push(tokio::spawn(async move {
            let mut failures = 0;
            for i in 0..60i64 {
                let key = 1 + (w * 211 + i * 17) % 2000;
                let result = async {
                    client
                        .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                        .await?;
                    client
                        .execute(
                            "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now() WHERE affiliate_id = $2",
                            &[&rust_decimal::Decimal::new(100, 2), &key],
                        )
                        .await?;
                    client.batch_execute("COMMIT").await
                }
                .await;
                if let Err(e) = result {
                    assert_eq!(e.code(), Some(&SqlState::T_R_SERIALIZATION_FAILURE), "{e}");
                    failures += 1;
                    client.batch_execute("ROLLBACK").await.unwrap();
                }
            }
            failures
        }));
    }
    let mut failures = 0;
    for w in writers {
        failures += w.await.unwrap();
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_writers_do_not_conflict_over_the_mirror() {
    // The mirror's bookkeeping must not make concurrent SERIALIZABLE committers look like
    // conflicts to each other (it did, when the queue was a shared table: 70% failures).
    // Measured against the same writers with dual-write off, in the same run: on 2,000 rows
    // some conflict on shared index pages anyway, more so on a loaded machine.
    let p = proxy().await;
    let baseline = serializable_failures(&p, &tree_db(2000).await).await;
    let (db, _) = dual_written(2000, "record_deposit").await;
    let mirrored = serializable_failures(&p, &db).await;
    // With the queue in a shared table, 70% failed. Now a loaded 2-core machine sees up to
    // ~10% more than without dual-write (why is not measured yet; see the notes); quiet,
    // about 1%. The bar catches a return of the shared-table kind of conflict.
    assert!(
        mirrored <= baseline + 72,
        "{mirrored} of 480 serializable transactions failed with dual-write on, {baseline} without"
    );
    assert_verify_clean(&db);
    p.shutdown().await;
}

/// Bytes the session's temporary relations take (the mirror's per-transaction queue lives
/// in the session's temporary schema).
async fn temp_bytes(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT coalesce(sum(pg_relation_size(c.oid)), 0)::int8 FROM pg_class c
             WHERE c.relnamespace = pg_my_temp_schema()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_queue_does_not_grow_with_the_connections_age() {
    // Temporary tables are never vacuumed: a queue emptied by DELETE kept every dead row of
    // every transaction the connection ever mirrored, and each COMMIT scanned them all (an
    // application's pooled connection lives for days: 1,400 deposits a second fell to 950
    // within 90 s).
    let (db, admin) = dual_written(200, "record_deposit").await;
    let writes = |from: i64, to: i64| {
        let admin = &admin;
        async move {
            for i in from..to {
                let key = 1 + i % 200;
                let deposit = "UPDATE affiliates SET total_deposits = total_deposits + 1, updated_at = now() WHERE affiliate_id = $1";
                match i % 10 {
                    // Rolled back: its queued keys are dead rows too.
                    0 => {
                        admin.batch_execute("BEGIN").await.unwrap();
                        admin.execute(deposit, &[&key]).await.unwrap();
                        admin.batch_execute("ROLLBACK").await.unwrap();
                    }
                    // A savepoint rolled back inside a committed transaction.
                    1 => {
                        admin.batch_execute("BEGIN").await.unwrap();
                        admin.execute(deposit, &[&key]).await.unwrap();
                        admin.batch_execute("SAVEPOINT s").await.unwrap();
                        admin.execute(deposit, &[&(key % 200 + 1)]).await.unwrap();
                        admin.batch_execute("ROLLBACK TO s; COMMIT").await.unwrap();
                    }
                    _ => {
                        admin.execute(deposit, &[&key]).await.unwrap();
                    }
                }
            }
        }
    };
    writes(0, 100).await;
    let young = temp_bytes(&admin).await;
    writes(100, 1600).await;
    let old = temp_bytes(&admin).await;
    assert!(
        old <= young.max(8192),
        "the mirror's queue grew from {young} to {old} bytes over 1,500 transactions"
    );
    assert_verify_clean(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_an_early_sync_are_mirrored_too() {
    // SET CONSTRAINTS ALL IMMEDIATE runs the deferred sync at once, mid-transaction (and,
    // from then on, at the end of each write statement): every write after it must still be
    // mirrored, in either mode, and nothing synced twice.
    let (db, admin) = dual_written(100, "record_deposit").await;
    admin
        .batch_execute(
            "BEGIN;
             UPDATE affiliates SET name = 'antes' WHERE affiliate_id = 11;
             SET CONSTRAINTS ALL IMMEDIATE;
             UPDATE affiliates SET name = 'depois 1' WHERE affiliate_id = 12;
             UPDATE affiliates SET name = 'depois 2' WHERE affiliate_id = 13;
             SAVEPOINT s;
             UPDATE affiliates SET name = 'desfeito' WHERE affiliate_id = 14;
             ROLLBACK TO s;
             UPDATE affiliates SET name = 'depois 3' WHERE affiliate_id = 15;
             SET CONSTRAINTS ALL DEFERRED;
             UPDATE affiliates SET name = 'adiado' WHERE affiliate_id = 16;
             COMMIT",
        )
        .await
        .unwrap();
    let names: Vec<String> = admin
        .query(
            "SELECT name FROM fature_v2.affiliates_optimized
             WHERE affiliate_id BETWEEN 11 AND 16 ORDER BY affiliate_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names[..3], ["antes", "depois 1", "depois 2"]);
    assert_eq!(names[4..], ["depois 3", "adiado"]);
    assert_verify_clean(&db);
}
