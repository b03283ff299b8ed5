//! Fingerprints: a statement with its literals and parameters normalized away, so that
//! every execution of "the same query" — whatever the values, whether sent with literals
//! (simple protocol) or `$n` parameters, however it is spaced or cased — has one name.
//!
//! Normalization works on the AST (sqlparser, PostgreSQL dialect): every constant and
//! parameter becomes `?` (NULL stays NULL: `IS NULL` and `= NULL` mean different things),
//! an IN-list of constants collapses to one `?`, unquoted identifiers fold to lower case as
//! PostgreSQL folds them, and printing the AST back gives canonical keywords and spacing.

use std::ops::ControlFlow;

use sha2::{Digest, Sha256};
use sqlparser::{
    ast::{Expr, Ident, InTarget, Statement, Value, ValueWithSpan, VisitMut, VisitorMut},
    dialect::PostgreSqlDialect,
    parser::Parser,
};

/// A statement's normalized text and a short stable id derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    /// The normalized SQL, e.g. `SELECT * FROM affiliates WHERE affiliate_id = ?`.
    pub text: String,
    /// `fp_` and 16 hex digits of the text's SHA-256: what automatic query types are named.
    pub id: String,
}

/// Parses `sql` (one or more statements) and fingerprints it.
pub fn fingerprint(sql: &str) -> Result<Fingerprint, String> {
    let mut statements = parse(sql)?;
    Ok(of_statements(&mut statements))
}

/// Parses with the PostgreSQL dialect; the error is the parser's message.
pub fn parse(sql: &str) -> Result<Vec<Statement>, String> {
    Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| e.to_string())
}

/// Fingerprints parsed statements (normalizing them in place).
pub fn of_statements(statements: &mut [Statement]) -> Fingerprint {
    for statement in statements.iter_mut() {
        let _ = statement.visit(&mut Normalize);
    }
    let text = statements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let digest = Sha256::digest(text.as_bytes());
    Fingerprint {
        id: format!("fp_{}", hex::encode(&digest[..8])),
        text,
    }
}

/// The statement with its constants replaced by `?` and nothing else changed (its `$n`
/// parameters stay, so that a sample's parameter list still lines up): what a divergence
/// sample may store of a statement, whichever protocol it came by.
pub fn literals_hidden(sql: &str) -> Result<String, String> {
    let mut statements = parse(sql)?;
    for statement in statements.iter_mut() {
        let _ = statement.visit(&mut HideLiterals);
    }
    Ok(statements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; "))
}

struct HideLiterals;

impl VisitorMut for HideLiterals {
    type Break = ();

    fn post_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
        if !matches!(value.value, Value::Null | Value::Placeholder(_)) {
            value.value = placeholder();
        }
        ControlFlow::Continue(())
    }
}

struct Normalize;

fn placeholder() -> Value {
    Value::Placeholder("?".to_owned())
}

fn is_normalized_constant(expr: &Expr) -> bool {
    matches!(expr, Expr::Value(ValueWithSpan { value: Value::Placeholder(p), .. }) if p == "?")
}

impl VisitorMut for Normalize {
    type Break = ();

    fn post_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
        if !matches!(value.value, Value::Null) {
            value.value = placeholder();
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        match expr {
            Expr::In {
                target: InTarget::List(list),
                ..
            } if list.len() > 1 && list.iter().all(is_normalized_constant) => {
                list.truncate(1);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_ident(&mut self, ident: &mut Ident) -> ControlFlow<()> {
        if ident.quote_style.is_none() {
            ident.value.make_ascii_lowercase();
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(sql: &str) -> String {
        fingerprint(sql).unwrap().text
    }

    #[test]
    fn literals_and_parameters_share_a_fingerprint() {
        let a = fingerprint("SELECT * FROM affiliates WHERE affiliate_id = 42").unwrap();
        let b = fingerprint("select *   from AFFILIATES\n where affiliate_id=$1").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.text, "SELECT * FROM affiliates WHERE affiliate_id = ?");
        assert!(a.id.starts_with("fp_") && a.id.len() == 19);
    }

    #[test]
    fn in_lists_collapse_and_strings_go() {
        assert_eq!(
            fp("SELECT name FROM affiliates WHERE status IN ('active', 'inactive', 'banned')"),
            fp("SELECT name FROM affiliates WHERE status IN ($1)")
        );
        assert_eq!(
            fp("SELECT 1 FROM affiliates WHERE email = 'a@b.c' LIMIT 10"),
            "SELECT ? FROM affiliates WHERE email = ? LIMIT ?"
        );
    }

    #[test]
    fn meaningful_differences_stay() {
        assert_ne!(
            fp("SELECT x FROM t WHERE y IS NULL"),
            fp("SELECT x FROM t WHERE y = 1")
        );
        assert_ne!(fp("SELECT \"Name\" FROM t"), fp("SELECT name FROM t"));
        assert_ne!(fp("SELECT x FROM t ORDER BY x"), fp("SELECT x FROM t"));
        assert_eq!(fp("SELECT \"name\" FROM t"), "SELECT \"name\" FROM t");
    }

    #[test]
    fn hiding_literals_keeps_parameters() {
        assert_eq!(
            literals_hidden(
                "SELECT name FROM affiliates WHERE email = 'ana@example.com' AND affiliate_id = $1 AND x IS NULL LIMIT 5"
            )
            .unwrap(),
            "SELECT name FROM affiliates WHERE email = ? AND affiliate_id = $1 AND x IS NULL LIMIT ?"
        );
    }

    #[test]
    fn unparsable_sql_is_an_error() {
        assert!(fingerprint("SELEC 1").is_err());
    }
}
