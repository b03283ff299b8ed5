//! `cutover backfill`: a generated legacy tree (with anomalies) into v2 — parents first, in
//! bulk, resumable after a kill, never overwriting a dual-written row — then `verify` agrees.

mod support;

use cutover::demo::fixture::{self, TreeSpec};

fn backfill(db: &support::TestDb, extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    support::cutover_on(db, "backfill", extra, env)
}

fn verify(db: &support::TestDb) -> (i32, String) {
    support::cutover_on(db, "verify", &[], &[])
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn anomalies_are_quarantined_with_their_reason_and_the_rest_verifies() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    let generated = fixture::load(
        &client,
        &TreeSpec {
            affiliates: 5000,
            seed: 5,
            orphans: 3,
            cycle_len: 3,
            drifted_counters: 4,
            shuffle_ids: false,
        },
    )
    .await
    .unwrap();

    let (code, out) = backfill(&db, &["--dry-run"], &[]);
    assert_eq!(code, 1, "anomalies found: {out}");
    assert!(out.contains("would copy"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM fature_v2.affiliates_optimized"
        )
        .await,
        0
    );

    let (code, out) = backfill(&db, &["--json"], &[]);
    assert_eq!(code, 1, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["counter_drift"], 4);
    let quarantined = summary["quarantined"].as_array().unwrap();
    let reason_of = |id: i64| {
        quarantined
            .iter()
            .find(|q| q["affiliate_id"] == id)
            .map(|q| q["reason"].as_str().unwrap().to_owned())
    };
    for (orphan, missing) in &generated.orphans {
        assert_eq!(
            reason_of(*orphan),
            Some(format!("orphan: its parent {missing} does not exist"))
        );
    }
    for member in &generated.cycle {
        assert!(reason_of(*member).unwrap().starts_with("cycle"), "{member}");
    }
    let in_v2 = count(
        &client,
        "SELECT count(*) FROM fature_v2.affiliates_optimized",
    )
    .await;
    assert_eq!(in_v2 + quarantined.len() as i64, 5000);
    assert_eq!(summary["copied"], in_v2);
    support::assert_integrity(&client, "after the backfill").await;

    let (code, out) = verify(&db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("quarantined"), "{out}");
}

#[tokio::test]
async fn a_backfill_killed_half_way_finishes_when_run_again() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(5000))
        .await
        .unwrap();

    // 10 batches of rows and 10 of the closure, loaded side by side: die early in both,
    // then again after the resumed run got further.
    for abort_after in ["4", "13"] {
        let (code, _) = backfill(
            &db,
            &["--batch", "500"],
            &[("CUTOVER_TEST_ABORT_AFTER_BATCHES", abort_after)],
        );
        assert_ne!(code, 0, "aborted after {abort_after} batches");
        let phase: String = client
            .query_one("SELECT phase FROM cutover.backfill_progress", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(phase, "done");
        // Killed while indexes, keys and triggers were set aside: verify says so.
        let (code, out) = verify(&db);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("backfill_set_aside") && out.contains("run cutover backfill again"),
            "{out}"
        );
        // The closure's foreign keys are aside from the start of the load.
        assert!(out.contains("closure_foreign_keys"), "{out}");
    }
    let (code, out) = backfill(&db, &["--batch", "500"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(resumed)"), "{out}");
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM fature_v2.affiliates_optimized"
        )
        .await,
        5000
    );
    support::assert_integrity(&client, "after the resumed backfill").await;
    let (code, out) = verify(&db);
    assert_eq!(code, 0, "{out}");
    // Everything set aside is back: v2's triggers work again (but the mirror's into legacy,
    // which only a query type at `target` enables: migration 0024).
    assert_eq!(
        count(&client, "SELECT count(*) FROM cutover.backfill_set_aside").await,
        0
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'fature_v2.affiliates_optimized'::regclass
             AND NOT tgisinternal AND tgenabled = 'D' AND tgname NOT LIKE 'cutover\\_mirror\\_%'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_row_dual_written_during_the_backfill_is_not_overwritten() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(2000))
        .await
        .unwrap();
    // As dual-write would: the application renamed root 7 through the proxy, both sides.
    client
        .batch_execute(
            "UPDATE public.affiliates SET name = 'Renamed Live' WHERE affiliate_id = 7;
             INSERT INTO fature_v2.affiliates_optimized (affiliate_id, external_id, name, registration_date)
             SELECT affiliate_id, external_id, name, registration_date FROM public.affiliates WHERE affiliate_id = 7;
             UPDATE fature_v2.affiliates_optimized v SET (email, status, total_deposits, total_bets, total_withdrawals,
                 total_cpa_earned, total_rev_earned, total_commissions_paid, created_at, updated_at) =
                 (l.email, l.status, l.total_deposits, l.total_bets, l.total_withdrawals, l.total_cpa_earned,
                  l.total_rev_earned, l.total_commissions_paid, l.created_at, l.updated_at)
             FROM public.affiliates l WHERE l.affiliate_id = v.affiliate_id",
        )
        .await
        .unwrap();
    let (code, out) = backfill(&db, &["--json"], &[]);
    assert_eq!(code, 0, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["already_present"], 1);
    let name: String = client
        .query_one(
            "SELECT name FROM fature_v2.affiliates_optimized WHERE affiliate_id = 7",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "Renamed Live");
    support::assert_integrity(
        &client,
        "after the backfill with a row dual-written meanwhile",
    )
    .await;
    assert_eq!(verify(&db).0, 0);
}

