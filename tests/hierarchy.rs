//! The fature_v2 triggers against a real PostgreSQL: a tree built through them, then moved,
//! pruned and re-statused at random, must pass the seed's integrity checks and match the
//! closure recomputed from parents; cycles are refused; commissions reach the right
//! ancestors with the right amounts.

mod support;

use std::collections::HashMap;

use cutover::{
    demo::fixture::{self, TreeSpec},
    migrate::integrity,
};
use rand::{RngExt, SeedableRng, rngs::ChaCha8Rng};
use rust_decimal::Decimal;
use tokio_postgres::{Client, error::SqlState};

async fn parents(client: &Client) -> HashMap<i64, Option<i64>> {
    client
        .query(
            "SELECT affiliate_id, parent_affiliate_id FROM fature_v2.affiliates_optimized",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn is_in_subtree(model: &HashMap<i64, Option<i64>>, node: i64, root: i64) -> bool {
    let mut at = Some(node);
    while let Some(id) = at {
        if id == root {
            return true;
        }
        at = model.get(&id).copied().flatten();
    }
    false
}

#[tokio::test]
async fn random_moves_deletes_and_statuses_keep_the_tree_exact() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(10_000))
        .await
        .unwrap();
    support::copy_legacy_into_target(&client).await;
    support::assert_integrity(&client, "after the build").await;

    let mut model = parents(&client).await;
    let mut ids: Vec<i64> = model.keys().copied().collect();
    ids.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut moves, mut refused, mut deletes, mut detached) = (0, 0, 0, 0);

    for step in 0..600 {
        let mut node = ids[rng.random_range(0..ids.len())];
        match rng.random_range(0..10) {
            // Move under a random affiliate, or make a root; one try in ten goes under
            // one of the node's own descendants, which must be refused.
            0..=4 => {
                let new_parent = match rng.random_range(0..10) {
                    0 => None,
                    1 => {
                        let below = node;
                        for _ in 0..rng.random_range(1..4) {
                            node = model[&node].unwrap_or(node);
                        }
                        Some(below)
                    }
                    _ => Some(ids[rng.random_range(0..ids.len())]),
                };
                let result = client
                    .execute(
                        "UPDATE fature_v2.affiliates_optimized
                         SET parent_affiliate_id = $1, updated_at = now()
                         WHERE affiliate_id = $2",
                        &[&new_parent, &node],
                    )
                    .await;
                let cycle = new_parent.is_some_and(|p| is_in_subtree(&model, p, node));
                match result {
                    Ok(n) => {
                        assert!(
                            !cycle,
                            "step {step}: move of {node} under {new_parent:?} made a cycle"
                        );
                        assert_eq!(n, 1);
                        model.insert(node, new_parent);
                        moves += 1;
                    }
                    Err(e) => {
                        assert!(cycle, "step {step}: move refused: {e}");
                        assert_eq!(e.code(), Some(&SqlState::CHECK_VIOLATION));
                        assert_eq!(e.as_db_error().unwrap().constraint(), Some("chk_no_cycle"));
                        refused += 1;
                    }
                }
            }
            // Delete, usually a leaf; its children (if any) become roots.
            5 | 6 => {
                let children: Vec<i64> = model
                    .iter()
                    .filter(|(_, p)| **p == Some(node))
                    .map(|(c, _)| *c)
                    .collect();
                if !children.is_empty() && rng.random_range(0..4) != 0 {
                    continue;
                }
                let n = client
                    .execute(
                        "DELETE FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1",
                        &[&node],
                    )
                    .await
                    .unwrap();
                assert_eq!(n, 1);
                model.remove(&node);
                ids.retain(|id| *id != node);
                for child in &children {
                    model.insert(*child, None);
                }
                detached += children.len();
                deletes += 1;
            }
            // Status change.
            _ => {
                let status = ["active", "inactive", "suspended", "banned"][rng.random_range(0..4)];
                client
                    .execute(
                        "UPDATE fature_v2.affiliates_optimized SET status = $1 WHERE affiliate_id = $2",
                        &[&status, &node],
                    )
                    .await
                    .unwrap();
            }
        }
    }
    assert!(
        moves > 100 && refused > 0 && deletes > 50,
        "{moves} {refused} {deletes}"
    );
    support::assert_integrity(&client, "after the random operations").await;
    assert_eq!(
        parents(&client).await,
        model,
        "v2's parent links follow the operations"
    );

    let recorded: i64 = client
        .query_one("SELECT count(*) FROM fature_v2.detached_affiliates", &[])
        .await
        .unwrap()
        .get(0);
    assert!(recorded as usize <= detached);
}

