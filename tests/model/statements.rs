//! The statement of each generated op: SQL with `$n` parameters, inline literals, JSON values.

use std::sync::OnceLock;

use rust_decimal::Decimal;
use tokio_postgres::types::ToSql;

use super::{Key, Op, TREE};

/// A statement, as SQL with `$n` parameters and as SQL with its values inline.
pub(crate) struct Statement {
    pub(crate) sql: String,
    pub(crate) inline: String,
    pub(crate) params: Vec<Box<dyn ToSql + Sync + Send>>,
    /// The values as JSON, for psycopg.
    pub(crate) json: Vec<serde_json::Value>,
    pub(crate) returns_rows: bool,
    /// Further executions of the same SQL (psycopg sends them with `executemany`).
    pub(crate) more: Vec<Statement>,
}

/// A literal as the JSON value psycopg binds: a quoted string, a decimal (numeric) or an
/// integer.
pub(crate) fn json_of(literal: &str) -> serde_json::Value {
    if let Some(quoted) = literal
        .strip_prefix('\'')
        .and_then(|l| l.strip_suffix('\''))
    {
        serde_json::Value::String(quoted.replace("''", "'"))
    } else if literal.contains('.') {
        serde_json::json!({ "numeric": literal })
    } else {
        serde_json::json!(literal.parse::<i64>().expect("an integer literal"))
    }
}

/// The SQL of a rule-named query type: its rule's example, the application's own statement
/// (`../shared/workloads/fature_app.sql`), so the model cannot drift from what the rules name.
pub(crate) fn rule_sql(name: &str) -> &'static str {
    static RULES: OnceLock<cutover::routing::rules::RuleSet> = OnceLock::new();
    RULES
        .get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
            cutover::routing::rules::RuleSet::load_dir(&dir)
                .expect("the customer's rules are valid")
        })
        .named(name)
        .and_then(|q| q.example_sql.as_deref())
        .unwrap_or_else(|| panic!("no rule {name} with an example"))
}

pub(crate) fn statement(
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
        json: literals.iter().map(|l| json_of(l)).collect(),
        returns_rows,
        more: Vec::new(),
    }
}

/// One statement executed once per item of `each` (`executemany`).
pub(crate) fn many<T>(each: &[T], one: impl Fn(&T) -> Statement) -> Statement {
    let mut statements = each.iter().map(one);
    let mut first = statements.next().expect("executemany of at least one");
    first.more = statements.collect();
    first
}

/// A statement whose one parameter is an affiliate id.
pub(crate) fn by_id(sql: &str, id: i64, returns_rows: bool) -> Statement {
    statement(sql, vec![Box::new(id)], &[id.to_string()], returns_rows)
}

pub(crate) fn text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The statement of an op (`last`: the last id this case inserted).
pub(crate) fn render(op: &Op, last: i64, case: u64) -> Option<Statement> {
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
        Op::NewNoName { parent, ext: e } => statement(
            "INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date, created_at, updated_at)
VALUES ($1, $2, NULL, '2024-01-01', '2024-01-01', '2024-01-01')",
            vec![Box::new(*parent), Box::new(format!("{}-nameless", ext(*e)))],
            &[parent.to_string(), text(&format!("{}-nameless", ext(*e)))],
            false,
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
        Op::ManyNew { parent, exts } => many(exts, |e| {
            render(
                &Op::New {
                    parent: *parent,
                    ext: *e,
                },
                last,
                case,
            )
            .expect("an insert")
        }),
        Op::ManyDeposit { keys, cents } => many(keys, |key| {
            render(
                &Op::Deposit {
                    key: *key,
                    cents: *cents,
                },
                last,
                case,
            )
            .expect("a deposit")
        }),
        Op::Savepoint => statement("SAVEPOINT model", vec![], &[], false),
        Op::RollbackToSavepoint => statement("ROLLBACK TO SAVEPOINT model", vec![], &[], false),
    })
}
