//! Running the model: answers, the two sides, and the checks at the end of a case.

use std::sync::OnceLock;

use tokio::sync::OnceCell;
use tokio_postgres::{
    Client, SimpleQueryMessage,
    types::{FromSql, ToSql, Type},
};

use super::{
    Driver, End, MASKED, Op, Phase, READ_TYPES, TREE, Tx, WRITE_TYPES,
    statements::{Statement, render},
};
use crate::{
    drivers,
    support::{self, SHARED_COLUMNS, TestDb},
};

/// What a client got for one statement. Rows as a multiset (sorted): none of the
/// statements orders its rows, so PostgreSQL itself promises no order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Rows(Vec<Vec<Option<String>>>),
    Count(u64),
    Error {
        code: String,
        message: String,
        schema: Option<String>,
        table: Option<String>,
        column: Option<String>,
        constraint: Option<String>,
        detail: Option<String>,
    },
    /// What else a driver said (psycopg's pipeline error), as it said it.
    Other(String),
}

/// Any column's raw binary value, as hex.
pub(crate) struct Raw(Option<String>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(hex::encode(raw))))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

pub(crate) fn error_answer(e: &tokio_postgres::Error) -> Answer {
    let Some(db) = e.as_db_error() else {
        panic!("not a server error: {e}");
    };
    Answer::Error {
        code: db.code().code().to_owned(),
        message: db.message().to_owned(),
        schema: db.schema().map(str::to_owned),
        table: db.table().map(str::to_owned),
        column: db.column().map(str::to_owned),
        constraint: db.constraint().map(str::to_owned),
        detail: db.detail().map(str::to_owned),
    }
}

/// Runs a statement and its further executions one after the other, as one answer: the rows
/// of all, or the sum of the counts; the first error ends it.
pub(crate) async fn run_many(client: &Client, s: &Statement, simple: bool) -> Answer {
    let mut answer = run(client, s, simple).await;
    for next in &s.more {
        answer = match (answer, run(client, next, simple).await) {
            (Answer::Rows(mut a), Answer::Rows(b)) => {
                a.extend(b);
                a.sort();
                Answer::Rows(a)
            }
            (Answer::Count(a), Answer::Count(b)) => Answer::Count(a + b),
            (error @ Answer::Error { .. }, _) => return error,
            (_, other) => other,
        };
    }
    answer
}

/// Runs one statement, in the simple or the extended protocol.
pub(crate) async fn run(client: &Client, s: &Statement, simple: bool) -> Answer {
    if simple {
        return match client.simple_query(&s.inline).await {
            Ok(messages) => {
                let mut rows = Vec::new();
                let mut count = 0;
                for m in &messages {
                    match m {
                        SimpleQueryMessage::Row(r) => rows.push(
                            (0..r.len())
                                .filter(|&i| !MASKED.contains(&r.columns()[i].name()))
                                .map(|i| r.get(i).map(str::to_owned))
                                .collect(),
                        ),
                        SimpleQueryMessage::CommandComplete(n) => count = *n,
                        _ => {}
                    }
                }
                if s.returns_rows {
                    rows.sort();
                    Answer::Rows(rows)
                } else {
                    Answer::Count(count)
                }
            }
            Err(e) => error_answer(&e),
        };
    }
    let params: Vec<&(dyn ToSql + Sync)> = s
        .params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    if s.returns_rows {
        match client.query(&s.sql, &params).await {
            Ok(rows) => {
                let mut rows: Vec<Vec<Option<String>>> = rows
                    .iter()
                    .map(|r| {
                        (0..r.len())
                            .filter(|&i| !MASKED.contains(&r.columns()[i].name()))
                            .map(|i| r.get::<_, Raw>(i).0)
                            .collect()
                    })
                    .collect();
                rows.sort();
                Answer::Rows(rows)
            }
            Err(e) => error_answer(&e),
        }
    } else {
        match client.execute(&s.sql, &params).await {
            Ok(n) => Answer::Count(n),
            Err(e) => error_answer(&e),
        }
    }
}