async fn insert_chain(client: &Client, ids: &[i64]) {
    for (i, id) in ids.iter().enumerate() {
        let parent = if i == 0 { None } else { Some(ids[i - 1]) };
        client
            .execute(
                "INSERT INTO fature_v2.affiliates_optimized
                     (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
                 VALUES ($1, $2, $3, 'n', now())",
                &[id, &parent, &format!("ext-{id}")],
            )
            .await
            .unwrap();
    }
}

async fn row(client: &Client, id: i64) -> (String, i32, i32, i32, Option<i64>) {
    let r = client
        .query_one(
            "SELECT hierarchy_path::text, hierarchy_level, direct_referrals_count,
                    fature_v2.network_size(affiliate_id), parent_affiliate_id
             FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

#[tokio::test]
async fn cycles_and_id_changes_are_refused_with_clear_errors() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    insert_chain(&client, &[1, 2, 3, 4]).await;

    for (node, parent) in [(2, 4), (2, 2), (1, 3)] {
        let err = client
            .execute(
                "UPDATE fature_v2.affiliates_optimized SET parent_affiliate_id = $1 WHERE affiliate_id = $2",
                &[&(parent as i64), &(node as i64)],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err}");
        let db_err = err.as_db_error().unwrap();
        assert_eq!(db_err.constraint(), Some("chk_no_cycle"));
        assert!(
            db_err.message().contains("descendants"),
            "{}",
            db_err.message()
        );
    }

    let err = client
        .execute(
            "UPDATE fature_v2.affiliates_optimized SET affiliate_id = 99 WHERE affiliate_id = 4",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED));

    let err = client
        .execute(
            "INSERT INTO fature_v2.affiliates_optimized
                 (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
             VALUES (10, 777, 'x', 'n', now())",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION));
    support::assert_integrity(&client, "after the refusals").await;
}

#[tokio::test]
async fn one_statement_moving_nested_rows_and_deleting_parent_with_child() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    // 1 ─ 2 ─ 3 ─ 4 ─ 5      and      10 ─ 11
    insert_chain(&client, &[1, 2, 3, 4, 5]).await;
    insert_chain(&client, &[10, 11]).await;

    // 3 (inside 2's subtree) and 2 move in one statement: 2 under 11, 3 under 10.
    client
        .execute(
            "UPDATE fature_v2.affiliates_optimized
             SET parent_affiliate_id = CASE affiliate_id WHEN 2 THEN 11 ELSE 10 END
             WHERE affiliate_id IN (2, 3)",
            &[],
        )
        .await
        .unwrap();
    support::assert_integrity(&client, "after the nested move").await;
    assert_eq!(row(&client, 5).await.0, "10.3.4.5");
    assert_eq!(row(&client, 2).await.0, "10.11.2");
    assert_eq!(row(&client, 10).await.3, 5, "10's network: 11, 2, 3, 4, 5");

    // Delete 3 and its child 4 together: 5 becomes a root, 10 loses three.
    client
        .execute(
            "DELETE FROM fature_v2.affiliates_optimized WHERE affiliate_id IN (3, 4)",
            &[],
        )
        .await
        .unwrap();
    support::assert_integrity(&client, "after deleting a parent with its child").await;
    assert_eq!(row(&client, 5).await, ("5".into(), 1, 0, 0, None));
    assert_eq!(row(&client, 10).await.3, 2, "10's network: 11, 2");
    let detached: Vec<(i64, i64)> = client
        .query(
            "SELECT affiliate_id, former_parent_id FROM fature_v2.detached_affiliates ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(detached, [(5, 4)]);
    // A behaviour change v2 makes on purpose, counted for the gate and the report.
    let observed: i64 = client
        .query_one(
            "SELECT cutover.behaviour_observed('detached_children')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(observed, 1);

    // Given a parent again, 5 is no longer detached.
    client
        .execute(
            "UPDATE fature_v2.affiliates_optimized SET parent_affiliate_id = 2 WHERE affiliate_id = 5",
            &[],
        )
        .await
        .unwrap();
    support::assert_integrity(&client, "after re-attaching").await;
    assert_eq!(row(&client, 5).await.0, "10.11.2.5");
    let left: i64 = client
        .query_one("SELECT count(*) FROM fature_v2.detached_affiliates", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

async fn commissions_of(client: &Client, transaction: i64) -> Vec<(i64, i32, Decimal, Decimal)> {
    client
        .query(
            "SELECT beneficiary_affiliate_id, level_distance, commission_rate, commission_amount
             FROM fature_v2.commissions WHERE transaction_id = $1 ORDER BY level_distance",
            &[&transaction],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

#[tokio::test]
async fn commissions_reach_the_five_nearest_active_ancestors() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    // Levels 1..8: the source, 8, sits six and seven levels below 2 and 1.
    insert_chain(&client, &[1, 2, 3, 4, 5, 6, 7, 8]).await;

    let txn: i64 = client
        .query_one(
            "INSERT INTO fature_v2.transactions (affiliate_id, transaction_type, amount)
             VALUES (8, 'deposit', 1000.00) RETURNING transaction_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        commissions_of(&client, txn).await,
        [
            (7, 1, dec("0.0500"), dec("50.00")),
            (6, 2, dec("0.0300"), dec("30.00")),
            (5, 3, dec("0.0200"), dec("20.00")),
            (4, 4, dec("0.0100"), dec("10.00")),
            (3, 5, dec("0.0050"), dec("5.00")),
        ]
    );
    let processed: bool = client
        .query_one(
            "SELECT commission_processed FROM fature_v2.transactions WHERE transaction_id = $1",
            &[&txn],
        )
        .await
        .unwrap()
        .get(0);
    assert!(processed);

    // An inactive ancestor is skipped, and its share is not passed up (the seed's rule).
    client
        .execute(
            "UPDATE fature_v2.affiliates_optimized SET status = 'inactive' WHERE affiliate_id = 6",
            &[],
        )
        .await
        .unwrap();
    // Inserted ineligible, made eligible later: the seed's UPDATE trigger pays it.
    let later: i64 = client
        .query_one(
            "INSERT INTO fature_v2.transactions (affiliate_id, transaction_type, amount, commission_eligible)
             VALUES (8, 'bet', 33.33, false) RETURNING transaction_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(commissions_of(&client, later).await.is_empty());
    client
        .execute(
            "UPDATE fature_v2.transactions SET commission_eligible = true WHERE transaction_id = $1",
            &[&later],
        )
        .await
        .unwrap();
    assert_eq!(
        commissions_of(&client, later).await,
        [
            (7, 1, dec("0.0500"), dec("1.67")),
            (5, 3, dec("0.0200"), dec("0.67")),
            (4, 4, dec("0.0100"), dec("0.33")),
            (3, 5, dec("0.0050"), dec("0.17")),
        ]
    );

    // A share that rounds to zero is not paid rather than failing the transaction.
    let tiny: i64 = client
        .query_one(
            "INSERT INTO fature_v2.transactions (affiliate_id, transaction_type, amount)
             VALUES (8, 'bet', 0.10) RETURNING transaction_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        commissions_of(&client, tiny).await,
        [(7, 1, dec("0.0500"), dec("0.01"))]
    );
    support::assert_integrity(&client, "after the commissions").await;
}

#[tokio::test]
async fn triggers_work_under_the_application_search_path() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    // An application whose search_path has neither fature_v2 nor public.
    client
        .batch_execute(
            "CREATE SCHEMA app;
             CREATE TABLE app.hierarchy_index (x int);
             SET search_path = app",
        )
        .await
        .unwrap();
    insert_chain(&client, &[1, 2, 3]).await;
    client
        .execute(
            "UPDATE fature_v2.affiliates_optimized SET parent_affiliate_id = 1 WHERE affiliate_id = 3",
            &[],
        )
        .await
        .unwrap();
    client
        .batch_execute("SET search_path = DEFAULT")
        .await
        .unwrap();
    support::assert_integrity(&client, "after writes under another search_path").await;
    assert_eq!(row(&client, 1).await.2, 2);
}

#[tokio::test]
async fn integrity_checks_catch_each_kind_of_corruption() {
    let db = support::migrated_db().await;
    let client = db.client().await;
    insert_chain(&client, &[1, 2, 3, 4]).await;
    support::assert_integrity(&client, "before corrupting").await;

    // Each corruption bypasses the triggers and must be flagged by the named check.
    let cases = [
        (
            "UPDATE fature_v2.affiliates_optimized SET direct_referrals_count = 7 WHERE affiliate_id = 2",
            "counter_mismatches",
        ),
        (
            "UPDATE fature_v2.affiliates_optimized SET total_network_size = total_network_size + 7 WHERE affiliate_id = 1",
            "network_size_mismatches",
        ),
        (
            "UPDATE fature_v2.affiliates_optimized SET hierarchy_level = 9 WHERE affiliate_id = 3",
            "level_inconsistencies",
        ),
        (
            "UPDATE fature_v2.affiliates_optimized SET hierarchy_path = '1.9.3' WHERE affiliate_id = 3",
            "path_mismatches",
        ),
        (
            "DELETE FROM fature_v2.hierarchy_index WHERE ancestor_id = 1 AND descendant_id = 4",
            "closure_differs_from_parents",
        ),
        (
            "UPDATE fature_v2.hierarchy_index SET level_distance = 2 WHERE ancestor_id = 3 AND descendant_id = 4",
            "incorrect_distances",
        ),
    ];
    for (corrupt, check) in cases {
        client.batch_execute("BEGIN").await.unwrap();
        client.batch_execute(corrupt).await.unwrap();
        client.batch_execute("SAVEPOINT s").await.unwrap();
        // integrity::run opens its own transaction; run the one check here instead.
        let sql = integrity::CHECKS
            .iter()
            .find(|c| c.name == check)
            .unwrap()
            .sql;
        let offending: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        client.batch_execute("ROLLBACK").await.unwrap();
        assert!(offending > 0, "{check} missed: {corrupt}");
    }
    support::assert_integrity(&client, "after rolling the corruptions back").await;
}
