//! Safe cutover (docs/routing.md, "The invariant"): in any stage and any mix of stages, the
//! answers a client gets and the final content of both tables are what legacy alone gives.
//!
//! The model: the same generated transactions run directly on one copy of a tree and
//! through the proxy on another; every answer (rows, counts, error fields) must be the same,
//! and at the end legacy must be the same in both copies and v2 level with legacy in the
//! proxied one. Transactions are generated from the application's statement mix plus
//! statements no rule names (multi-row INSERT … RETURNING, UPDATE … FROM, DELETE …
//! RETURNING, locking reads), with savepoints, rollbacks and errors (duplicate external
//! ids), in both protocols; stages are drawn per phase (every write type at `target` half of
//! the time) and change between phases; each case starts a new proxy, so first executions
//! meet route checks that are not in yet. A failure prints proptest's shortest case.
//!
//! `CUTOVER_MODEL_CASES` sets the number of cases (default 12); a long run is
//! `CUTOVER_MODEL_CASES=1000 cargo test --release --test safe_cutover any_mix`.

mod support;

use std::{sync::OnceLock, time::Duration};

use proptest::prelude::*;
use rust_decimal::Decimal;
use support::{SHARED_COLUMNS, TestDb};
use tokio::sync::OnceCell;
use tokio_postgres::{
    Client, SimpleQueryMessage,
    types::{FromSql, ToSql, Type},
};

/// Affiliates in the tree each case starts from.
const TREE: i64 = 60;

/// Named write types (all of them move to `target` together for the write side to flip).
const WRITE_TYPES: &[&str] = &[
    "new_affiliate",
    "bump_parent_referrals",
    "record_deposit",
    "set_status",
    "move_affiliate",
    "delete_affiliate",
    "upsert_by_external_id",
];
const READ_TYPES: &[&str] = &[
    "affiliate_by_id",
    "affiliate_by_external_id",
    "count_active",
    "top_referrers",
    "direct_referrals",
    "network_size",
    "network_by_level",
    "upline",
    "financial_summary",
    "registrations_per_day",
];

/// Columns whose values differ between the two copies for reasons outside the proxy:
/// `now()` at different instants, and the derived counter that v2 serves as its true count
/// (a declared difference: rules' `counter_drift`).
const MASKED: &[&str] = &[
    "registration_date",
    "created_at",
    "updated_at",
    "level_1_referrals",
];

// ------------------------------------------------------------------------------------------
// The generated workload
// ------------------------------------------------------------------------------------------

/// An affiliate a statement names: one of the tree's, or the last one this case inserted.
#[derive(Debug, Clone, Copy)]
enum Key {
    Tree(i64),
    Last,
}

#[derive(Debug, Clone)]
enum Op {
    New { parent: i64, ext: u8 },
    Deposit { key: Key, cents: i64 },
    Status { key: Key, banned: bool },
    Bump { key: Key },
    Move { key: i64, parent: i64 },
    DeleteLeaf { key: Key },
    DeleteReturning { key: Key },
    Upsert { ext: u8, name: u8 },
    MultiInsert { parent: i64, ext: u8 },
    UpdateFrom { parent: Key },
    LockRead { key: Key },
    Read { key: Key },
    Downline { key: i64 },
    Savepoint,
    RollbackToSavepoint,
}

#[derive(Debug, Clone, Copy)]
enum End {
    Commit,
    Rollback,
    /// No BEGIN: each statement on its own.
    Autocommit,
}

#[derive(Debug, Clone)]
struct Tx {
    ops: Vec<Op>,
    end: End,
    simple: bool,
}

