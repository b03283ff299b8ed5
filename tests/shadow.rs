//! The shadow: reads through the proxy compared on both schemas, with verdicts a reviewer can
//! believe — drift, rewrite bugs and target errors confirmed in one snapshot; races with
//! writers transient; undetermined answers never called divergences; a slow target costing
//! the shadow, never the client.
//!
//! Each test: a generated tree backfilled into v2, a proxy whose rules put the query types
//! under test in `shadow`, workload through the proxy, then the divergence store read back.

mod support;

use std::{collections::HashMap, time::Duration};

use cutover::config::FileConfig;
use support::{Proxy, TestDb, metric};
use tokio_postgres::Client;

/// Query types the tests add to the customer's rules, each in `shadow`.
const EXTRA: &str = r#"
[[query_type]]
name = "wrong_column"
match = "SELECT affiliate_id, name FROM affiliates WHERE affiliate_id = $1"
# Deliberately wrong: external_id served as name.
target = "SELECT affiliate_id, external_id AS name FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1"
stage = "shadow"

[[query_type]]
name = "failing_target"
match = "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1"
target = "SELECT affiliate_id, status FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1 AND 1 / (affiliate_id - affiliate_id) = 0"
stage = "shadow"

[[query_type]]
name = "slow_target"
match = "SELECT affiliate_id, registration_date FROM affiliates WHERE affiliate_id = $1"
target = "SELECT affiliate_id, registration_date FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1 AND pg_sleep(0.3) IS NOT NULL"
stage = "shadow"

[[query_type]]
name = "limit_without_order"
match = "SELECT affiliate_id FROM affiliates WHERE status = $1 LIMIT 5"
stage = "shadow"

[[query_type]]
name = "other_widths_scales_order"
match = "SELECT affiliate_id, total_deposits FROM affiliates WHERE parent_affiliate_id = $1"
# int4 for int8, numeric scale 4 for scale 2, the rows in another order: the same answer.
target = """
SELECT affiliate_id::int4 AS affiliate_id, round(total_deposits, 4) AS total_deposits
FROM fature_v2.affiliates_optimized WHERE parent_affiliate_id = $1 ORDER BY affiliate_id DESC"""
stage = "shadow"

[[query_type]]
name = "both_fail"
# Fails the same way on both sides for id 0 (division by zero): no answer, no match.
match = "SELECT affiliate_id, 1 / $1::int AS one FROM affiliates WHERE affiliate_id = 1"
stage = "shadow"

[[query_type]]
name = "locking_read"
match = "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1 FOR UPDATE"
stage = "shadow"

[[query_type]]
name = "counter_off_by_one"
match = "SELECT affiliate_id, level_1_referrals FROM affiliates WHERE affiliate_id = $1"
# Deliberately wrong in the column whose drift is expected: a rewrite bug all the same.
target = "SELECT affiliate_id, direct_referrals_count + 1 AS level_1_referrals FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1"
stage = "shadow"
[[query_type.compare.expected]]
class = "counter_drift"
columns = ["level_1_referrals"]
note = "legacy's counter drifted"

# Injected rewrite bugs (issue 18): an order, an aggregate's bound, a closure distance.
[[query_type]]
name = "upline_desc"
match = """
WITH RECURSIVE up AS (
    SELECT affiliate_id, parent_affiliate_id, 0 AS distance FROM affiliates WHERE affiliate_id = $1
    UNION ALL
    SELECT a.affiliate_id, a.parent_affiliate_id, up.distance + 1
    FROM affiliates a JOIN up ON a.affiliate_id = up.parent_affiliate_id
)
SELECT affiliate_id, distance FROM up WHERE distance >= 1 ORDER BY distance"""
target = """
SELECT ancestor_id AS affiliate_id, level_distance AS distance FROM fature_v2.hierarchy_index
WHERE descendant_id = $1 AND is_active ORDER BY level_distance DESC"""
stage = "shadow"

[[query_type]]
name = "network_size_lt"
match = """
WITH RECURSIVE downline AS (
    SELECT affiliate_id, 1 AS depth FROM affiliates WHERE parent_affiliate_id = $1
    UNION ALL
    SELECT a.affiliate_id, d.depth + 1
    FROM affiliates a JOIN downline d ON a.parent_affiliate_id = d.affiliate_id
    WHERE d.depth < $2
)
SELECT COUNT(*) AS n FROM downline"""
target = """
SELECT COUNT(*) AS n FROM fature_v2.hierarchy_index
WHERE ancestor_id = $1 AND level_distance < GREATEST($2, 1) AND is_active"""
stage = "shadow"

[[query_type]]
name = "children_wrong_distance"
match = "SELECT affiliate_id, registration_date FROM affiliates WHERE parent_affiliate_id = $1 ORDER BY affiliate_id"
target = """
SELECT d.affiliate_id, d.registration_date FROM fature_v2.hierarchy_index h
JOIN fature_v2.affiliates_optimized d ON d.affiliate_id = h.descendant_id
WHERE h.ancestor_id = $1 AND h.level_distance <= 2 ORDER BY d.affiliate_id"""
stage = "shadow"

