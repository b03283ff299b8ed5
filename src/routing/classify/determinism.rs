//! Whether a statement's answer is determined, and how it orders its rows — decided from the
//! statement itself, before anything runs, so that a statement whose two answers may differ
//! without anything being wrong is counted `nondeterministic`, never `diverged`:
//!
//! - volatile or time-dependent functions (`now()`, `random()`, `CURRENT_TIMESTAMP`, …): the
//!   two sides run at different moments;
//! - `LIMIT`/`OFFSET`/`FETCH` without an ORDER BY: which rows are cut is up to each side's
//!   plan.
//!
//! A determined statement's ORDER BY becomes the [`Order`] its answers are compared in. A
//! `LIMIT` over an ORDER BY that may tie (it names no key column) is [`Determinism::Cut`]:
//! which of the tied rows at the cut come back is up to each side, so the target's answer is
//! compared by validity — one legacy's statement could have given ([`crate::shadow::compare::compare_cut`]).

use std::ops::ControlFlow;

use sqlparser::ast::{Expr, Query, SetExpr, Statement, Value, Visit, Visitor};

/// How the statement orders its rows (from [`analyze`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    /// No ORDER BY: the rows are a multiset.
    Unordered,
    /// ORDER BY these output columns (by name or 1-based position), in this order; rows that
    /// tie on them form a multiset. Keys that are not output columns cannot be checked: the
    /// whole answer is then compared as a multiset.
    By(Vec<Key>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Name(String),
    Position(usize),
}

/// What comparison may do with a statement's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Determinism {
    /// The answer is determined: compare in this order.
    Determined(Order),
    /// `ORDER BY keys LIMIT n` where the keys may tie: determined but for the rows tied at
    /// the cut; compared by validity.
    Cut(Vec<Key>),
    /// The answers may differ legitimately, and why.
    Nondeterministic(String),
    /// Not a single query (a write, several statements): not compared as a read.
    NotARead,
}

/// Functions whose result depends on when or how often they run.
const VOLATILE: &[&str] = &[
    "now",
    "random",
    "clock_timestamp",
    "statement_timestamp",
    "transaction_timestamp",
    "timeofday",
    "current_timestamp",
    "current_time",
    "current_date",
    "localtimestamp",
    "localtime",
    "gen_random_uuid",
    "uuid_generate_v4",
    "nextval",
    "currval",
    "lastval",
    "setseed",
    "txid_current",
    "pg_backend_pid",
    "inet_client_port",
];

/// Analyzes one statement; `key_columns` are the columns that identify a row (the rules'
/// key, and any unique column), which make an ORDER BY total.
pub fn analyze(statements: &[Statement], key_columns: &[&str]) -> Determinism {
    let [Statement::Query(query)] = statements else {
        return Determinism::NotARead;
    };
    if let Some(name) = volatile_function(statements) {
        return Determinism::Nondeterministic(format!("{name} gives each side its own value"));
    }
    let keys = order_keys(query);
    let limited = query.limit_clause.is_some() || query.fetch.is_some();
    if limited {
        match &keys {
            None => {
                return Determinism::Nondeterministic(
                    "LIMIT without ORDER BY: which rows are returned is up to each side".into(),
                );
            }
            Some(keys) => {
                let total = keys.iter().any(|k| match k {
                    Key::Name(n) => key_columns.contains(&n.as_str()),
                    Key::Position(_) => false,
                });
                if !total {
                    // Only a plain LIMIT (no OFFSET, no FETCH) is checked by validity: an
                    // offset cuts a tie group at its start too.
                    let plain_limit = query.fetch.is_none()
                        && matches!(
                            &query.limit_clause,
                            Some(sqlparser::ast::LimitClause::LimitOffset {
                                limit: Some(_),
                                offset: None,
                                limit_by,
                            }) if limit_by.is_empty()
                        );
                    if plain_limit
                        && !keys
                            .iter()
                            .any(|k| matches!(k, Key::Name(n) if n.is_empty()))
                    {
                        return Determinism::Cut(keys.clone());
                    }
                    return Determinism::Nondeterministic(
                        "LIMIT with OFFSET or FETCH over an ORDER BY that may tie (no key column in it): rows at the cut may differ".into(),
                    );
                }
            }
        }
    }
    if let SetExpr::Select(select) = query.body.as_ref()
        && matches!(select.distinct, Some(sqlparser::ast::Distinct::On(_)))
        && keys.is_none()
    {
        return Determinism::Nondeterministic(
            "DISTINCT ON without ORDER BY picks any row of each group".into(),
        );
    }
    Determinism::Determined(match keys {
        None => Order::Unordered,
        Some(keys) => Order::By(keys),
    })
}

