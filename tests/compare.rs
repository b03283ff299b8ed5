//! Comparison on real answers from PostgreSQL (binary format): what must match matches, what
//! must not does not.

mod support;

use cutover::routing::classify::determinism::{self, Order};
use cutover::shadow::compare::{Answer, Options, Verdict, compare};

async fn answer(client: &tokio_postgres::Client, sql: &str) -> Answer {
    let stmt = client.prepare(sql).await.unwrap();
    let rows = client.query(&stmt, &[]).await.unwrap();
    Answer::from_rows(stmt.columns(), &rows)
}

fn order_of(sql: &str) -> Order {
    match determinism::analyze(&cutover::routing::fingerprint::parse(sql).unwrap(), &["id"]) {
        determinism::Determinism::Determined(order) => order,
        other => panic!("{sql}: {other:?}"),
    }
}

#[tokio::test]
async fn scale_width_and_unordered_row_order_do_not_make_a_divergence() {
    let db = support::empty_db().await;
    let c = db.client().await;
    let o = Options::default();
    let pairs = [
        (
            "SELECT 10.5::numeric AS x",
            "SELECT 10.50::numeric(10,2) AS x",
        ),
        ("SELECT 7::int4 AS n", "SELECT 7::int8 AS n"),
        ("SELECT 3::int8 AS n", "SELECT 3.000::numeric AS n"),
        (
            "SELECT * FROM (VALUES (1, 'a'), (2, 'b'), (3, 'c')) v(id, s)",
            "SELECT * FROM (VALUES (3, 'c'), (1, 'a'), (2, 'b')) v(id, s)",
        ),
        (
            "SELECT '{\"a\":1,\"b\":[1,2]}'::jsonb AS j",
            "SELECT '{\"b\": [1, 2], \"a\": 1}'::json AS j",
        ),
        (
            "SELECT ARRAY[1,2,3]::int4[] AS a",
            "SELECT ARRAY[1,2,3]::int8[] AS a",
        ),
        (
            "SELECT NULL::text AS t, 'x' AS u",
            "SELECT NULL::varchar AS t, 'x'::varchar AS u",
        ),
        (
            "SELECT '2024-01-02 03:04:05'::timestamp AS at",
            "SELECT '2024-01-02 03:04:05.000'::timestamp AS at",
        ),
    ];
    for (a, b) in pairs {
        let (x, y) = (answer(&c, a).await, answer(&c, b).await);
        assert_eq!(
            compare(&x, &y, &order_of(a), &o),
            Verdict::Match,
            "{a} vs {b}"
        );
    }
    let differ = [
        ("SELECT 10.5::numeric AS x", "SELECT 10.51::numeric AS x"),
        ("SELECT NULL::text AS t", "SELECT ''::text AS t"),
        ("SELECT 1 AS id UNION ALL SELECT 1", "SELECT 1 AS id"),
        (
            "SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v(id, s) ORDER BY id",
            "SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v(id, s) ORDER BY id DESC",
        ),
        ("SELECT 1 AS a", "SELECT 1 AS b"),
    ];
    for (a, b) in differ {
        let (x, y) = (answer(&c, a).await, answer(&c, b).await);
        assert!(
            matches!(compare(&x, &y, &order_of(a), &o), Verdict::Diverged(_)),
            "{a} vs {b}"
        );
    }
}