# Ties at the cut broken the other way by the target; and a target sorted the wrong way.
[[query_type]]
name = "top_other_ties"
match = "SELECT affiliate_id, level_1_referrals FROM affiliates WHERE level_1_referrals >= 1 ORDER BY level_1_referrals DESC LIMIT $1"
target = "SELECT affiliate_id, direct_referrals_count AS level_1_referrals FROM fature_v2.affiliates_optimized WHERE direct_referrals_count >= 1 ORDER BY direct_referrals_count DESC, affiliate_id DESC LIMIT $1"
stage = "shadow"

[[query_type]]
name = "top_wrong_direction"
match = "SELECT affiliate_id, level_1_referrals FROM affiliates WHERE 1 < level_1_referrals ORDER BY level_1_referrals DESC LIMIT $1"
target = "SELECT affiliate_id, direct_referrals_count AS level_1_referrals FROM fature_v2.affiliates_optimized WHERE 1 < direct_referrals_count ORDER BY direct_referrals_count LIMIT $1"
stage = "shadow"

# A missing condition; a column the statement does not read changed; a volatile function.
[[query_type]]
name = "active_children_missing_condition"
match = "SELECT affiliate_id FROM affiliates WHERE parent_affiliate_id = $1 AND status = 'active' ORDER BY affiliate_id"
target = "SELECT affiliate_id FROM fature_v2.affiliates_optimized WHERE parent_affiliate_id = $1 ORDER BY affiliate_id"
stage = "shadow"

[[query_type]]
name = "deposits_by_id"
match = "SELECT total_deposits, affiliate_id FROM affiliates WHERE affiliate_id = $1"
stage = "shadow"

[[query_type]]
name = "volatile_now"
match = "SELECT affiliate_id, now() AS asked_at FROM affiliates WHERE affiliate_id = $1"
stage = "shadow"

# Rewritten by the proxy (no target): a difference can only be the rows'.
[[query_type]]
name = "status_by_id"
match = "SELECT status, affiliate_id FROM affiliates WHERE affiliate_id = $1"
stage = "shadow"
"#;

struct Setup {
    db: TestDb,
    proxy: Proxy,
    _rules: tempfile::TempDir,
}

/// A backfilled tree of `affiliates`, and a proxy comparing `shadowed` (plus the extra query
/// types) with the shadow pool on the test database.
async fn setup(affiliates: u64, shadowed: &[&str], adjust: impl FnOnce(&mut FileConfig)) -> Setup {
    let db = support::tree_db(affiliates).await;
    let stages: Vec<(&str, &str)> = shadowed
        .iter()
        .map(|n| (*n, "stage = \"shadow\""))
        .collect();
    let rules = support::rules_with(&stages, EXTRA);
    let proxy = support::proxy_on(&db, &rules, adjust).await;
    Setup {
        db,
        proxy,
        _rules: rules,
    }
}

/// A write on v2 alone, as a bug or a hand would make it (not mirrored back to legacy,
/// which dual-write does while it is on).
async fn behind_the_proxy(client: &Client, sql: &str) {
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL cutover.mirroring = 'on'; {sql}; COMMIT"
        ))
        .await
        .unwrap();
}

/// Runs a read of one affiliate through the proxy; it must return its one row.
async fn one_row(app: &Client, sql: &str, id: i64) -> tokio_postgres::Row {
    let mut rows = app.query(sql, &[&id]).await.unwrap();
    assert_eq!(rows.len(), 1, "{sql} for {id}");
    rows.remove(0)
}

/// The sums of `cutover.comparison_stats` for a query type.
async fn stats(client: &Client, query_type: &str) -> HashMap<String, i64> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(matched), 0)::int8, coalesce(sum(confirmed), 0)::int8,
                    coalesce(sum(transient), 0)::int8, coalesce(sum(nondeterministic), 0)::int8,
                    coalesce(sum(skipped), 0)::int8, coalesce(sum(dropped), 0)::int8,
                    coalesce(sum(drift), 0)::int8, coalesce(sum(rewrite_bug), 0)::int8,
                    coalesce(sum(errors), 0)::int8, coalesce(sum(expected), 0)::int8,
                    coalesce(sum(timed), 0)::int8
             FROM cutover.comparison_stats WHERE query_type = $1",
            &[&query_type],
        )
        .await
        .unwrap();
    [
        "matched",
        "confirmed",
        "transient",
        "nondeterministic",
        "skipped",
        "dropped",
        "drift",
        "rewrite_bug",
        "errors",
        "expected",
        "timed",
    ]
    .iter()
    .enumerate()
    .map(|(i, k)| (k.to_string(), row.get(i)))
    .collect()
}

