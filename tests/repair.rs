//! `cutover repair`: every kind of drift brought back to the legacy truth, in one
//! transaction; `--dry-run` changes nothing; `verify` agrees afterwards.

mod support;

use cutover::{
    demo::fixture::{self, TreeSpec},
    migrate::integrity,
};

fn run(db: &support::TestDb, command: &str, extra: &[&str]) -> (i32, String) {
    support::cutover_on(db, command, extra, &[])
}

#[tokio::test]
async fn drift_of_every_kind_is_repaired() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(3000))
        .await
        .unwrap();
    support::copy_legacy_into_target(&client).await;
    assert_eq!(run(&db, "verify", &[]).0, 0);

    // Behind the proxy's back: a rename, a lost leaf, a stray row, a moved subtree, a
    // corrupted counter; and a deleted parent whose children were detached, then restored.
    client
        .batch_execute(
            "UPDATE fature_v2.affiliates_optimized SET name = 'tampered' WHERE affiliate_id = 1234;
             DELETE FROM fature_v2.affiliates_optimized WHERE affiliate_id = 3000;
             INSERT INTO fature_v2.affiliates_optimized (affiliate_id, external_id, name, registration_date)
                 VALUES (777777, 'stray', 'x', now());
             UPDATE fature_v2.affiliates_optimized SET parent_affiliate_id = 1 WHERE affiliate_id = 2500;
             UPDATE fature_v2.affiliates_optimized SET direct_referrals_count = 99 WHERE affiliate_id = 5;
             UPDATE fature_v2.hierarchy_index SET level_distance = level_distance + 1
                 WHERE (ancestor_id, descendant_id) = (SELECT ancestor_id, descendant_id
                     FROM fature_v2.hierarchy_index ORDER BY ancestor_id, descendant_id LIMIT 1);
             DELETE FROM fature_v2.hierarchy_index WHERE descendant_id = 1500 AND level_distance = 1;",
        )
        .await
        .unwrap();
    let parent: i64 = client
        .query_one(
            "SELECT parent_affiliate_id FROM public.affiliates WHERE parent_affiliate_id > 300
             GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "DELETE FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1",
            &[&parent],
        )
        .await
        .unwrap();
    let (code, out) = run(&db, "verify", &[]);
    assert_eq!(code, 1, "{out}");

    let (code, out) = run(&db, "repair", &["--dry-run", "--json"]);
    assert_eq!(code, 0, "{out}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["deleted"], serde_json::json!([777777]));
    assert_eq!(run(&db, "verify", &[]).0, 1, "a dry run changes nothing");

    let (code, out) = run(&db, "repair", &["--json"]);
    assert_eq!(code, 0, "{out}");
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    let inserted: Vec<i64> = serde_json::from_value(done["inserted"].clone()).unwrap();
    assert!(
        inserted.contains(&3000) && inserted.contains(&parent),
        "{out}"
    );
    let updated: Vec<i64> = serde_json::from_value(done["updated"].clone()).unwrap();
    assert!(updated.contains(&1234) && updated.contains(&2500), "{out}");
    assert!(done["closure_removed"].as_u64().unwrap() >= 1, "{out}");
    assert!(done["closure_added"].as_u64().unwrap() >= 2, "{out}");

    // Idempotent: a second repair finds nothing to do.
    let (code, out) = run(&db, "repair", &["--json"]);
    assert_eq!(code, 0, "{out}");
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    for field in ["inserted", "deleted", "updated"] {
        assert_eq!(again[field], serde_json::json!([]), "{field}: {out}");
    }
    assert_eq!(again["closure_removed"], 0);
    assert_eq!(again["closure_added"], 0);
    assert_eq!(again["counters_fixed"], 0);

    let (code, out) = run(&db, "verify", &[]);
    assert_eq!(code, 0, "{out}");
    let failed: Vec<_> = integrity::run(&client)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| !r.passed())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
