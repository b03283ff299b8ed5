//! The legacy fixture against a real PostgreSQL: the generated tree lands as specified,
//! anomalies included, and the id sequence continues after it.

mod support;

use cutover::demo::fixture::{self, TreeSpec};

#[tokio::test]
async fn generated_tree_lands_with_its_anomalies() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    let spec = TreeSpec {
        affiliates: 5000,
        seed: 9,
        orphans: 3,
        cycle_len: 3,
        drifted_counters: 4,
        shuffle_ids: false,
    };
    let generated = fixture::load(&client, &spec).await.unwrap();
    let one = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };

    assert_eq!(one("SELECT count(*) FROM public.affiliates").await, 5000);
    assert_eq!(
        one("SELECT count(*) FROM public.affiliates WHERE parent_affiliate_id IS NULL").await,
        500
    );
    let orphans = one(
        "SELECT count(*) FROM public.affiliates a WHERE parent_affiliate_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM public.affiliates p WHERE p.affiliate_id = a.parent_affiliate_id)",
    )
    .await;
    assert_eq!(orphans as usize, generated.orphans.len());
    assert_eq!(orphans, 3);

    // Rows that never reach a root by following parents: the cycle's members (and their
    // subtrees) — the orphans' subtrees stop at a missing parent instead.
    let on_cycle = one("WITH RECURSIVE walk(start, at, steps) AS (
             SELECT affiliate_id, parent_affiliate_id, 1 FROM public.affiliates
             UNION ALL
             SELECT w.start, a.parent_affiliate_id, w.steps + 1
             FROM walk w JOIN public.affiliates a ON a.affiliate_id = w.at
             WHERE w.steps < 50 AND w.at <> w.start
         )
         SELECT count(DISTINCT start) FROM walk WHERE at = start")
    .await;
    assert_eq!(on_cycle, 3);

    let drifted = one("SELECT count(*) FROM public.affiliates a
         WHERE a.level_1_referrals <> (SELECT count(*) FROM public.affiliates c
                                       WHERE c.parent_affiliate_id = a.affiliate_id)")
    .await;
    assert_eq!(drifted, 4);

    // Children register after their parents; money and statuses look real.
    assert_eq!(
        one(
            "SELECT count(*) FROM public.affiliates c JOIN public.affiliates p
               ON p.affiliate_id = c.parent_affiliate_id
             WHERE c.registration_date < p.registration_date AND c.affiliate_id > p.affiliate_id"
        )
        .await,
        0
    );
    assert!(one("SELECT count(DISTINCT status) FROM public.affiliates").await >= 3);
    assert!(one("SELECT count(*) FROM public.affiliates WHERE total_deposits > 0").await > 2500);

    // The application's next insert gets a fresh id.
    let next: i64 = client
        .query_one(
            "INSERT INTO public.affiliates (external_id, name, registration_date)
             VALUES ('new', 'New', now()) RETURNING affiliate_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 5001);
}