/// The top-level ORDER BY as output-column keys (`None` when there is none).
fn order_keys(query: &Query) -> Option<Vec<Key>> {
    let order_by = query.order_by.as_ref()?;
    let sqlparser::ast::OrderByKind::Expressions(exprs) = &order_by.kind else {
        return None;
    };
    Some(
        exprs
            .iter()
            .map(|o| match &o.expr {
                Expr::Identifier(i) => Key::Name(folded(&i.value, i.quote_style.is_some())),
                Expr::CompoundIdentifier(parts) => parts
                    .last()
                    .map(|i| Key::Name(folded(&i.value, i.quote_style.is_some())))
                    .unwrap_or(Key::Name(String::new())),
                Expr::Value(v) => match &v.value {
                    Value::Number(n, _) => {
                        n.parse().map(Key::Position).unwrap_or(Key::Name(n.clone()))
                    }
                    other => Key::Name(other.to_string()),
                },
                // An expression: not an output column by name; comparison falls back to a
                // multiset for the whole answer.
                other => Key::Name(other.to_string()),
            })
            .collect(),
    )
}

fn folded(name: &str, quoted: bool) -> String {
    if quoted {
        name.to_owned()
    } else {
        name.to_lowercase()
    }
}

fn volatile_function(statements: &[Statement]) -> Option<String> {
    struct Find(Option<String>);
    impl Visitor for Find {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            let name = match expr {
                Expr::Function(f) => f.name.0.last().map(|p| p.to_string().to_lowercase()),
                Expr::Identifier(i) if i.quote_style.is_none() => Some(i.value.to_lowercase()),
                _ => None,
            };
            if let Some(name) = name
                && VOLATILE.contains(&name.trim_matches('"'))
            {
                self.0 = Some(name);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let mut find = Find(None);
    for s in statements {
        let _ = s.visit(&mut find);
    }
    find.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::fingerprint::parse;

    fn analyze_sql(sql: &str) -> Determinism {
        analyze(&parse(sql).unwrap(), &["affiliate_id", "external_id"])
    }

    #[test]
    fn orders_and_their_keys() {
        assert_eq!(
            analyze_sql("SELECT * FROM affiliates WHERE status = 'x'"),
            Determinism::Determined(Order::Unordered)
        );
        assert_eq!(
            analyze_sql("SELECT depth, count(*) FROM d GROUP BY depth ORDER BY depth"),
            Determinism::Determined(Order::By(vec![Key::Name("depth".into())]))
        );
        assert_eq!(
            analyze_sql("SELECT a.x, b FROM t a ORDER BY 2, a.X"),
            Determinism::Determined(Order::By(vec![Key::Position(2), Key::Name("x".into())]))
        );
    }

    #[test]
    fn limits_need_a_total_order() {
        assert!(
            matches!(analyze_sql("SELECT * FROM affiliates LIMIT 5"), Determinism::Nondeterministic(r) if r.contains("without ORDER BY"))
        );
        // Ties at the cut: compared by validity.
        assert_eq!(
            analyze_sql(
                "SELECT affiliate_id, level_1_referrals FROM affiliates ORDER BY level_1_referrals DESC LIMIT $1"
            ),
            Determinism::Cut(vec![Key::Name("level_1_referrals".into())])
        );
        // With an offset the cut has two ends: not checked.
        assert!(matches!(
            analyze_sql("SELECT affiliate_id FROM affiliates ORDER BY status LIMIT 5 OFFSET 5"),
            Determinism::Nondeterministic(r) if r.contains("may tie")
        ));
        assert!(matches!(
            analyze_sql(
                "SELECT affiliate_id FROM affiliates ORDER BY level_1_referrals DESC, affiliate_id LIMIT 10"
            ),
            Determinism::Determined(Order::By(_))
        ));
    }

    #[test]
    fn volatile_functions_and_non_reads() {
        assert!(
            matches!(analyze_sql("SELECT now(), current_user"), Determinism::Nondeterministic(r) if r.contains("now"))
        );
        assert!(matches!(
            analyze_sql(
                "SELECT count(*) FROM affiliates WHERE registration_date > CURRENT_TIMESTAMP - interval '1 day'"
            ),
            Determinism::Nondeterministic(_)
        ));
        assert!(matches!(
            analyze_sql("SELECT random() FROM t"),
            Determinism::Nondeterministic(_)
        ));
        assert_eq!(
            analyze_sql("UPDATE affiliates SET name = 'x'"),
            Determinism::NotARead
        );
        assert_eq!(analyze_sql("SELECT 1; SELECT 2"), Determinism::NotARead);
    }
}
