//! v2's network sizes as deltas (migration 0017, issue 16): no row every writer under one root
//! must lock, and sizes exact whenever a transaction can look.
//!
//! - Writers under one root never wait for each other: one transaction holds an insert deep
//!   under a root open, and another inserts, moves and deletes elsewhere under the same root
//!   with `lock_timeout` set — on v2 directly (the path after the flip) and through
//!   dual-write's sync (the path before it). Before 0017 both waited on the root's row.
//! - Exact under concurrency: eight writers insert, move and delete at random under one root
//!   (v2 directly, then legacy with dual-write on), a fold runs all along in small batches,
//!   and a reader checks in `REPEATABLE READ` snapshots that every size (the column plus its
//!   pending deltas) equals the closure's count; at the end the seed's integrity checks and
//!   `cutover verify` are clean, and a full fold leaves the column itself exact.

mod support;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use rand::{RngExt, SeedableRng, rngs::ChaCha8Rng};
use support::{TestDb, cutover_on, set_state, tree_db};
use tokio_postgres::{Client, error::SqlState};

const WRITERS: u64 = 8;
const TRANSACTIONS: u64 = 50;

/// The root with the largest tree, and every affiliate under it (deepest first).
async fn largest_tree(client: &Client) -> (i64, Vec<i64>) {
    let root: i64 = client
        .query_one(
            "SELECT ancestor_id FROM fature_v2.hierarchy_index h
             JOIN fature_v2.affiliates_optimized a ON a.affiliate_id = h.ancestor_id
             WHERE a.parent_affiliate_id IS NULL
             GROUP BY ancestor_id ORDER BY count(*) DESC, ancestor_id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let below = client
        .query(
            "SELECT descendant_id FROM fature_v2.hierarchy_index WHERE ancestor_id = $1
             ORDER BY level_distance DESC, descendant_id",
            &[&root],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (root, below)
}

/// Two affiliates under the root, neither above the other, each with a parent other than the
/// root (so that a write under one touches no row the other's does but the root's line).
async fn two_apart(client: &Client, below: &[i64]) -> (i64, i64) {
    let x = below[0];
    for &y in &below[1..] {
        let related: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM fature_v2.hierarchy_index
                                WHERE (ancestor_id = $1 AND descendant_id = $2)
                                   OR (ancestor_id = $2 AND descendant_id = $1))
                     OR (SELECT parent_affiliate_id FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1)
                      = (SELECT parent_affiliate_id FROM fature_v2.affiliates_optimized WHERE affiliate_id = $2)",
                &[&x, &y],
            )
            .await
            .unwrap()
            .get(0);
        if !related {
            return (x, y);
        }
    }
    panic!("no two unrelated affiliates under one root");
}

/// Sizes that differ from the closure's count in one snapshot.
async fn wrong_sizes(client: &Client) -> i64 {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .unwrap();
    let wrong: i64 = client
        .query_one(
            "SELECT count(*) FROM fature_v2.affiliate_network_sizes a
             WHERE a.total_network_size <> (SELECT count(*) FROM fature_v2.hierarchy_index h
                                            WHERE h.ancestor_id = a.affiliate_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client.batch_execute("COMMIT").await.unwrap();
    wrong
}

/// Locks legacy's row `id` from `client` (give it a `lock_timeout`): `55P03` while another
/// transaction holds the row.
async fn lock_legacy_row(client: &Client, id: i64) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "SELECT 1 FROM public.affiliates WHERE affiliate_id = $1 FOR UPDATE",
            &[&id],
        )
        .await
}

fn assert_verify_clean(db: &TestDb, when: &str) {
    let (code, out) = cutover_on(db, "verify", &[], &[]);
    assert_eq!(code, 0, "verify {when}:\n{out}");
}

#[tokio::test]
async fn writers_under_one_root_never_wait_for_each_other_on_v2() {
    let db = tree_db(600).await;
    let a = db.client().await;
    let b = db.client().await;
    let (_root, below) = largest_tree(&a).await;
    let (x, y) = two_apart(&a, &below).await;

    // A: a new affiliate under x, uncommitted (the root's line is under its foreign-key
    // checks, x's count under its update).
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(
        "INSERT INTO fature_v2.affiliates_optimized (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
         VALUES (1000001, $1, 'held-1', 'held', now())",
        &[&x],
    )
    .await
    .unwrap();

    // B, meanwhile, under the same root: an insert, a move and a delete under y.
    b.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    for (what, sql) in [
        (
            "insert",
            "INSERT INTO fature_v2.affiliates_optimized (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
             VALUES (1000002, $1, 'free-2', 'free', now())",
        ),
        (
            "insert",
            "INSERT INTO fature_v2.affiliates_optimized (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
             VALUES (1000003, $1, 'free-3', 'free', now())",
        ),
        (
            "move",
            "UPDATE fature_v2.affiliates_optimized SET parent_affiliate_id = 1000002
             WHERE affiliate_id = 1000003 AND $1::bigint IS NOT NULL",
        ),
        (
            "delete",
            "DELETE FROM fature_v2.affiliates_optimized
             WHERE affiliate_id = 1000003 AND $1::bigint IS NOT NULL",
        ),
    ] {
        let done = b.execute(sql, &[&y]).await;
        assert!(
            done.is_ok(),
            "{what} under the same root waited for another writer: {:?}",
            done.err()
        );
    }
    a.batch_execute("COMMIT").await.unwrap();
    support::assert_integrity(&a, "after both").await;
    assert_eq!(wrong_sizes(&a).await, 0);
}