#[derive(Debug, Clone)]
struct Phase {
    /// Every write type at `target` (the table's write side is the target).
    writes_at_target: bool,
    /// Stages of the write types otherwise, and of the read types: (stage, percent).
    write_stages: Vec<(&'static str, i16)>,
    read_stages: Vec<(&'static str, i16)>,
    txs: Vec<Tx>,
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![(1..=TREE).prop_map(Key::Tree), Just(Key::Last)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..=TREE, 0u8..12).prop_map(|(parent, ext)| Op::New { parent, ext }),
        3 => (key(), 1i64..500).prop_map(|(key, cents)| Op::Deposit { key, cents }),
        1 => (key(), any::<bool>()).prop_map(|(key, banned)| Op::Status { key, banned }),
        2 => key().prop_map(|key| Op::Bump { key }),
        // Parent below the key: no cycle (v2 refuses them: a declared behaviour change).
        1 => (2..=TREE).prop_flat_map(|key| (Just(key), 1..key))
            .prop_map(|(key, parent)| Op::Move { key, parent }),
        1 => key().prop_map(|key| Op::DeleteLeaf { key }),
        1 => key().prop_map(|key| Op::DeleteReturning { key }),
        1 => (0u8..12, any::<u8>()).prop_map(|(ext, name)| Op::Upsert { ext, name }),
        1 => (1..=TREE, 0u8..12).prop_map(|(parent, ext)| Op::MultiInsert { parent, ext }),
        1 => key().prop_map(|parent| Op::UpdateFrom { parent }),
        2 => key().prop_map(|key| Op::LockRead { key }),
        2 => key().prop_map(|key| Op::Read { key }),
        1 => (1..=TREE).prop_map(|key| Op::Downline { key }),
        1 => Just(Op::Savepoint),
        1 => Just(Op::RollbackToSavepoint),
    ]
}

fn tx() -> impl Strategy<Value = Tx> {
    (
        prop::collection::vec(op(), 1..6),
        prop_oneof![
            3 => Just(End::Commit),
            1 => Just(End::Rollback),
            1 => Just(End::Autocommit)
        ],
        any::<bool>(),
    )
        .prop_map(|(ops, end, simple)| Tx { ops, end, simple })
}

fn stage() -> impl Strategy<Value = (&'static str, i16)> {
    prop_oneof![
        Just(("shadow", 0)),
        Just(("cutover", 50)),
        Just(("target", 100))
    ]
}

fn phase() -> impl Strategy<Value = Phase> {
    (
        any::<bool>(),
        prop::collection::vec(stage(), WRITE_TYPES.len()),
        prop::collection::vec(stage(), READ_TYPES.len()),
        prop::collection::vec(tx(), 1..7),
    )
        .prop_map(|(writes_at_target, write_stages, read_stages, txs)| Phase {
            writes_at_target,
            write_stages,
            read_stages,
            txs,
        })
}

// ------------------------------------------------------------------------------------------
// Running it
// ------------------------------------------------------------------------------------------

/// What a client got for one statement. Rows as a multiset (sorted): none of the
/// statements orders its rows, so PostgreSQL itself promises no order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Rows(Vec<Vec<Option<String>>>),
    Count(u64),
    Error {
        code: String,
        message: String,
        schema: Option<String>,
        table: Option<String>,
        column: Option<String>,
        constraint: Option<String>,
    },
}

/// Any column's raw binary value, as hex.
struct Raw(Option<String>);

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

fn error_answer(e: &tokio_postgres::Error) -> Answer {
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
    }
}

/// A statement, as SQL with `$n` parameters and as SQL with its values inline.
struct Statement {
    sql: String,
    inline: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    returns_rows: bool,
}

/// The SQL of a rule-named query type: its rule's example, the application's own statement
/// (`../shared/workloads/fature_app.sql`), so the model cannot drift from what the rules name.
fn rule_sql(name: &str) -> &'static str {
    static RULES: OnceLock<cutover::rules::RuleSet> = OnceLock::new();
    RULES
        .get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
            cutover::rules::RuleSet::load_dir(&dir).expect("the customer's rules are valid")
        })
        .named(name)
        .and_then(|q| q.example_sql.as_deref())
        .unwrap_or_else(|| panic!("no rule {name} with an example"))
}

fn statement(
    sql: &str,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
    literals: &[String],
    returns_rows: bool,
) -> Statement {
    let mut inline = sql.to_owned();
    // Highest first: $10 before $1.
    for (i, literal) in literals.iter().enumerate().rev() {
        inline = inline.replace(&format!("${}", i + 1), literal);
    }
    Statement {
        sql: sql.to_owned(),
        inline,
        params,
        returns_rows,
    }
}

/// A statement whose one parameter is an affiliate id.
fn by_id(sql: &str, id: i64, returns_rows: bool) -> Statement {
    statement(sql, vec![Box::new(id)], &[id.to_string()], returns_rows)
}