/// The first id a statement returned, if it returned one.
pub(crate) fn returned_id(answer: &Answer, textual: bool) -> Option<i64> {
    let Answer::Rows(rows) = answer else {
        return None;
    };
    let first = rows.first()?.first()?.as_deref()?;
    if textual {
        first.parse().ok()
    } else {
        let bytes = hex::decode(first).ok()?;
        Some(i64::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// One side's clients: tokio-postgres, and psycopg once a transaction asks for it.
pub(crate) struct Clients {
    tokio: Client,
    url: String,
    psycopg: Option<drivers::Psycopg>,
    /// The last id this side's inserts returned.
    last: i64,
}

impl Clients {
    fn new(tokio: Client, url: String) -> Self {
        Self {
            tokio,
            url,
            psycopg: None,
            last: 1,
        }
    }
}

/// The statements of a transaction (savepoints only inside an explicit one).
pub(crate) fn statements(tx: &Tx, last: i64, case: u64) -> Vec<(&Op, Statement)> {
    let explicit = !matches!(tx.end, End::Autocommit);
    tx.ops
        .iter()
        .filter(|op| explicit || !matches!(op, Op::Savepoint | Op::RollbackToSavepoint))
        .filter_map(|op| Some((op, render(op, last, case)?)))
        .collect()
}

/// Runs a transaction on one side; the answers in order.
pub(crate) async fn run_tx(clients: &mut Clients, tx: &Tx, case: u64) -> Vec<Answer> {
    match tx.driver.psycopg_mode() {
        None => run_tokio(clients, tx, case).await,
        Some(mode) => run_psycopg(clients, tx, mode, case).await,
    }
}

pub(crate) async fn run_tokio(clients: &mut Clients, tx: &Tx, case: u64) -> Vec<Answer> {
    let client = &clients.tokio;
    let simple = tx.driver == Driver::TokioSimple;
    let mut answers = Vec::new();
    let explicit = !matches!(tx.end, End::Autocommit);
    if explicit {
        client.batch_execute("BEGIN").await.unwrap();
    }
    for (op, s) in statements(tx, clients.last, case) {
        let answer = run_many(client, &s, simple).await;
        if matches!(op, Op::New { .. } | Op::ManyNew { .. })
            && let Some(id) = returned_id(&answer, simple)
        {
            clients.last = id;
        }
        answers.push(answer);
    }
    if explicit {
        let end = match tx.end {
            End::Commit => "COMMIT",
            _ => "ROLLBACK",
        };
        // After an error COMMIT answers ROLLBACK: both sides alike.
        answers.push(match client.simple_query(end).await {
            Ok(_) => Answer::Count(0),
            Err(e) => error_answer(&e),
        });
    }
    answers
}

/// A transaction through psycopg. The id a New returns is read from its answer after the
/// whole transaction (psycopg gets it in one go): statements after it in the same
/// transaction name the id of the transaction before.
pub(crate) async fn run_psycopg(
    clients: &mut Clients,
    tx: &Tx,
    mode: &str,
    case: u64,
) -> Vec<Answer> {
    let statements = statements(tx, clients.last, case);
    let json = serde_json::json!({
        "mode": mode,
        "begin": !matches!(tx.end, End::Autocommit),
        "end": match tx.end {
            End::Commit => Some("COMMIT"),
            End::Rollback => Some("ROLLBACK"),
            End::Autocommit => None,
        },
        "statements": statements.iter().map(|(_, s)| serde_json::json!({
            "sql": s.sql,
            "params": std::iter::once(s).chain(&s.more).map(|e| e.json.clone()).collect::<Vec<_>>(),
            "returns": s.returns_rows,
        })).collect::<Vec<_>>(),
    });
    let url = clients.url.clone();
    let driver = clients
        .psycopg
        .get_or_insert_with(|| drivers::Psycopg::connect(&url));
    let answers: Vec<Answer> = driver.run(&json).await.iter().map(psycopg_answer).collect();
    for ((op, _), answer) in statements.iter().zip(&answers) {
        if matches!(op, Op::New { .. } | Op::ManyNew { .. })
            && let Some(id) = returned_id(answer, true)
        {
            clients.last = id;
        }
    }
    answers
}

/// A psycopg answer as the model's.
pub(crate) fn psycopg_answer(v: &serde_json::Value) -> Answer {
    let field = |e: &serde_json::Value, k: &str| e[k].as_str().map(str::to_owned);
    if let Some(rows) = v["rows"].as_array() {
        Answer::Rows(
            rows.iter()
                .map(|r| {
                    r.as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| c.as_str().map(str::to_owned))
                        .collect()
                })
                .collect(),
        )
    } else if let Some(n) = v["count"].as_i64() {
        Answer::Count(n as u64)
    } else if v["error"].is_object() {
        let e = &v["error"];
        Answer::Error {
            code: field(e, "code").unwrap_or_default(),
            message: field(e, "message").unwrap_or_default(),
            schema: field(e, "schema"),
            table: field(e, "table"),
            column: field(e, "column"),
            constraint: field(e, "constraint"),
            detail: field(e, "detail"),
        }
    } else {
        Answer::Other(v.to_string())
    }
}

/// The first column of every row `sql` returns.
pub(crate) async fn first_column<T: for<'a> FromSql<'a>>(client: &Client, sql: &str) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The legacy table, every column but the masked ones, in key order.
pub(crate) async fn legacy_rows(client: &Client) -> Vec<String> {
    first_column(
        client,
        "SELECT format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s', affiliate_id,
                parent_affiliate_id, external_id, name, email, status, level_1_referrals,
                total_deposits, total_bets, total_withdrawals, total_cpa_earned,
                total_rev_earned, total_commissions_paid)
         FROM public.affiliates ORDER BY affiliate_id",
    )
    .await
}

/// Keys whose row v2 does not hold as legacy does in one database (every shared column,
/// timestamps included, and legacy's counter against the one v2 carries); empty when level.
pub(crate) async fn v2_drift(client: &Client) -> Vec<i64> {
    let legacy = format!("SELECT {SHARED_COLUMNS}, level_1_referrals FROM public.affiliates");
    let v2 = format!(
        "SELECT {SHARED_COLUMNS}, legacy_level_1_referrals FROM fature_v2.affiliates_optimized"
    );
    first_column(
        client,
        &format!(
            "SELECT affiliate_id FROM (({legacy}) EXCEPT ({v2})) l
             UNION
             SELECT affiliate_id FROM (({v2}) EXCEPT ({legacy})) v
             ORDER BY 1"
        ),
    )
    .await
}

/// v2's derived columns against the truth recomputed from its parent links.
pub(crate) async fn v2_derived_wrong(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM fature_v2.affiliates_optimized a
             WHERE a.direct_referrals_count <> (SELECT count(*) FROM fature_v2.affiliates_optimized c
                                                 WHERE c.parent_affiliate_id = a.affiliate_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

pub(crate) async fn set_stages(client: &Client, phase: &Phase) {
    let mut sql = String::from("BEGIN;");
    let writes = WRITE_TYPES.iter().zip(&phase.write_stages).map(|(t, s)| {
        if phase.writes_at_target {
            (t, ("target", 100))
        } else {
            (t, *s)
        }
    });
    let reads = READ_TYPES.iter().zip(phase.read_stages.iter().copied());
    for (name, (stage, percent)) in writes.chain(reads) {
        sql.push_str(&format!(
            "INSERT INTO cutover.query_type_state (query_type, stage, percent)
             VALUES ('{name}', '{stage}', {percent})
             ON CONFLICT (query_type) DO UPDATE SET stage = EXCLUDED.stage, percent = EXCLUDED.percent;"
        ));
    }
    sql.push_str("COMMIT;");
    client.batch_execute(&sql).await.unwrap();
}

/// The tree every case copies: migrated, generated, backfilled.
pub(crate) async fn base() -> &'static TestDb {
    static BASE: OnceCell<TestDb> = OnceCell::const_new();
    BASE.get_or_init(|| support::tree_db(TREE as u64)).await
}

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static TRANSACTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Transactions run so far by this process (each on both sides).
#[allow(dead_code)] // the long run's (benches/safe_cutover.rs)
pub(crate) fn transactions_run() -> u64 {
    TRANSACTIONS.load(std::sync::atomic::Ordering::Relaxed)
}

pub(crate) async fn check_case(phases: &[Phase]) -> Result<(), String> {
    let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = base().await;
    let direct_db = support::clone_db(base).await;
    let proxied_db = support::clone_db(base).await;
    let rules = support::rules_with(&[], "");
    let proxy = support::proxy_on(&proxied_db, &rules, |_| {}).await;
    let control = proxied_db.client().await;
    let mut direct = Clients::new(direct_db.client().await, direct_db.url());
    let mut through = Clients::new(
        proxy.client(&proxied_db.name).await,
        proxy.url(&proxied_db.name),
    );

    let mut result = Ok(());
    'phases: for (p, phase) in phases.iter().enumerate() {
        set_stages(&control, phase).await;
        for (t, tx) in phase.txs.iter().enumerate() {
            TRANSACTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let want = run_tx(&mut direct, tx, case).await;
            let got = run_tx(&mut through, tx, case).await;
            if want != got {
                result = Err(format!(
                    "phase {p} transaction {t}: answers differ\n directly: {want:?}\n through cutover: {got:?}"
                ));
                break 'phases;
            }
        }
    }
    if result.is_ok() {
        let (want, got) = (
            legacy_rows(&direct.tokio).await,
            legacy_rows(&control).await,
        );
        if want != got {
            let diff: Vec<_> = want
                .iter()
                .zip(&got)
                .filter(|(a, b)| a != b)
                .take(5)
                .collect();
            result = Err(format!(
                "legacy differs from legacy alone ({} vs {} rows): {diff:?}",
                want.len(),
                got.len()
            ));
        }
    }
    if result.is_ok() {
        let drift = v2_drift(&control).await;
        let wrong = v2_derived_wrong(&control).await;
        if !drift.is_empty() || wrong != 0 {
            result = Err(format!(
                "v2 is not level with legacy: {drift:?}; {wrong} wrong counters"
            ));
        }
    }
    drop((direct, through, control));
    proxy.shutdown().await;
    result
}
