//! Which column each `$n` parameter of a read is compared with — so that a divergence sample
//! can keep the values reviewers need (an `affiliate_id`) and redact the rest (an e-mail, a
//! document number), without ever guessing from the values themselves.
//!
//! A parameter is "bound to" a column when the statement compares them directly: `col op $n`
//! or `$n op col`, `col [NOT] IN (…, $n, …)`, `col [I]LIKE $n`, `col BETWEEN $n AND $m`.
//! A parameter used anywhere else (in a function, a LIMIT, against another expression) is
//! bound to no column, and samples redact it.

use std::{collections::BTreeMap, ops::ControlFlow};

use sqlparser::ast::{Expr, InTarget, Statement, Value, Visit, Visitor};

/// Parameter number (1-based) → the column it is compared with (lower-cased name, without
/// qualifier). A parameter compared with two different columns is bound to none.
pub fn bound_columns(statements: &[Statement]) -> BTreeMap<usize, String> {
    let mut find = Find::default();
    for s in statements {
        let _ = s.visit(&mut find);
    }
    find.bound
        .into_iter()
        .filter_map(|(n, c)| c.map(|c| (n, c)))
        .collect()
}

/// Column → the literal compared with it (`affiliate_id = 42` → `42`), for statements that
/// carry their values inline. The first comparison of a column wins.
pub fn bound_literals(statements: &[Statement]) -> BTreeMap<String, String> {
    struct Literals(BTreeMap<String, String>);
    impl Visitor for Literals {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::BinaryOp { left, right, .. } = expr {
                for (column, value) in [(left, right), (right, left)] {
                    if let (Some(c), Some(v)) = (column_name(column), literal(value)) {
                        self.0.entry(c).or_insert(v);
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut find = Literals(BTreeMap::new());
    for s in statements {
        let _ = s.visit(&mut find);
    }
    find.0
}

fn literal(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => Some(n.clone()),
            Value::SingleQuotedString(s) => Some(s.clone()),
            _ => None,
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => literal(expr),
        Expr::UnaryOp {
            op: sqlparser::ast::UnaryOperator::Minus,
            expr,
        } => literal(expr).map(|n| format!("-{n}")),
        _ => None,
    }
}

#[derive(Default)]
struct Find {
    /// `None` once a parameter is seen with two different columns.
    bound: BTreeMap<usize, Option<String>>,
}

impl Find {
    fn bind(&mut self, column: &Expr, value: &Expr) {
        let (Some(column), Some(n)) = (column_name(column), placeholder(value)) else {
            return;
        };
        self.bound
            .entry(n)
            .and_modify(|c| {
                if c.as_deref() != Some(column.as_str()) {
                    *c = None;
                }
            })
            .or_insert(Some(column));
    }
}

impl Visitor for Find {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        match expr {
            Expr::BinaryOp { left, right, .. } => {
                self.bind(left, right);
                self.bind(right, left);
            }
            Expr::In {
                expr,
                target: InTarget::List(list),
                ..
            } => {
                for item in list {
                    self.bind(expr, item);
                }
            }
            Expr::Like { expr, pattern, .. } | Expr::ILike { expr, pattern, .. } => {
                self.bind(expr, pattern);
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                self.bind(expr, low);
                self.bind(expr, high);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

fn column_name(expr: &Expr) -> Option<String> {
    let ident = match expr {
        Expr::Identifier(i) => i,
        Expr::CompoundIdentifier(parts) => parts.last()?,
        Expr::Nested(inner) => return column_name(inner),
        _ => return None,
    };
    Some(if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    })
}

fn placeholder(expr: &Expr) -> Option<usize> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => p.strip_prefix('$')?.parse().ok(),
            _ => None,
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => placeholder(expr),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::fingerprint::parse;

    fn bound(sql: &str) -> Vec<(usize, String)> {
        bound_columns(&parse(sql).unwrap()).into_iter().collect()
    }

    #[test]
    fn parameters_compared_with_columns() {
        assert_eq!(
            bound("SELECT * FROM affiliates WHERE affiliate_id = $1"),
            [(1, "affiliate_id".into())]
        );
        assert_eq!(
            bound(
                "SELECT * FROM affiliates a WHERE $2::text = a.Email AND a.status IN ('x', $1) AND name ILIKE $3"
            ),
            [
                (1, "status".into()),
                (2, "email".into()),
                (3, "name".into())
            ]
        );
        assert_eq!(
            bound("SELECT * FROM t WHERE registration_date BETWEEN $1 AND $2"),
            [
                (1, "registration_date".into()),
                (2, "registration_date".into())
            ]
        );
    }

    #[test]
    fn inline_literals_by_column() {
        let lits = bound_literals(
            &parse("SELECT * FROM affiliates WHERE affiliate_id = 42 AND 'x' = status AND d > -3")
                .unwrap(),
        );
        assert_eq!(lits["affiliate_id"], "42");
        assert_eq!(lits["status"], "x");
        assert_eq!(lits["d"], "-3");
    }

    #[test]
    fn other_uses_are_bound_to_nothing() {
        assert!(bound("SELECT * FROM t ORDER BY a LIMIT $1").is_empty());
        assert!(bound("SELECT * FROM t WHERE lower(email) = $1").is_empty());
        // Compared with two columns: neither.
        assert!(bound("SELECT * FROM t WHERE name = $1 OR email = $1").is_empty());
    }
}