fn text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The statement of an op (`last`: the last id this case inserted).
fn render(op: &Op, last: i64, case: u64) -> Option<Statement> {
    let id = |k: &Key| match k {
        Key::Tree(id) => *id,
        Key::Last => last,
    };
    let ext = |e: u8| format!("model-{case}-{e}");
    Some(match op {
        Op::New { parent, ext: e } => statement(
            rule_sql("new_affiliate"),
            vec![
                Box::new(*parent),
                Box::new(ext(*e)),
                Box::new(format!("name {e}")),
                Box::new(format!("m{e}@example.com")),
            ],
            &[
                parent.to_string(),
                text(&ext(*e)),
                text(&format!("name {e}")),
                text(&format!("m{e}@example.com")),
            ],
            true,
        ),
        Op::Deposit { key, cents } => {
            let amount = Decimal::new(*cents, 2);
            statement(
                rule_sql("record_deposit"),
                vec![Box::new(amount), Box::new(id(key))],
                &[amount.to_string(), id(key).to_string()],
                false,
            )
        }
        Op::Status { key, banned } => {
            let status = if *banned { "banned" } else { "active" };
            statement(
                rule_sql("set_status"),
                vec![Box::new(status.to_owned()), Box::new(id(key))],
                &[text(status), id(key).to_string()],
                false,
            )
        }
        Op::Bump { key } => by_id(rule_sql("bump_parent_referrals"), id(key), false),
        Op::Move { key, parent } => statement(
            rule_sql("move_affiliate"),
            vec![Box::new(*parent), Box::new(*key)],
            &[parent.to_string(), key.to_string()],
            false,
        ),
        // Only leaves created by the case: v2 detaches the children of a deleted affiliate
        // (a declared behaviour change), and the tree's ids must stay parents for moves.
        Op::DeleteLeaf { key } if id(key) > TREE => {
            by_id(rule_sql("delete_affiliate"), id(key), false)
        }
        Op::DeleteReturning { key } if id(key) > TREE => statement(
            "DELETE FROM affiliates AS a WHERE a.affiliate_id = $1
AND NOT EXISTS (SELECT 1 FROM affiliates c WHERE c.parent_affiliate_id = a.affiliate_id)
RETURNING a.affiliate_id, a.name, a.total_deposits",
            vec![Box::new(id(key))],
            &[id(key).to_string()],
            true,
        ),
        Op::DeleteLeaf { .. } | Op::DeleteReturning { .. } => return None,
        Op::Upsert { ext: e, name } => statement(
            rule_sql("upsert_by_external_id"),
            vec![
                Box::new(ext(*e)),
                Box::new(format!("upserted {name}")),
                Box::new(format!("u{name}@example.com")),
            ],
            &[
                text(&ext(*e)),
                text(&format!("upserted {name}")),
                text(&format!("u{name}@example.com")),
            ],
            false,
        ),
        Op::MultiInsert { parent, ext: e } => statement(
            "INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)
VALUES ($1, $2, 'multi a', now()), ($1, $3, 'multi b', now())
RETURNING affiliate_id, name, status, total_deposits",
            vec![
                Box::new(*parent),
                Box::new(format!("{}-a", ext(*e))),
                Box::new(format!("{}-b", ext(*e))),
            ],
            &[
                parent.to_string(),
                text(&format!("{}-a", ext(*e))),
                text(&format!("{}-b", ext(*e))),
            ],
            true,
        ),
        Op::UpdateFrom { parent } => statement(
            "UPDATE affiliates AS a SET total_bets = a.total_bets + 1
FROM affiliates AS p
WHERE a.parent_affiliate_id = p.affiliate_id AND p.affiliate_id = $1
RETURNING a.affiliate_id, a.total_bets",
            vec![Box::new(id(parent))],
            &[id(parent).to_string()],
            true,
        ),
        Op::LockRead { key } => by_id(
            "SELECT affiliate_id, status, total_deposits FROM affiliates WHERE affiliate_id = $1 FOR UPDATE",
            id(key),
            true,
        ),
        Op::Read { key } => by_id(rule_sql("affiliate_by_id"), id(key), true),
        Op::Downline { key } => statement(
            rule_sql("network_size"),
            vec![Box::new(*key), Box::new(3i32)],
            &[key.to_string(), "3".into()],
            true,
        ),
        Op::Savepoint => statement("SAVEPOINT model", vec![], &[], false),
        Op::RollbackToSavepoint => statement("ROLLBACK TO SAVEPOINT model", vec![], &[], false),
    })
}