#[tokio::test]
async fn a_second_backfill_is_refused_while_one_runs() {
    let db = support::migrated_db().await;
    let holder = db.client().await;
    // What a running backfill holds.
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&i64::from_be_bytes(*b"backfill")],
        )
        .await
        .unwrap();
    let (code, out) = backfill(&db, &[], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("another `cutover backfill` is running"),
        "{out}"
    );
    // A dry run reads only: it goes ahead.
    let (code, out) = backfill(&db, &["--dry-run"], &[]);
    assert_eq!(code, 0, "{out}");
    drop(holder);
}

#[tokio::test]
async fn a_new_backfill_is_refused_while_v2_serves() {
    let db = support::tree_db(200).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO cutover.query_type_state (query_type, stage, percent) VALUES
                 ('affiliate_by_id', 'cutover', 30), ('set_status', 'shadow', 0)",
        )
        .await
        .unwrap();
    let (code, out) = backfill(&db, &[], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("v2 already serves affiliate_by_id (cutover)")
            && out.contains("cutover repair"),
        "{out}"
    );
    let phase: String = client
        .query_one("SELECT phase FROM cutover.backfill_progress", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(phase, "done", "the finished backfill is left as it was");
    // Stepped back to shadow, a new backfill runs.
    client
        .batch_execute("UPDATE cutover.query_type_state SET stage = 'shadow', percent = 0")
        .await
        .unwrap();
    let (code, out) = backfill(&db, &[], &[]);
    assert_eq!(code, 0, "{out}");
}

/// Long work is never silent (issue 20, item 5): outside a terminal, `backfill` and `verify`
/// print a line when each phase starts and one when it ends, with its count and rate (on a
/// terminal, a bar with the ETA); with `--json`, nothing but the document.
#[tokio::test]
async fn backfill_and_verify_say_each_phase_outside_a_terminal() {
    let db = support::migrated_db().await;
    cutover::demo::fixture::load(
        &db.client().await,
        &cutover::demo::fixture::TreeSpec::clean(300),
    )
    .await
    .unwrap();
    let (code, out) = support::cutover_on(&db, "backfill", &[], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("backfill: rows: 300 rows to do"), "{out}");
    assert!(out.contains("backfill: rows: done, 300 in "), "{out}");
    assert!(out.contains("backfill: closure: done"), "{out}");
    let (code, out) = support::cutover_on(&db, "verify", &[], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("verify: rows: ") && out.contains("keys to do"),
        "{out}"
    );
    assert!(out.contains("verify: rows: done, "), "{out}");
    assert!(out.contains("verify: integrity checks: done"), "{out}");
    let (code, out) = support::cutover_on(&db, "verify", &["--json"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("verify: rows"), "{out}");
}

/// Ids that do not follow the tree (issue 19: imported ids, about half of the children below
/// their parent): the same quarantine, an exact closure and counters, a clean verify.
#[tokio::test]
async fn a_tree_whose_ids_do_not_follow_its_shape_backfills_exactly() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    let generated = fixture::load(
        &client,
        &TreeSpec {
            affiliates: 5000,
            seed: 9,
            orphans: 3,
            cycle_len: 3,
            drifted_counters: 4,
            shuffle_ids: true,
        },
    )
    .await
    .unwrap();
    let below: i64 = count(
        &client,
        "SELECT count(*) FROM affiliates c JOIN affiliates p ON p.affiliate_id = c.parent_affiliate_id
         WHERE c.affiliate_id < p.affiliate_id",
    )
    .await;
    assert!(below > 1500, "{below} children below their parent");

    let (code, out) = backfill(&db, &["--json"], &[]);
    assert_eq!(code, 1, "anomalies: {out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let quarantined: Vec<i64> = summary["quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["affiliate_id"].as_i64().unwrap())
        .collect();
    for (orphan, _) in &generated.orphans {
        assert!(quarantined.contains(orphan), "{orphan}");
    }
    for member in &generated.cycle {
        assert!(quarantined.contains(member), "{member}");
    }
    support::assert_integrity(&client, "after the backfill").await;
    let (code, out) = verify(&db);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn a_closure_pair_without_its_affiliate_does_not_stop_the_backfill() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(1000))
        .await
        .unwrap();
    // A pair whose affiliates are in neither table (as a cascade set aside would leave one):
    // written past the closure's keys, as only a bypass of its triggers can.
    client
        .batch_execute(
            "SET session_replication_role = replica;
             INSERT INTO fature_v2.hierarchy_index (ancestor_id, descendant_id, level_distance)
             VALUES (999998, 999999, 1);
             RESET session_replication_role;",
        )
        .await
        .unwrap();
    let (code, out) = backfill(&db, &[], &[]);
    assert_eq!(code, 0, "{out}");
    // The keys' validation found it, and it went; the keys are back.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM fature_v2.hierarchy_index WHERE descendant_id = 999999"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_constraint
             WHERE conrelid = 'fature_v2.hierarchy_index'::regclass AND contype = 'f'"
        )
        .await,
        2
    );
    support::assert_integrity(&client, "after a backfill that found a dangling pair").await;
    assert_eq!(verify(&db).0, 0);
}
