//! `cutover verify` on a generated tree copied into v2: clean is OK; every kind of drift is
//! found, named by key and column, in any chunk size; legacy's drifted counters and the
//! children of a deleted affiliate are not drift.

mod support;

use cutover::demo::fixture::{self, TreeSpec};

async fn copied_tree(spec: TreeSpec) -> (support::TestDb, tokio_postgres::Client) {
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &spec).await.unwrap();
    support::copy_legacy_into_target(&client).await;
    (db, client)
}

fn verify(db: &support::TestDb, extra: &[&str]) -> (i32, String) {
    support::cutover_on(db, "verify", extra, &[])
}

#[tokio::test]
async fn a_faithful_copy_verifies_and_legacy_counter_drift_is_only_reported() {
    let (db, _client) = copied_tree(TreeSpec {
        drifted_counters: 5,
        ..TreeSpec::clean(3000)
    })
    .await;
    let (code, out) = verify(&db, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("result: OK"), "{out}");
    assert!(
        out.contains("level_1_referrals: 5 legacy values differ"),
        "{out}"
    );
    assert!(out.contains("level-5 query"), "{out}");

    let (code, out) = verify(&db, &["--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["legacy_rows"], 3000);
    assert!(json["checks"].as_array().unwrap().len() >= 15);
}

#[tokio::test]
async fn every_kind_of_drift_is_found_by_key_and_column_in_any_chunk_size() {
    let (db, client) = copied_tree(TreeSpec::clean(3000)).await;
    client
        .batch_execute(
            "UPDATE fature_v2.affiliates_optimized SET name = 'changed behind the proxy' WHERE affiliate_id = 1234;
             UPDATE fature_v2.affiliates_optimized SET total_deposits = total_deposits + 0.01 WHERE affiliate_id = 2345;
             DELETE FROM fature_v2.affiliates_optimized WHERE affiliate_id = 2999;
             INSERT INTO fature_v2.affiliates_optimized (affiliate_id, external_id, name, registration_date)
                 VALUES (777777, 'only-in-v2', 'x', now())",
        )
        .await
        .unwrap();
    for chunk in ["50000", "100", "7"] {
        let (code, out) = verify(&db, &["--chunk", chunk, "--json"]);
        assert_eq!(code, 1, "{out}");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            json["missing"]["sample_keys"],
            serde_json::json!([2999]),
            "chunk {chunk}"
        );
        assert_eq!(json["extra"]["sample_keys"], serde_json::json!([777777]));
        assert_eq!(
            json["different"]["sample_keys"],
            serde_json::json!([1234, 2345])
        );
        let columns: Vec<String> = json["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c[0].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(columns, ["name", "total_deposits"]);
    }
    let (_, out) = verify(&db, &[]);
    assert!(out.contains("result: DRIFT OR FAILED CHECKS"), "{out}");
    assert!(out.contains("row_counts") && out.contains("FAIL"), "{out}");
}

#[tokio::test]
async fn children_of_a_deleted_affiliate_are_not_drift() {
    let (db, client) = copied_tree(TreeSpec::clean(2000)).await;
    // A parent with children, deleted on both sides: legacy keeps the dangling ids, v2
    // makes the children roots and records them.
    let parent: i64 = client
        .query_one(
            "SELECT parent_affiliate_id FROM public.affiliates WHERE parent_affiliate_id > 200
             GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "DELETE FROM public.affiliates WHERE affiliate_id = $1",
            &[&parent],
        )
        .await
        .unwrap();
    client
        .execute(
            "DELETE FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1",
            &[&parent],
        )
        .await
        .unwrap();
    let (code, out) = verify(&db, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("detached"), "{out}");
}