/// Waits until the stats of `query_type` account for `total` offered comparisons.
async fn settled(client: &Client, query_type: &str, total: i64) -> HashMap<String, i64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = stats(client, query_type).await;
        let counted: i64 = [
            "matched",
            "confirmed",
            "transient",
            "nondeterministic",
            "skipped",
            "dropped",
            "expected",
        ]
        .iter()
        .map(|k| s[*k])
        .sum();
        if counted >= total {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{query_type}: {counted} of {total} comparisons counted: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stored divergence samples of a query type: (kind, columns, params, diff, target_error).
async fn samples(
    client: &Client,
    query_type: &str,
) -> Vec<(
    String,
    Vec<String>,
    serde_json::Value,
    serde_json::Value,
    Option<String>,
)> {
    client
        .query(
            "SELECT kind, columns, params, diff, target_error FROM cutover.divergences
             WHERE query_type = $1 ORDER BY id",
            &[&query_type],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

#[tokio::test]
async fn a_v2_row_changed_behind_the_proxy_is_confirmed_drift() {
    let s = setup(300, &["affiliate_by_id"], |_| {}).await;
    let direct = s.db.client().await;
    behind_the_proxy(
        &direct,
        "UPDATE fature_v2.affiliates_optimized SET name = 'changed behind the proxy' WHERE affiliate_id = 7",
    )
    .await;
    // Legacy's counter drifting from the truth: a class the rules expect (counter_drift).
    direct
        .batch_execute("UPDATE affiliates SET level_1_referrals = level_1_referrals + 5 WHERE affiliate_id = 9")
        .await
        .unwrap();
    let app = s.proxy.client(&s.db.name).await;
    for id in 1..=40i64 {
        let rows = app
            .query("SELECT * FROM affiliates WHERE affiliate_id = $1", &[&id])
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        // The client is served by legacy: the v2 change is invisible to it.
        assert_ne!(rows[0].get::<_, String>("name"), "changed behind the proxy");
    }
    let st = settled(&direct, "affiliate_by_id", 40).await;
    assert_eq!((st["drift"], st["confirmed"]), (1, 1), "{st:?}");
    assert_eq!((st["expected"], st["matched"]), (1, 38), "{st:?}");
    assert!(st["timed"] >= 40, "{st:?}");

    let found = samples(&direct, "affiliate_by_id").await;
    assert_eq!(found.len(), 2, "{found:?}");
    let (kind, columns, params, diff, _) = found
        .iter()
        .find(|f| f.1 == ["name"])
        .expect("the drifted name sampled");
    assert_eq!(kind, "drift");
    assert_eq!(columns, &["name"]);
    // The key parameter is shown; the diff names the row and the column.
    assert_eq!(params[0]["value"], "7", "{params}");
    assert_eq!(diff["changed"][0]["key"], "7", "{diff}");
    // A person's name is not shown (the rules may show it: `[redaction] shown`).
    assert_eq!(diff["changed"][0]["target"]["name"], "[redacted]");
    assert!(!diff.to_string().contains("changed behind the proxy"));
    // Sensitive columns never reach the store.
    assert_eq!(
        diff["changed"][0]["legacy"]["email"], "[redacted]",
        "{diff}"
    );
    let expected: String = direct
        .query_one(
            "SELECT expected_class FROM cutover.divergences
             WHERE query_type = 'affiliate_by_id' AND columns = '{level_1_referrals}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(expected, "counter_drift");

    let m = s.proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cutover_comparisons_total{query_type=\"affiliate_by_id\",outcome=\"diverged\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "cutover_comparisons_total{query_type=\"affiliate_by_id\",outcome=\"match\"}"
        ) >= 38.0
    );
}

#[tokio::test]
async fn a_wrong_rule_is_a_rewrite_bug_and_a_failing_target_an_error() {
    let s = setup(200, &[], |_| {}).await;
    let app = s.proxy.client(&s.db.name).await;
    for id in 1..=10i64 {
        one_row(
            &app,
            "SELECT affiliate_id, name FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
        // The failing target never reaches the client.
        one_row(
            &app,
            "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
    }
    let direct = s.db.client().await;
    let wrong = settled(&direct, "wrong_column", 10).await;
    assert_eq!(
        (wrong["rewrite_bug"], wrong["confirmed"], wrong["matched"]),
        (10, 10, 0),
        "{wrong:?}"
    );
    let failing = settled(&direct, "failing_target", 10).await;
    assert_eq!(
        (failing["errors"], failing["confirmed"]),
        (10, 10),
        "{failing:?}"
    );

    let found = samples(&direct, "wrong_column").await;
    assert_eq!(found[0].0, "rewrite_bug");
    assert_eq!(found[0].1, ["name"]);
    let found = samples(&direct, "failing_target").await;
    assert_eq!(found[0].0, "error");
    assert!(
        found[0].4.as_deref().unwrap_or("").starts_with("22012"),
        "{:?}",
        found[0]
    );
}

#[tokio::test]
async fn a_writer_racing_the_shadowed_reads_confirms_nothing() {
    let s = setup(300, &["affiliate_by_id", "set_status"], |_| {}).await;
    let reader = s.proxy.client(&s.db.name).await;
    let writer = s.proxy.client(&s.db.name).await;
    let writes = tokio::spawn(async move {
        for round in 0..200i64 {
            let status = if round % 2 == 0 { "inactive" } else { "active" };
            let id = 1 + round % 20;
            writer
                .execute(
                    "UPDATE affiliates SET status = $1, updated_at = now() WHERE affiliate_id = $2",
                    &[&status, &id],
                )
                .await
                .unwrap();
        }
        writer
    });
    let mut reads = 0;
    while !writes.is_finished() {
        let id = 1 + reads % 20;
        reader
            .query("SELECT * FROM affiliates WHERE affiliate_id = $1", &[&id])
            .await
            .unwrap();
        reads += 1;
    }
    let writer = writes.await.unwrap();
    // A read inside a transaction that wrote: v2 receives the write at COMMIT, the shadow
    // compares committed data only.
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            "UPDATE affiliates SET name = 'inside a transaction' WHERE affiliate_id = $1",
            &[&5i64],
        )
        .await
        .unwrap();
    let row = writer
        .query_one("SELECT * FROM affiliates WHERE affiliate_id = $1", &[&5i64])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>("name"), "inside a transaction");
    writer.batch_execute("COMMIT").await.unwrap();
    reader
        .query("SELECT * FROM affiliates WHERE affiliate_id = $1", &[&5i64])
        .await
        .unwrap();

    let direct = s.db.client().await;
    let st = settled(&direct, "affiliate_by_id", reads + 2).await;
    assert_eq!(
        st["confirmed"],
        0,
        "{st:?}\n{:?}",
        samples(&direct, "affiliate_by_id").await
    );
    assert!(st["matched"] > 0, "{st:?}");
    eprintln!("{reads} reads beside 200 writes: {st:?}");
}

#[tokio::test]
async fn undetermined_answers_and_equal_values_in_other_forms() {
    let s = setup(200, &[], |_| {}).await;
    let app = s.proxy.client(&s.db.name).await;
    for _ in 0..5 {
        app.query(
            "SELECT affiliate_id FROM affiliates WHERE status = $1 LIMIT 5",
            &[&"active"],
        )
        .await
        .unwrap();
    }
    let parents: Vec<i64> =
        s.db.client()
            .await
            .query(
                "SELECT parent_affiliate_id FROM affiliates WHERE parent_affiliate_id IS NOT NULL
             GROUP BY 1 HAVING count(*) > 2 ORDER BY 1 LIMIT 10",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    assert_eq!(parents.len(), 10);
    // Deposits with cents: 10.5 is 10.50 on legacy, 10.5000 on the target.
    s.db.client()
        .await
        .batch_execute(
            "UPDATE affiliates SET total_deposits = 10.5 WHERE affiliate_id % 3 = 0;
             UPDATE fature_v2.affiliates_optimized SET total_deposits = 10.5 WHERE affiliate_id % 3 = 0;",
        )
        .await
        .unwrap();
    for p in &parents {
        app.query(
            "SELECT affiliate_id, total_deposits FROM affiliates WHERE parent_affiliate_id = $1",
            &[p],
        )
        .await
        .unwrap();
    }
    let direct = s.db.client().await;
    let limit = settled(&direct, "limit_without_order", 5).await;
    assert_eq!(
        (limit["nondeterministic"], limit["confirmed"]),
        (5, 0),
        "{limit:?}"
    );
    let forms = settled(&direct, "other_widths_scales_order", 10).await;
    assert_eq!((forms["matched"], forms["confirmed"]), (10, 0), "{forms:?}");
    let m = s.proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "cutover_comparisons_total{query_type=\"limit_without_order\",outcome=\"nondeterministic\"}"
        ),
        5.0
    );
}

#[tokio::test]
async fn a_slow_target_costs_the_shadow_not_the_client() {
    let s = setup(100, &[], |c| {
        c.shadow_connections = Some(1);
        c.shadow_queue = Some(2);
        c.shadow_timeout_ms = Some(100);
    })
    .await;
    let app = s.proxy.client(&s.db.name).await;
    let sent = 100i64;
    for id in 1..=sent {
        one_row(
            &app,
            "SELECT affiliate_id, registration_date FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
    }
    let direct = s.db.client().await;
    let st = settled(&direct, "slow_target", sent).await;
    assert!(st["dropped"] > 0, "the queue of 2 overflowed: {st:?}");
    assert!(st["skipped"] > 0, "the target timed out: {st:?}");
    assert_eq!(st["confirmed"], 0, "a timeout is no divergence: {st:?}");
    let m = s.proxy.metrics().await;
    assert!(metric(&m, "cutover_shadow_dropped_total") >= st["dropped"] as f64);
    assert!(metric(&m, "cutover_shadow_timeouts_total") >= 1.0, "{m}");
}

#[tokio::test]
async fn simple_protocol_reads_are_compared_and_stored_without_their_values() {
    let s = setup(100, &["affiliate_by_external_id"], |_| {}).await;
    let direct = s.db.client().await;
    let external: String = direct
        .query_one(
            "SELECT external_id FROM affiliates WHERE affiliate_id = 3",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    behind_the_proxy(
        &direct,
        "UPDATE fature_v2.affiliates_optimized SET name = 'drifted' WHERE affiliate_id = 3",
    )
    .await;
    let app = s.proxy.client(&s.db.name).await;
    app.simple_query(&format!(
        "SELECT affiliate_id, name, email, status FROM public.affiliates WHERE external_id = '{external}'"
    ))
    .await
    .unwrap();
    let st = settled(&direct, "affiliate_by_external_id", 1).await;
    assert_eq!(st["drift"], 1, "{st:?}");
    let row = direct
        .query_one(
            "SELECT legacy_sql, target_sql FROM cutover.divergences WHERE query_type = 'affiliate_by_external_id'",
            &[],
        )
        .await
        .unwrap();
    let (legacy, target): (String, String) = (row.get(0), row.get(1));
    assert!(
        !legacy.contains(&external) && legacy.contains('?'),
        "{legacy}"
    );
    assert!(
        !target.contains(&external) && target.contains("affiliates_optimized"),
        "{target}"
    );
}

// Multi-threaded: the blocking `cutover ctl` runs while the proxy's admin endpoint answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_reviewers_mark_as_expected_is_counted_apart() {
    const TOKEN: &str = "review-token-0123456789";
    let s = setup(100, &[], |c| {
        c.admin_tokens = Some([("ana".to_owned(), TOKEN.to_owned())].into_iter().collect());
    })
    .await;
    let admin = s.proxy.admin.unwrap().to_string();
    let ctl = |args: &[&str], token: Option<&str>| {
        let mut all = vec!["ctl", "--admin", admin.as_str()];
        if let Some(t) = token {
            all.extend(["--token", t]);
        }
        all.extend(args);
        let (code, out, err) = support::cutover(&all, &[]);
        (code, format!("{out}{err}"))
    };
    let mark = [
        "mark",
        "wrong_column",
        "--kind",
        "rewrite_bug",
        "--columns",
        "name",
        "--class",
        "known_name_mapping",
        "--note",
        "external_id stands in for name until the v2 column lands",
    ];
    // Without the token: refused. With a bad kind: refused with the reason.
    let (code, out) = ctl(&mark, None);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("token"), "{out}");
    let mut bad = mark;
    bad[3] = "typo";
    let (code, out) = ctl(&bad, Some(TOKEN));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("kind"), "{out}");
    let (code, out) = ctl(&mark, Some(TOKEN));
    assert_eq!(code, 0, "{out}");

    let direct = s.db.client().await;
    let who: String = direct
        .query_one("SELECT marked_by FROM cutover.divergence_marks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "ana");
    // The replica reads marks every two seconds.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let app = s.proxy.client(&s.db.name).await;
    for id in 1..=5 {
        one_row(
            &app,
            "SELECT affiliate_id, name FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
    }
    let st = settled(&direct, "wrong_column", 5).await;
    assert_eq!((st["expected"], st["confirmed"]), (5, 0), "{st:?}");
    let class: String = direct
        .query_one(
            "SELECT expected_class FROM cutover.divergences WHERE query_type = 'wrong_column' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(class, "known_name_mapping");
}

#[tokio::test]
async fn samples_are_capped_per_class_so_every_class_keeps_its_first_examples() {
    use cutover::shadow::divergence::{Kind, SAMPLES_PER_HOUR, Sample, Store};
    let db = support::migrated_db().await;
    let client = db.client().await;
    let sample = |kind: Kind| Sample {
        query_type: "affiliate_by_id".into(),
        fingerprint: "fp_test".into(),
        kind,
        expected_class: None,
        columns: vec![],
        legacy_sql: "SELECT 1".into(),
        target_sql: "SELECT 1".into(),
        params: serde_json::json!([]),
        diff: serde_json::Value::Null,
        legacy_error: None,
        target_error: (kind == Kind::Error).then(|| "22012: division by zero".to_owned()),
        latency: None,
        rules_version: "test".into(),
    };
    // Drift fills its share first; the errors that come after still get examples.
    let offer = |store: &Store, kind: Kind, n: usize| {
        for _ in 0..n {
            if store.wants_sample("affiliate_by_id", kind, None) {
                store.sample(sample(kind));
            }
        }
    };
    let one = Store::new();
    offer(&one, Kind::Drift, 60);
    offer(&one, Kind::Error, 3);
    one.flush(&client).await.unwrap();
    // Another replica: the bound is the fleet's.
    let other = Store::new();
    offer(&other, Kind::Drift, 5);
    offer(&other, Kind::Error, 2);
    other.flush(&client).await.unwrap();
    let stored: HashMap<String, i64> = client
        .query(
            "SELECT kind, count(*) FROM cutover.divergences GROUP BY kind",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(stored.get("drift"), Some(&SAMPLES_PER_HOUR));
    assert_eq!(stored.get("error"), Some(&5));
    let kept: String = client
        .query_one(
            "SELECT target_error FROM cutover.divergences WHERE kind = 'error' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        kept.starts_with("22012"),
        "the error's SQLSTATE is kept: {kept}"
    );
}

/// Verdicts that prove something (issue 18, items 1 and 6): two sides that fail the same way
/// are skipped, not matched; a locking read is compared without its locking clause (the
/// read-only shadow cannot lock) and matches; an expected class of drift does not hide a
/// rewrite bug in the same column.
#[tokio::test]
async fn no_vacuous_matches_and_expected_classes_keep_their_kind() {
    let s = setup(100, &[], |_| {}).await;
    let direct = s.db.client().await;
    let app = s.proxy.client(&s.db.name).await;
    let before = metric(
        &s.proxy.metrics().await,
        "cutover_comparisons_skipped_total{reason=\"both_failed\"}",
    );
    for n in [0i32, 0, 0, 1, 1] {
        let answer = app
            .query(
                "SELECT affiliate_id, 1 / $1::int AS one FROM affiliates WHERE affiliate_id = 1",
                &[&n],
            )
            .await;
        assert_eq!(answer.is_err(), n == 0);
    }
    let st = settled(&direct, "both_fail", 5).await;
    assert_eq!((st["skipped"], st["matched"]), (3, 2), "{st:?}");
    let skipped = metric(
        &s.proxy.metrics().await,
        "cutover_comparisons_skipped_total{reason=\"both_failed\"}",
    );
    assert_eq!(skipped - before, 3.0);

    app.batch_execute("BEGIN").await.unwrap();
    for id in 1..=5i64 {
        one_row(
            &app,
            "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1 FOR UPDATE",
            id,
        )
        .await;
    }
    app.batch_execute("COMMIT").await.unwrap();
    let st = settled(&direct, "locking_read", 5).await;
    assert_eq!(
        (st["matched"], st["confirmed"], st["skipped"]),
        (5, 0, 0),
        "{st:?}"
    );

    for id in 1..=4i64 {
        one_row(
            &app,
            "SELECT affiliate_id, level_1_referrals FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
    }
    let st = settled(&direct, "counter_off_by_one", 4).await;
    assert_eq!((st["rewrite_bug"], st["expected"]), (4, 0), "{st:?}");
}

/// The verdict suite (issue 18, "How it is proven"): known faults injected into a tree, and
/// for each the class every comparison must get. Drift on a read column; a column changed
/// that the statement does not read; known counter drift (expected); rewrite bugs — a missing
/// condition, an order, an aggregate's bound, a closure distance on rows whose counters
/// drifted —; a target that fails; a locking read; ties at a LIMIT; a volatile function.
/// Prints the confusion matrix; any count off the expected cells fails.
#[tokio::test]
async fn every_injected_fault_gets_its_class() {
    let s = setup(400, &["affiliate_by_id", "top_referrers"], |_| {}).await;
    let direct = s.db.client().await;
    let app = s.proxy.client(&s.db.name).await;
    let ids = |sql: String| {
        let direct = &direct;
        async move {
            direct
                .query(&sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect::<Vec<i64>>()
        }
    };
    // Ties at a LIMIT first, on the clean tree (the counters drift below).
    let top = "SELECT affiliate_id, level_1_referrals\nFROM affiliates\nWHERE level_1_referrals > 0\nORDER BY level_1_referrals DESC\nLIMIT $1";
    for limit in [1i64, 2, 3, 5, 8] {
        app.query(top, &[&limit]).await.unwrap();
    }
    settled(&direct, "top_referrers", 5).await;
    // Affiliates with a grandparent; with grandchildren; with children not all active (and
    // not the parent of the row whose status changes below).
    let deep = ids("SELECT c.affiliate_id FROM affiliates c JOIN affiliates p ON p.affiliate_id = c.parent_affiliate_id
                    WHERE p.parent_affiliate_id IS NOT NULL ORDER BY 1 LIMIT 6".into()).await;
    let grand = ids("SELECT DISTINCT g.affiliate_id FROM affiliates g JOIN affiliates c ON c.parent_affiliate_id = g.affiliate_id
                     JOIN affiliates cc ON cc.parent_affiliate_id = c.affiliate_id ORDER BY 1 LIMIT 6".into()).await;
    let mixed = ids(format!(
        "SELECT parent_affiliate_id FROM affiliates WHERE parent_affiliate_id IS NOT NULL
         AND parent_affiliate_id <> (SELECT parent_affiliate_id FROM affiliates WHERE affiliate_id = {})
         GROUP BY 1 HAVING bool_or(status <> 'active') ORDER BY 1 LIMIT 4",
        deep.first().copied().unwrap_or(0)
    ))
    .await;
    assert!(
        deep.len() == 6 && grand.len() == 6 && mixed.len() == 4,
        "the tree has the shapes the faults need"
    );
    // Known counter drift on the grandparents and their children (rows the closure query
    // returns but does not read that column of); drift on a read column of one row; a
    // column no statement below reads changed on another.
    direct
        .batch_execute(&format!(
            "UPDATE affiliates SET level_1_referrals = level_1_referrals + 3
             WHERE affiliate_id = ANY('{{{0}}}') OR parent_affiliate_id = ANY('{{{0}}}')",
            grand
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await
        .unwrap();
    behind_the_proxy(
        &direct,
        &format!(
            "UPDATE fature_v2.affiliates_optimized SET status = 'banned' WHERE affiliate_id = {};
             UPDATE fature_v2.affiliates_optimized SET name = 'renamed' WHERE affiliate_id = {}",
            deep[0], deep[1]
        ),
    )
    .await;

    let upline = "WITH RECURSIVE up AS (\n    SELECT affiliate_id, parent_affiliate_id, 0 AS distance FROM affiliates WHERE affiliate_id = $1\n    UNION ALL\n    SELECT a.affiliate_id, a.parent_affiliate_id, up.distance + 1\n    FROM affiliates a JOIN up ON a.affiliate_id = up.parent_affiliate_id\n)\nSELECT affiliate_id, distance FROM up WHERE distance >= 1 ORDER BY distance";
    let network = "WITH RECURSIVE downline AS (\n    SELECT affiliate_id, 1 AS depth FROM affiliates WHERE parent_affiliate_id = $1\n    UNION ALL\n    SELECT a.affiliate_id, d.depth + 1\n    FROM affiliates a JOIN downline d ON a.parent_affiliate_id = d.affiliate_id\n    WHERE d.depth < $2\n)\nSELECT COUNT(*) AS n FROM downline";
    for &id in &deep {
        app.query(upline, &[&id]).await.unwrap();
        one_row(
            &app,
            "SELECT status, affiliate_id FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
    }
    for &id in &grand {
        app.query(network, &[&id, &2i32]).await.unwrap();
        app.query(
            "SELECT affiliate_id, registration_date FROM affiliates WHERE parent_affiliate_id = $1 ORDER BY affiliate_id",
            &[&id],
        )
        .await
        .unwrap();
        one_row(&app, "SELECT * FROM affiliates WHERE affiliate_id = $1", id).await;
    }
    for &id in &mixed {
        app.query(
            "SELECT affiliate_id FROM affiliates WHERE parent_affiliate_id = $1 AND status = 'active' ORDER BY affiliate_id",
            &[&id],
        )
        .await
        .unwrap();
    }
    for &id in &deep[1..4] {
        one_row(
            &app,
            "SELECT total_deposits, affiliate_id FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
        one_row(
            &app,
            "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
        one_row(
            &app,
            "SELECT affiliate_id, now() AS asked_at FROM affiliates WHERE affiliate_id = $1",
            id,
        )
        .await;
    }
    app.batch_execute("BEGIN").await.unwrap();
    for &id in &deep[1..4] {
        one_row(
            &app,
            "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1 FOR UPDATE",
            id,
        )
        .await;
    }
    app.batch_execute("COMMIT").await.unwrap();

    // (fault, query type, comparisons, the classes they must get; every other cell 0)
    type Case<'a> = (&'a str, &'a str, i64, &'a [(&'a str, i64)]);
    let cases: &[Case] = &[
        (
            "drift on a read column",
            "status_by_id",
            6,
            &[("drift", 1), ("matched", 5)],
        ),
        (
            "changed column not read",
            "deposits_by_id",
            3,
            &[("matched", 3)],
        ),
        (
            "known counter drift",
            "affiliate_by_id",
            6,
            &[("expected", 6)],
        ),
        (
            "missing condition",
            "active_children_missing_condition",
            4,
            &[("rewrite_bug", 4)],
        ),
        (
            "wrong sort direction",
            "upline_desc",
            6,
            &[("rewrite_bug", 6)],
        ),
        (
            "wrong aggregate bound",
            "network_size_lt",
            6,
            &[("rewrite_bug", 6)],
        ),
        (
            "off-by-one distance",
            "children_wrong_distance",
            6,
            &[("rewrite_bug", 6)],
        ),
        ("target error", "failing_target", 3, &[("errors", 3)]),
        ("locking read", "locking_read", 3, &[("matched", 3)]),
        ("ties at a LIMIT", "top_referrers", 5, &[("matched", 5)]),
        (
            "volatile function",
            "volatile_now",
            3,
            &[("nondeterministic", 3)],
        ),
    ];
    let classes = [
        "matched",
        "drift",
        "rewrite_bug",
        "errors",
        "undetermined",
        "expected",
        "transient",
        "nondeterministic",
        "skipped",
    ];
    let mut matrix = format!(
        "{:<26}{}\n",
        "fault \\ class",
        classes.map(|c| format!("{:>17}", c)).concat()
    );
    let mut off = Vec::new();
    for (fault, query_type, total, expected) in cases {
        let mut st = settled(&direct, query_type, *total).await;
        let undetermined = st["confirmed"] - st["drift"] - st["rewrite_bug"] - st["errors"];
        st.insert("undetermined".into(), undetermined);
        matrix.push_str(&format!(
            "{fault:<26}{}\n",
            classes.map(|c| format!("{:>17}", st[c])).concat()
        ));
        for class in classes {
            let want = expected
                .iter()
                .find(|(c, _)| *c == class)
                .map_or(0, |(_, n)| *n);
            if st[class] != want {
                off.push(format!(
                    "{fault} ({query_type}): {class} = {} (expected {want})",
                    st[class]
                ));
            }
        }
    }
    println!("{matrix}");
    assert!(
        off.is_empty(),
        "off the expected cells:\n{}\n{matrix}",
        off.join("\n")
    );
}

/// `ORDER BY … LIMIT` whose keys tie at the cut (issue 18, item 7): the application's own
/// `top_referrers` has ties, so it used to be "nondeterministic", never compared. Now the
/// target's answer is accepted when legacy's statement could have given it, and a target
/// that cuts at the wrong value is a divergence.
#[tokio::test]
async fn answers_cut_inside_a_tie_group_are_compared_by_validity() {
    let s = setup(300, &["top_referrers"], |_| {}).await;
    let direct = s.db.client().await;
    let app = s.proxy.client(&s.db.name).await;
    // Is there a tie at the cut for some LIMIT? Find one, so the test proves something.
    let counts: Vec<i32> = direct
        .query(
            "SELECT level_1_referrals FROM affiliates WHERE level_1_referrals > 0
             ORDER BY level_1_referrals DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let cut = (1..counts.len())
        .find(|&n| counts[n - 1] == counts[n])
        .expect("a tie in the tree's counters") as i64;
    let top = "SELECT affiliate_id, level_1_referrals\nFROM affiliates\nWHERE level_1_referrals > 0\nORDER BY level_1_referrals DESC\nLIMIT $1";
    for limit in [cut, cut, 1, 3, cut] {
        app.query(top, &[&limit]).await.unwrap();
    }
    let st = settled(&direct, "top_referrers", 5).await;
    assert_eq!(
        (st["matched"], st["nondeterministic"], st["confirmed"]),
        (5, 0, 0),
        "{st:?}"
    );

    // A target that breaks the ties the other way: a limit where it returns other rows than
    // legacy does, so that only validity can call it a match.
    let other = "SELECT affiliate_id, level_1_referrals FROM affiliates WHERE level_1_referrals >= 1 ORDER BY level_1_referrals DESC LIMIT $1";
    let other_target = "SELECT affiliate_id, direct_referrals_count AS level_1_referrals FROM fature_v2.affiliates_optimized WHERE direct_referrals_count >= 1 ORDER BY direct_referrals_count DESC, affiliate_id DESC LIMIT $1";
    let ids = |sql: &'static str, n: i64| {
        let direct = &direct;
        async move {
            let mut ids: Vec<i64> = direct
                .query(sql, &[&n])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            ids.sort();
            ids
        }
    };
    let mut differing = None;
    for n in 1..counts.len() as i64 {
        if ids(other, n).await != ids(other_target, n).await {
            differing = Some(n);
            break;
        }
    }
    let n = differing.expect("a limit where the two sides pick other tied rows");
    for _ in 0..3 {
        app.query(other, &[&n]).await.unwrap();
    }
    let st = settled(&direct, "top_other_ties", 3).await;
    let skips: Vec<String> = s
        .proxy
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("cutover_comparisons_skipped_total"))
        .map(str::to_owned)
        .collect();
    assert_eq!((st["matched"], st["confirmed"]), (3, 0), "{st:?} {skips:?}");

    // Sorted the wrong way: not an answer legacy could give.
    let late = "SELECT affiliate_id, level_1_referrals FROM affiliates WHERE 1 < level_1_referrals ORDER BY level_1_referrals DESC LIMIT $1";
    for _ in 0..3 {
        app.query(late, &[&3i64]).await.unwrap();
    }
    let st = settled(&direct, "top_wrong_direction", 3).await;
    assert_eq!((st["matched"], st["confirmed"]), (0, 3), "{st:?}");
}

/// A read is handed to the shadow once the client has had its answer (its ReadyForQuery):
/// the comparison's statements never compete with the statement they compare. Until then
/// it is held — an execution flushed but not synced is not compared yet — and a session that
/// ends before its answer still has its read compared.
#[tokio::test]
async fn a_read_is_compared_after_its_answer_not_during_it() {
    use cutover::wire::{self, messages};
    use tokio::io::AsyncWriteExt;
    let s = setup(20, &["affiliate_by_id"], |_| {}).await;
    let compared = |m: &str| {
        ["match", "diverged", "error", "expected", "transient", "skipped"]
            .iter()
            .map(|outcome| {
                metric(
                    m,
                    &format!(
                        "cutover_comparisons_total{{query_type=\"affiliate_by_id\",outcome=\"{outcome}\"}}"
                    ),
                )
            })
            .sum::<f64>()
    };
    let counted_within = |want: f64| {
        let proxy = &s.proxy;
        async move {
            for _ in 0..100 {
                if compared(&proxy.metrics().await) >= want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }
    };
    async fn until(c: &mut tokio::net::TcpStream, tag: u8) {
        while support::next_message(c).await.0 != tag {}
    }
    let sql = "SELECT * FROM affiliates WHERE affiliate_id = $1";
    // Bind of the statement `s1` with the text parameter '3', Execute, Flush: its rows and
    // CommandComplete come back, its ReadyForQuery waits for a Sync.
    let flushed_execution = || {
        let mut out = wire::frame(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x013\0\0").to_vec();
        out.extend_from_slice(&wire::frame(b'E', b"\0\0\0\0\0"));
        out.extend_from_slice(&wire::frame(b'H', b""));
        out
    };
    let mut c = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    c.write_all(&support::startup_packet("postgres", &s.db.name))
        .await
        .unwrap();
    until(&mut c, b'Z').await;
    let mut out = messages::parse_frame(b"s1", sql, &[]).to_vec();
    out.extend_from_slice(&wire::frame(b'S', b""));
    c.write_all(&out).await.unwrap();
    until(&mut c, b'Z').await;

    c.write_all(&flushed_execution()).await.unwrap();
    until(&mut c, b'C').await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        compared(&s.proxy.metrics().await),
        0.0,
        "compared before its answer was complete"
    );
    c.write_all(&wire::frame(b'S', b"")).await.unwrap();
    until(&mut c, b'Z').await;
    assert!(counted_within(1.0).await, "compared once answered");

    // Executed, then the session ends before its Sync.
    c.write_all(&flushed_execution()).await.unwrap();
    until(&mut c, b'C').await;
    drop(c);
    assert!(
        counted_within(2.0).await,
        "a read whose session ended before its answer is compared too"
    );
}