/// Runs one statement, in the simple or the extended protocol.
async fn run(client: &Client, s: &Statement, simple: bool) -> Answer {
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
fn returned_id(answer: &Answer, simple: bool) -> Option<i64> {
    let Answer::Rows(rows) = answer else {
        return None;
    };
    let first = rows.first()?.first()?.as_deref()?;
    if simple {
        first.parse().ok()
    } else {
        let bytes = hex::decode(first).ok()?;
        Some(i64::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// Runs a transaction on a client; the answers in order.
async fn run_tx(client: &Client, tx: &Tx, last: &mut i64, case: u64) -> Vec<Answer> {
    let mut answers = Vec::new();
    let explicit = !matches!(tx.end, End::Autocommit);
    if explicit {
        client.batch_execute("BEGIN").await.unwrap();
    }
    for op in &tx.ops {
        if !explicit && matches!(op, Op::Savepoint | Op::RollbackToSavepoint) {
            continue;
        }
        let Some(s) = render(op, *last, case) else {
            continue;
        };
        let answer = run(client, &s, tx.simple).await;
        if matches!(op, Op::New { .. })
            && let Some(id) = returned_id(&answer, tx.simple)
        {
            *last = id;
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

/// The first column of every row `sql` returns.
async fn first_column<T: for<'a> FromSql<'a>>(client: &Client, sql: &str) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The legacy table, every column but the masked ones, in key order.
async fn legacy_rows(client: &Client) -> Vec<String> {
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
async fn v2_drift(client: &Client) -> Vec<i64> {
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
async fn v2_derived_wrong(client: &Client) -> i64 {
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

async fn set_stages(client: &Client, phase: &Phase) {
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
async fn base() -> &'static TestDb {
    static BASE: OnceCell<TestDb> = OnceCell::const_new();
    BASE.get_or_init(|| support::tree_db(TREE as u64)).await
}

fn runtime() -> &'static tokio::runtime::Runtime {
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

async fn check_case(phases: &[Phase]) -> Result<(), String> {
    let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = base().await;
    let direct_db = support::clone_db(base).await;
    let proxied_db = support::clone_db(base).await;
    let rules = support::rules_with(&[], "");
    let proxy = support::proxy_on(&proxied_db, &rules, |_| {}).await;
    let control = proxied_db.client().await;
    let direct = direct_db.client().await;
    let through = proxy.client(&proxied_db.name).await;

    let (mut last_direct, mut last_through) = (1i64, 1i64);
    let mut result = Ok(());
    'phases: for (p, phase) in phases.iter().enumerate() {
        set_stages(&control, phase).await;
        for (t, tx) in phase.txs.iter().enumerate() {
            let want = run_tx(&direct, tx, &mut last_direct, case).await;
            let got = run_tx(&through, tx, &mut last_through, case).await;
            if want != got {
                result = Err(format!(
                    "phase {p} transaction {t}: answers differ\n directly: {want:?}\n through cutover: {got:?}"
                ));
                break 'phases;
            }
        }
    }
    if result.is_ok() {
        let (want, got) = (legacy_rows(&direct).await, legacy_rows(&control).await);
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

fn cases() -> u32 {
    std::env::var("CUTOVER_MODEL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_mix_of_stages_gives_what_legacy_alone_gives(phases in prop::collection::vec(phase(), 1..3)) {
        let outcome = runtime().block_on(check_case(&phases));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

// ------------------------------------------------------------------------------------------
// Locks
// ------------------------------------------------------------------------------------------

/// `sessions` clients each add 1 to affiliate 1's total_bets `rounds` times, reading it with
/// `SELECT … FOR UPDATE` and writing what they read plus one: no increment may be lost.
async fn increments_survive(writes_at_target: bool, read_stage: (&'static str, i16)) {
    let db = support::clone_db(base().await).await;
    let rules = support::rules_with(&[], "");
    let proxy = support::proxy_on(&db, &rules, |_| {}).await;
    let control = db.client().await;
    let phase = Phase {
        writes_at_target,
        write_stages: vec![("cutover", 50); WRITE_TYPES.len()],
        read_stages: vec![read_stage; READ_TYPES.len()],
        txs: vec![],
    };
    set_stages(&control, &phase).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before: Decimal = control
        .query_one(
            "SELECT total_bets FROM public.affiliates WHERE affiliate_id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (sessions, rounds) = (12, 10);
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let client = proxy.client(&db.name).await;
        tasks.push(tokio::spawn(async move {
            for r in 0..rounds {
                // Every session on the same row; half the rounds in the simple protocol.
                let simple = (s + r) % 2 == 0;
                client.batch_execute("BEGIN").await.unwrap();
                let bets: Decimal = if simple {
                    let rows = client
                        .simple_query(
                            "SELECT total_bets FROM affiliates WHERE affiliate_id = 1 FOR UPDATE",
                        )
                        .await
                        .unwrap();
                    rows.iter()
                        .find_map(|m| match m {
                            SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                            _ => None,
                        })
                        .unwrap()
                } else {
                    client
                        .query_one(
                            "SELECT total_bets FROM affiliates WHERE affiliate_id = $1 FOR UPDATE",
                            &[&1i64],
                        )
                        .await
                        .unwrap()
                        .get(0)
                };
                client
                    .execute(
                        "UPDATE affiliates SET total_bets = $1 WHERE affiliate_id = $2",
                        &[&(bets + Decimal::ONE), &1i64],
                    )
                    .await
                    .unwrap();
                client.batch_execute("COMMIT").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after: Vec<Decimal> = control
        .query_one(
            "SELECT l.total_bets, v.total_bets FROM public.affiliates l
             JOIN fature_v2.affiliates_optimized v USING (affiliate_id) WHERE affiliate_id = 1",
            &[],
        )
        .await
        .map(|r| vec![r.get(0), r.get(1)])
        .unwrap();
    let expected = before + Decimal::from(sessions * rounds);
    assert_eq!(
        after,
        vec![expected, expected],
        "legacy and v2 after {} increments from {before}",
        sessions * rounds
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_locks_exclude_at_cutover_50() {
    increments_survive(false, ("cutover", 50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_locks_exclude_when_writes_are_at_target() {
    increments_survive(true, ("target", 100)).await;
}