#[tokio::test]
async fn writers_under_one_root_never_wait_for_each_other_through_dual_write() {
    let db = tree_db(600).await;
    let a = db.client().await;
    let b = db.client().await;
    let (_root, below) = largest_tree(&a).await;
    let (x, y) = two_apart(&a, &below).await;
    // Dual-write on; A's query type strict, so that its sync runs inside its statement and
    // holds v2's locks until A commits.
    set_state(&a, "new_affiliate", "stage", "shadow").await;
    set_state(&a, "new_affiliate", "dual_write", "strict").await;

    a.batch_execute("BEGIN").await.unwrap();
    a.execute(
        "INSERT INTO public.affiliates (parent_affiliate_id, external_id, name, registration_date)
         VALUES ($1, 'held-1', 'held', now()) /* cutover:new_affiliate fp_held */",
        &[&x],
    )
    .await
    .unwrap();

    // B writes legacy under the same root; its sync at COMMIT must not wait for A (it
    // would record a 55P03 lock timeout as a write divergence, isolated).
    b.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    let child: i64 = b
        .query_one(
            "INSERT INTO public.affiliates (parent_affiliate_id, external_id, name, registration_date)
             VALUES ($1, 'free-2', 'free', now()) RETURNING affiliate_id",
            &[&y],
        )
        .await
        .unwrap()
        .get(0);
    b.execute(
        "UPDATE public.affiliates SET parent_affiliate_id = $1 WHERE affiliate_id = $2",
        &[&below[below.len() / 2], &child],
    )
    .await
    .unwrap();
    b.execute(
        "DELETE FROM public.affiliates WHERE affiliate_id = $1",
        &[&child],
    )
    .await
    .unwrap();
    let divergences: Vec<String> = b
        .query("SELECT sqlstate FROM cutover.write_divergences", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        divergences.is_empty(),
        "B's mirror waited for A under the same root: {divergences:?}"
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_verify_clean(&db, "after both");
}

/// Which table the writers write: v2 directly, or legacy with dual-write on.
#[derive(Clone, Copy, Debug)]
enum Side {
    Target,
    LegacyMirrored,
}

impl Side {
    fn table(self) -> &'static str {
        match self {
            Side::Target => "fature_v2.affiliates_optimized",
            Side::LegacyMirrored => "public.affiliates",
        }
    }
}

