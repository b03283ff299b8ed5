//! Every read query type of rules/fature.toml answers the same on legacy and on its target
//! SQL (explicit, or rewritten), on a generated tree copied into v2 through v2's own
//! triggers, for roots, leaves, deep nodes, missing ids and every status.

mod support;

use std::{path::PathBuf, time::SystemTime};

use cutover::{
    demo::fixture::{self, TreeSpec},
    routing::rewrite::{Rewrite, Rewriter},
    routing::rules::{QueryType, RuleSet},
};
use tokio_postgres::{Client, Row, types::ToSql};

fn rules() -> RuleSet {
    RuleSet::load_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules")).unwrap()
}

/// A column's raw bytes as the server sent them.
fn raw(row: &Row, i: usize) -> Option<Vec<u8>> {
    cutover::shadow::compare::raw_column(row, i).map(<[u8]>::to_vec)
}

type Answer = (Vec<(String, String)>, Vec<Vec<Option<Vec<u8>>>>);

async fn answer(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Answer {
    let stmt = client
        .prepare(sql)
        .await
        .unwrap_or_else(|e| panic!("prepare {sql}: {e}"));
    let rows = client
        .query(&stmt, params)
        .await
        .unwrap_or_else(|e| panic!("run {sql}: {e}"));
    let columns = stmt
        .columns()
        .iter()
        .map(|c| (c.name().to_owned(), c.type_().name().to_owned()))
        .collect();
    let rows = rows
        .iter()
        .map(|r| (0..r.len()).map(|i| raw(r, i)).collect())
        .collect();
    (columns, rows)
}

fn target_sql(qt: &QueryType, rewriter: &Rewriter, legacy_sql: &str) -> String {
    match &qt.target_sql {
        Some(t) => t.clone(),
        None => match rewriter.rewrite(legacy_sql) {
            Rewrite::Target(t) => t,
            Rewrite::NotRoutable(why) => panic!("{}: not routable: {why}", qt.name),
        },
    }
}

async fn compare(
    client: &Client,
    qt: &QueryType,
    legacy_sql: &str,
    target: &str,
    params: &[&(dyn ToSql + Sync)],
) {
    let (legacy_cols, mut legacy_rows) = answer(client, legacy_sql, params).await;
    let (target_cols, mut target_rows) = answer(client, target, params).await;
    assert_eq!(legacy_cols, target_cols, "{}: columns", qt.name);
    let ordered = legacy_sql.to_uppercase().contains("ORDER BY");
    if qt.name == "top_referrers" {
        // LIMIT over ties: only the ordering key's sequence is determined.
        let key = |rows: &Vec<Vec<Option<Vec<u8>>>>| {
            rows.iter().map(|r| r[1].clone()).collect::<Vec<_>>()
        };
        assert_eq!(key(&legacy_rows), key(&target_rows), "{}", qt.name);
        return;
    }
    if !ordered {
        legacy_rows.sort();
        target_rows.sort();
    }
    assert_eq!(
        legacy_rows,
        target_rows,
        "{} with {} params",
        qt.name,
        params.len()
    );
}

/// A database with a generated tree in legacy and the same rows in v2 (through v2's
/// triggers).
async fn both_sides() -> (support::TestDb, Client) {
    let db = support::migrated_db().await;
    let client = db.client().await;
    fixture::load(&client, &TreeSpec::clean(3000))
        .await
        .unwrap();
    support::copy_legacy_into_target(&client).await;
    (db, client)
}

type WriteAnswer = Result<(Vec<Vec<Option<Vec<u8>>>>, Option<u64>), String>;

/// A write's answer — RETURNING rows and the affected-row count — inside a savepoint
/// rolled back after, with the id sequence put back (sequences ignore rollbacks).
async fn write_answer(client: &Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> WriteAnswer {
    use futures_util::TryStreamExt;
    client.batch_execute("SAVEPOINT w").await.unwrap();
    let sequence = support::id_sequence(client).await;
    let result = async {
        let stream = client.query_raw(sql, params.iter().copied()).await?;
        futures_util::pin_mut!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await? {
            rows.push((0..row.len()).map(|i| raw(&row, i)).collect());
        }
        Ok::<_, tokio_postgres::Error>((rows, stream.rows_affected()))
    }
    .await
    .map_err(|e| e.to_string());
    client
        .batch_execute("ROLLBACK TO SAVEPOINT w")
        .await
        .unwrap();
    support::restore_id_sequence(client, sequence).await;
    result
}

#[tokio::test]
async fn every_write_query_type_answers_the_same_on_both_sides() {
    let (_db, client) = both_sides().await;
    let rules = rules();
    let classifier =
        cutover::routing::classify::Classifier::new(std::sync::Arc::new(rules.clone()));
    let (root, leaf, middle): (i64, i64, i64) = (1, 3000, 1500);
    let amount: rust_decimal::Decimal = "10.25".parse().unwrap();
    let (ext_new, ext_old) = ("brand-new".to_owned(), "aff-00000010".to_owned());
    let (name, email, status) = (
        "Nova".to_owned(),
        "nova@example.com".to_owned(),
        "suspended".to_owned(),
    );
    let mut compared = 0;
    client.batch_execute("BEGIN").await.unwrap();
    for qt in &rules.query_types {
        let Some(legacy_sql) = &qt.example_sql else {
            continue;
        };
        let upper = legacy_sql.trim_start().to_uppercase();
        if upper.starts_with("SELECT") || upper.starts_with("WITH") {
            continue;
        }
        let cases: Vec<Vec<&(dyn ToSql + Sync)>> = match qt.name.as_str() {
            "new_affiliate" => vec![
                vec![&root, &ext_new, &name, &email],
                vec![&leaf, &ext_new, &name, &email],
            ],
            "bump_parent_referrals" | "delete_affiliate" => {
                vec![vec![&root], vec![&leaf], vec![&middle]]
            }
            "record_deposit" => vec![vec![&amount, &leaf], vec![&amount, &root]],
            "set_status" => vec![vec![&status, &middle]],
            "move_affiliate" => vec![vec![&root, &leaf], vec![&middle, &leaf]],
            "upsert_by_external_id" => {
                vec![vec![&ext_new, &name, &email], vec![&ext_old, &name, &email]]
            }
            other => panic!("no parameter values for write query type {other}"),
        };
        let cutover::routing::classify::Classification::Typed(t) =
            &*classifier.classify(legacy_sql)
        else {
            panic!("{} not classified", qt.name)
        };
        let Rewrite::Target(target) = &t.route else {
            panic!("{}: not routable: {:?}", qt.name, t.route)
        };
        for params in cases {
            let legacy = write_answer(&client, legacy_sql, &params).await;
            let ours = write_answer(&client, target, &params).await;
            assert!(legacy.is_ok(), "{}: {legacy:?}", qt.name);
            assert_eq!(
                ours, legacy,
                "{}\nlegacy: {legacy_sql}\ntarget: {target}",
                qt.name
            );
            compared += 1;
        }
    }
    client.batch_execute("ROLLBACK").await.unwrap();
    assert!(compared >= 13, "{compared}");
}

#[tokio::test]
async fn every_read_query_type_answers_the_same_on_both_sides() {
    let (_db, client) = both_sides().await;

    // Roots, a middle node, the deepest nodes, leaves, a missing id.
    let mut ids: Vec<i64> = vec![1, 2, 150, 1500, 3000, 1_000_000_000];
    for r in client
        .query(
            "(SELECT affiliate_id FROM fature_v2.affiliates_optimized ORDER BY hierarchy_level DESC, affiliate_id LIMIT 3)
             UNION ALL
             (SELECT affiliate_id FROM fature_v2.affiliates_optimized WHERE direct_referrals_count = 0 ORDER BY affiliate_id LIMIT 2)
             UNION ALL
             (SELECT affiliate_id FROM fature_v2.affiliates_optimized ORDER BY direct_referrals_count DESC, affiliate_id LIMIT 2)",
            &[],
        )
        .await
        .unwrap()
    {
        ids.push(r.get(0));
    }
    let depths: [i32; 5] = [0, 1, 2, 5, 100];
    let limits: [i64; 3] = [1, 5, 50];
    let external: Vec<String> = ids.iter().map(|id| format!("aff-{id:08}")).collect();
    let year =
        |y: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs((y - 1970) * 365 * 86_400);
    let times = [year(1990), year(2023), year(2030)];

    let rules = rules();
    let rewriter = Rewriter::new(&rules.table);
    let mut compared = 0;
    for qt in &rules.query_types {
        let Some(legacy_sql) = qt.example_sql.clone() else {
            continue;
        };
        let upper = legacy_sql.trim_start().to_uppercase();
        if !(upper.starts_with("SELECT") || upper.starts_with("WITH")) {
            continue;
        }
        let target = target_sql(qt, &rewriter, &legacy_sql);
        let stmt = client.prepare(&legacy_sql).await.unwrap();
        let types: Vec<String> = stmt.params().iter().map(|t| t.name().to_owned()).collect();
        match types
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            [] => {
                // Literal variants of the same statement (the simple protocol's way).
                for status in ["active", "inactive", "suspended", "banned", "nope"] {
                    let legacy = legacy_sql.replace("'active'", &format!("'{status}'"));
                    let target = target_sql(qt, &rewriter, &legacy);
                    compare(&client, qt, &legacy, &target, &[]).await;
                    compared += 1;
                }
            }
            ["int8"] if qt.name == "top_referrers" => {
                for l in &limits {
                    compare(&client, qt, &legacy_sql, &target, &[l]).await;
                    compared += 1;
                }
            }
            ["int8"] => {
                for id in &ids {
                    compare(&client, qt, &legacy_sql, &target, &[id]).await;
                    compared += 1;
                }
            }
            ["int8", "int4"] => {
                for id in &ids {
                    for d in &depths {
                        compare(&client, qt, &legacy_sql, &target, &[id, d]).await;
                        compared += 1;
                    }
                }
            }
            ["varchar"] | ["text"] => {
                for e in external.iter().chain([&"missing".to_owned()]) {
                    compare(&client, qt, &legacy_sql, &target, &[e]).await;
                    compared += 1;
                }
            }
            ["timestamp"] => {
                for t in &times {
                    compare(&client, qt, &legacy_sql, &target, &[t]).await;
                    compared += 1;
                }
            }
            other => panic!("{}: no parameter values for {other:?}", qt.name),
        }
    }
    assert!(compared > 150, "{compared} comparisons");

    // The simple protocol's way: literals where the rules have parameters, classified and
    // routed as the proxy will (an explicit target takes the statement's values).
    let classifier =
        cutover::routing::classify::Classifier::new(std::sync::Arc::new(rules.clone()));
    let mut literal = 0;
    for qt in rules.query_types.iter().filter(|q| q.target_sql.is_some()) {
        let Some(example) = &qt.example_sql else {
            continue;
        };
        if !example.trim_start().to_uppercase().starts_with(['S', 'W']) {
            continue;
        }
        for id in &ids {
            for d in &depths {
                let sql = example
                    .replace("$1", &id.to_string())
                    .replace("$2", &d.to_string());
                let sql = if qt.name == "top_referrers" {
                    example.replace("$1", "7")
                } else {
                    sql
                };
                let cutover::routing::classify::Classification::Typed(t) =
                    &*classifier.classify(&sql)
                else {
                    panic!("{sql} was not classified");
                };
                assert_eq!(t.query_type, qt.name);
                let Rewrite::Target(target) = &t.route else {
                    panic!("{}: {:?}", qt.name, t.route);
                };
                compare(&client, qt, &sql, target, &[]).await;
                literal += 1;
            }
        }
    }
    assert!(literal > 100, "{literal} literal comparisons");
}