/// One writer: transactions of one to three statements (insert under an affiliate of the
/// tree, move, delete), one in ten rolled back. The writer's own new leaves move (under
/// affiliates of the first tree, so that no move can make a cycle on legacy, which has no
/// check) and go; on v2, one move in three is of any affiliate of the tree, subtree and
/// all (v2 refuses cycles).
async fn writer(db: Arc<TestDb>, side: Side, me: u64, tree: Arc<Vec<i64>>, done: Arc<AtomicU64>) {
    let client = db.client().await;
    let table = side.table();
    let mut rng = ChaCha8Rng::seed_from_u64(1000 + me);
    let mut mine: Vec<i64> = Vec::new();
    let mut next_id = 2_000_000 + i64::try_from(me).expect("a few writers") * 100_000;
    for t in 0..TRANSACTIONS {
        client.batch_execute("BEGIN").await.unwrap();
        let mut failed = None;
        let mut added = Vec::new();
        let mut gone = Vec::new();
        for _ in 0..rng.random_range(1..=3) {
            let under = tree[rng.random_range(0..tree.len())];
            let result = match rng.random_range(0..10) {
                0..=4 => {
                    next_id += 1;
                    added.push(next_id);
                    client
                        .execute(
                            &format!(
                                "INSERT INTO {table} (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
                                 VALUES ($1, $2, $3, 'w', now())"
                            ),
                            &[&next_id, &under, &format!("w{me}-{t}-{next_id}")],
                        )
                        .await
                }
                op @ 5..=7 => {
                    let node = match side {
                        Side::Target if op == 7 => tree[rng.random_range(0..tree.len())],
                        _ if !mine.is_empty() => mine[rng.random_range(0..mine.len())],
                        _ => continue,
                    };
                    client
                        .execute(
                            &format!("UPDATE {table} SET parent_affiliate_id = $1 WHERE affiliate_id = $2"),
                            &[&under, &node],
                        )
                        .await
                }
                _ => {
                    let Some(&node) = mine.last() else { continue };
                    gone.push(node);
                    client
                        .execute(
                            &format!("DELETE FROM {table} WHERE affiliate_id = $1"),
                            &[&node],
                        )
                        .await
                }
            };
            if let Err(error) = result {
                failed = Some(error);
                break;
            }
        }
        let end = if failed.is_some() || rng.random_range(0..10) == 0 {
            "ROLLBACK"
        } else {
            "COMMIT"
        };
        let ended = client.batch_execute(end).await;
        // What concurrent writers may meet on v2 directly, as on any database: a cycle
        // refused, a parent deleted meanwhile, a deadlock between two moves.
        for error in failed.iter().chain(ended.as_ref().err()) {
            let code = error.code().cloned();
            let expected = [
                SqlState::CHECK_VIOLATION,
                SqlState::FOREIGN_KEY_VIOLATION,
                SqlState::T_R_DEADLOCK_DETECTED,
            ];
            assert!(
                matches!(side, Side::Target) && code.as_ref().is_some_and(|c| expected.contains(c)),
                "writer {me} on {side:?}: {code:?} {:?}",
                error.as_db_error()
            );
        }
        if end == "COMMIT" && ended.is_ok() {
            mine.retain(|n| !gone.contains(n));
            mine.extend(added);
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn concurrent_writers_keep_sizes_exact(side: Side) {
    let db = Arc::new(tree_db(2000).await);
    let admin = db.client().await;
    if let Side::LegacyMirrored = side {
        set_state(&admin, "new_affiliate", "stage", "shadow").await;
    }
    let (root, below) = largest_tree(&admin).await;
    let tree = Arc::new([vec![root], below].concat());

    let stop = Arc::new(AtomicBool::new(false));
    let folder = {
        let (db, stop) = (Arc::clone(&db), Arc::clone(&stop));
        tokio::spawn(async move {
            let client = db.client().await;
            let mut folded = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let n: i32 = client
                    .query_one("SELECT fature_v2.fold_network_sizes(20)", &[])
                    .await
                    .unwrap()
                    .get(0);
                folded += i64::from(n);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            folded
        })
    };
    let reader = {
        let (db, stop) = (Arc::clone(&db), Arc::clone(&stop));
        tokio::spawn(async move {
            let client = db.client().await;
            let (mut looks, mut wrong) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                wrong += wrong_sizes(&client).await;
                looks += 1;
            }
            (looks, wrong)
        })
    };
    let done = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|me| {
            tokio::spawn(writer(
                Arc::clone(&db),
                side,
                me,
                Arc::clone(&tree),
                Arc::clone(&done),
            ))
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let folded = folder.await.unwrap();
    let (looks, wrong) = reader.await.unwrap();

    assert!(
        done.load(Ordering::Relaxed) > WRITERS * TRANSACTIONS / 2,
        "too few transactions committed to prove anything: {}",
        done.load(Ordering::Relaxed)
    );
    assert!(folded > 0, "the fold never ran");
    assert!(looks > 0, "the reader never looked");
    assert_eq!(
        wrong, 0,
        "{side:?}: sizes differed from the closure in {looks} snapshots"
    );
    support::assert_integrity(&admin, "after the writers").await;
    if let Side::LegacyMirrored = side {
        let (code, out) = cutover_on(&db, "verify", &[], &[]);
        let recorded: Vec<String> = admin
            .query(
                "SELECT format('%s %s %s %s', affiliate_id, operation, sqlstate, message)
                 FROM cutover.write_divergences",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            code, 0,
            "verify after the writers:\n{out}\nrecorded write divergences: {recorded:#?}"
        );
        // Nothing failed on the way either (a deadlock in the sync is isolated and recorded,
        // and verify would not see it if a later write healed the row).
        assert!(recorded.is_empty(), "{recorded:#?}");
    }
    // Folded to the end, the column alone is the size.
    admin
        .batch_execute("SELECT fature_v2.fold_all_network_sizes()")
        .await
        .unwrap();
    let (pending, wrong_columns): (i64, i64) = {
        let r = admin
            .query_one(
                "SELECT (SELECT count(*) FROM fature_v2.network_size_deltas),
                        (SELECT count(*) FROM fature_v2.affiliates_optimized a
                         WHERE total_network_size <> (SELECT count(*) FROM fature_v2.hierarchy_index h
                                                      WHERE h.ancestor_id = a.affiliate_id))",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((pending, wrong_columns), (0, 0));
}

#[tokio::test]
async fn sizes_stay_exact_under_concurrent_writers_on_v2() {
    concurrent_writers_keep_sizes_exact(Side::Target).await;
}

#[tokio::test]
async fn sizes_stay_exact_under_concurrent_writers_through_dual_write() {
    concurrent_writers_keep_sizes_exact(Side::LegacyMirrored).await;
}

#[tokio::test]
async fn the_fold_after_the_flip_leaves_legacy_alone() {
    // The fold changes only v2's total_network_size, which legacy has no column for. After
    // the flip the reverse mirror copies v2's writes into legacy, and copied the fold's too:
    // an upsert of every folded row (the root's among them) that changed nothing but locked
    // those rows in legacy until the fold committed.
    let db = tree_db(300).await;
    let a = db.client().await;
    let b = db.client().await;
    set_state(&a, "new_affiliate", "stage", "target").await;
    let (root, below) = largest_tree(&a).await;
    // A write at target: v2 first, then legacy by the reverse mirror; its ancestors' sizes
    // wait in deltas.
    a.execute(
        "INSERT INTO fature_v2.affiliates_optimized (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
         VALUES (1000001, $1, 'flipped-1', 'flipped', now())",
        &[&below[0]],
    )
    .await
    .unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    let folded: i32 = a
        .query_one("SELECT fature_v2.fold_network_sizes(1000)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(folded > 0, "nothing was pending");
    b.batch_execute("SET lock_timeout = '1s'").await.unwrap();
    let locked = lock_legacy_row(&b, root).await;
    assert!(
        locked.is_ok(),
        "the fold holds the root's legacy row: {:?}",
        locked.err()
    );
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(wrong_sizes(&a).await, 0);
    assert_verify_clean(&db, "after the fold");
}

#[tokio::test]
async fn after_the_flip_v2_upkeep_leaves_legacy_rows_unlocked() {
    // After the flip, a write on v2 is copied into legacy row by row; v2's own upkeep (a
    // parent's count at an insert, a moved subtree's paths and levels) changes only v2's
    // columns, and copying it locked those rows in legacy until COMMIT: a move locked its
    // whole subtree there. What legacy sees must still arrive.
    let db = tree_db(300).await;
    let a = db.client().await;
    let b = db.client().await;
    set_state(&a, "move_affiliate", "stage", "target").await;
    let (_root, below) = largest_tree(&a).await;
    // An affiliate with a subtree of its own, and a new parent outside that subtree.
    let moved: i64 = a
        .query_one(
            "SELECT ancestor_id FROM fature_v2.hierarchy_index
             WHERE ancestor_id = ANY ($1) AND level_distance = 2
             GROUP BY ancestor_id ORDER BY count(*) DESC, ancestor_id LIMIT 1",
            &[&below],
        )
        .await
        .unwrap()
        .get(0);
    let (parent, subtree): (i64, Vec<i64>) = {
        let rows = a
            .query(
                "SELECT descendant_id FROM fature_v2.hierarchy_index WHERE ancestor_id = $1",
                &[&moved],
            )
            .await
            .unwrap();
        let subtree: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        let parent = *below
            .iter()
            .find(|id| **id != moved && !subtree.contains(id))
            .unwrap();
        (parent, subtree)
    };
    b.batch_execute("SET lock_timeout = '1s'").await.unwrap();

    a.batch_execute("BEGIN").await.unwrap();
    a.execute(
        "UPDATE fature_v2.affiliates_optimized SET parent_affiliate_id = $1 WHERE affiliate_id = $2",
        &[&parent, &moved],
    )
    .await
    .unwrap();
    for &id in &subtree {
        let locked = lock_legacy_row(&b, id).await;
        assert!(
            locked.is_ok(),
            "the move holds {id}'s legacy row, below the moved {moved}: {:?}",
            locked.err()
        );
    }
    assert!(
        lock_legacy_row(&b, moved).await.is_err(),
        "the moved row itself is written in legacy"
    );
    a.batch_execute("COMMIT").await.unwrap();

    // An insert: the new row reaches legacy, its parent's legacy row is not held for v2's count.
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(
        "INSERT INTO fature_v2.affiliates_optimized (affiliate_id, parent_affiliate_id, external_id, name, registration_date)
         VALUES (1000001, $1, 'flipped-1', 'flipped', now())",
        &[&parent],
    )
    .await
    .unwrap();
    let held = lock_legacy_row(&b, parent).await;
    assert!(
        held.is_ok(),
        "the insert holds its parent's legacy row: {:?}",
        held.err()
    );
    a.batch_execute("COMMIT").await.unwrap();

    let legacy_parent: Option<i64> = a
        .query_one(
            "SELECT parent_affiliate_id FROM public.affiliates WHERE affiliate_id = $1",
            &[&moved],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(legacy_parent, Some(parent));
    support::assert_integrity(&a, "after the move and the insert").await;
    assert_verify_clean(&db, "after the move and the insert");
}
