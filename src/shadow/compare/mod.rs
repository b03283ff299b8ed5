//! Comparison of the two sides' answers to one statement, in pure functions.
//!
//! Values are compared in their canonical form ([`value`]): integer widths, numeric scales
//! and jsonb key order do not make a difference; floats and numerics may be given a
//! tolerance. Rows are compared as a multiset unless the statement orders them, and then rows
//! that tie on the ORDER BY keys are still compared as a multiset. Statements whose answer
//! is not determined (volatile functions, LIMIT over an order that may tie) are recognized
//! up front by [`crate::routing::classify::determinism`] and never compared. A divergence carries the rows that differ
//! (bounded), paired by key when the key is in the answer, with the differing columns.
//!
//! Nothing here does I/O; the shadow (issue 5) feeds it answers.

pub mod value;

use crate::routing::classify::determinism::{Key, Order};
use std::collections::HashMap;

use rust_decimal::Decimal;
pub use value::Value;

/// One side's answer: column names, then rows of canonical values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Answer {
    /// An answer from rows fetched with tokio-postgres (binary format), decoded by the
    /// types the server described.
    pub fn from_rows(
        statement_columns: &[tokio_postgres::Column],
        rows: &[tokio_postgres::Row],
    ) -> Self {
        Answer {
            columns: statement_columns
                .iter()
                .map(|c| c.name().to_owned())
                .collect(),
            rows: rows
                .iter()
                .map(|row| {
                    statement_columns
                        .iter()
                        .enumerate()
                        .map(|(i, c)| Value::decode(c.type_(), raw_column(row, i)))
                        .collect()
                })
                .collect(),
        }
    }
}

/// A column of a row exactly as the server sent it (binary format); `None` for NULL (and
/// for an index out of range).
pub fn raw_column(row: &tokio_postgres::Row, index: usize) -> Option<&[u8]> {
    struct Raw<'a>(Option<&'a [u8]>);
    impl<'a> tokio_postgres::types::FromSql<'a> for Raw<'a> {
        fn from_sql(
            _: &tokio_postgres::types::Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Raw(Some(raw)))
        }
        fn from_sql_null(
            _: &tokio_postgres::types::Type,
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Raw(None))
        }
        fn accepts(_: &tokio_postgres::types::Type) -> bool {
            true
        }
    }
    row.try_get::<_, Raw>(index).ok().and_then(|r| r.0)
}

/// What may differ without being a divergence.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub numeric_tolerance: Decimal,
    pub float_tolerance: f64,
    /// Output columns left out.
    pub ignore_columns: Vec<String>,
    /// The output column that identifies a row (the rules' key), to pair differing rows.
    pub key_column: Option<String>,
}

/// At most this many differing rows are kept in a divergence.
pub const MAX_DIFF_ROWS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Match,
    Diverged(Diff),
}

/// How two answers differ.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Diff {
    /// The columns themselves differ (names or count).
    pub shape: Option<String>,
    pub legacy_rows: usize,
    pub target_rows: usize,
    /// Rows with the same key on both sides but different values: the key, both rows and
    /// the names of the differing columns.
    pub changed: Vec<ChangedRow>,
    /// Rows only one side has (after pairing by key).
    pub only_legacy: Vec<Vec<Value>>,
    pub only_target: Vec<Vec<Value>>,
    /// The rows are the same but in another order (ordered statements only).
    pub order_differs: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChangedRow {
    pub key: Value,
    pub legacy: Vec<Value>,
    pub target: Vec<Value>,
    pub columns: Vec<String>,
}

/// Compares the legacy and the target answers of one statement.
pub fn compare(legacy: &Answer, target: &Answer, order: &Order, options: &Options) -> Verdict {
    if legacy.columns != target.columns {
        return Verdict::Diverged(Diff {
            shape: Some(format!(
                "legacy returns ({}), the target ({})",
                legacy.columns.join(", "),
                target.columns.join(", ")
            )),
            legacy_rows: legacy.rows.len(),
            target_rows: target.rows.len(),
            ..Diff::default()
        });
    }
    let kept: Vec<usize> = (0..legacy.columns.len())
        .filter(|i| !options.ignore_columns.contains(&legacy.columns[*i]))
        .collect();
    let project = |rows: &[Vec<Value>]| -> Vec<Vec<Value>> {
        rows.iter()
            .map(|r| kept.iter().map(|&i| r[i].clone()).collect())
            .collect()
    };
    let (l, t) = (project(&legacy.rows), project(&target.rows));
    let columns: Vec<String> = kept.iter().map(|&i| legacy.columns[i].clone()).collect();

    let groups = match order {
        Order::Unordered => None,
        Order::By(keys) => key_positions(keys, &columns),
    };
    let equal = match &groups {
        None => multiset_equal(&l, &t, options),
        Some(keys) => {
            let (gl, gt) = (tie_groups(&l, keys), tie_groups(&t, keys));
            gl.len() == gt.len()
                && gl
                    .iter()
                    .zip(&gt)
                    .all(|(a, b)| multiset_equal(a, b, options))
        }
    };
    if equal {
        return Verdict::Match;
    }
    let mut diff = describe(&l, &t, &columns, options);
    diff.order_differs = groups.is_some() && multiset_equal(&l, &t, options);
    Verdict::Diverged(diff)
}

/// Validity of an answer cut by `ORDER BY keys LIMIT n` where the keys may tie: whether
/// `target` is one of the answers legacy's statement could have given. `unlimited` is
/// legacy's answer with a larger LIMIT (in the same snapshot), sorted by the same keys. The
/// target's rows must follow legacy's sort values exactly; every tie group before the cut must
/// hold the same rows; the group at the cut may hold any of legacy's rows with that sort value.
/// `None` when it cannot be told: a key is not an output column, or `unlimited` ends inside
/// the group at the cut (its LIMIT was reached).
pub fn compare_cut(
    unlimited: &Answer,
    unlimited_complete: bool,
    target: &Answer,
    keys: &[Key],
    options: &Options,
) -> Option<Verdict> {
    if unlimited.columns != target.columns {
        return Some(compare(unlimited, target, &Order::Unordered, options));
    }
    let kept: Vec<usize> = (0..unlimited.columns.len())
        .filter(|i| !options.ignore_columns.contains(&unlimited.columns[*i]))
        .collect();
    let project = |rows: &[Vec<Value>]| -> Vec<Vec<Value>> {
        rows.iter()
            .map(|r| kept.iter().map(|&i| r[i].clone()).collect())
            .collect()
    };
    let (all, t) = (project(&unlimited.rows), project(&target.rows));
    let columns: Vec<String> = kept.iter().map(|&i| unlimited.columns[i].clone()).collect();
    let positions = key_positions(keys, &columns)?;
    let n = t.len();
    let diverged = |l: &[Vec<Value>]| {
        let mut diff = describe(l, &t, &columns, options);
        diff.legacy_rows = l.len();
        Some(Verdict::Diverged(diff))
    };
    if n > all.len() {
        return diverged(&all);
    }
    let prefix = &all[..n];
    let (gp, gt) = (tie_groups(prefix, &positions), tie_groups(&t, &positions));
    let same_key = |a: &[Vec<Value>], b: &[Vec<Value>]| match (a.first(), b.first()) {
        (Some(x), Some(y)) => positions
            .iter()
            .all(|&k| values_equal(&x[k], &y[k], options)),
        _ => a.is_empty() && b.is_empty(),
    };
    if gp.len() != gt.len()
        || !gp
            .iter()
            .zip(&gt)
            .all(|(a, b)| same_key(a, b) && a.len() == b.len())
    {
        return diverged(prefix);
    }
    let Some((last_t, whole_t)) = gt.split_last() else {
        return Some(Verdict::Match);
    };
    let last_p = &gp[gp.len() - 1];
    if !whole_t
        .iter()
        .zip(&gp)
        .all(|(a, b)| multiset_equal(b, a, options))
    {
        return diverged(prefix);
    }
    // The group at the cut, whole in legacy's longer answer.
    let start = n - last_p.len();
    let group: Vec<Vec<Value>> = all[start..]
        .iter()
        .take_while(|row| {
            positions
                .iter()
                .all(|&k| values_equal(&row[k], &last_p[0][k], options))
        })
        .cloned()
        .collect();
    if start + group.len() == all.len() && !unlimited_complete {
        return None;
    }
    let mut candidates: Vec<&Vec<Value>> = group.iter().collect();
    for row in last_t {
        match candidates.iter().position(|c| rows_equal(c, row, options)) {
            Some(i) => {
                candidates.swap_remove(i);
            }
            None => return diverged(prefix),
        }
    }
    Some(Verdict::Match)
}

/// Output positions of the ORDER BY keys; `None` if one of them is not an output column.
fn key_positions(keys: &[Key], columns: &[String]) -> Option<Vec<usize>> {
    keys.iter()
        .map(|k| match k {
            Key::Position(p) => (*p >= 1 && *p <= columns.len()).then(|| p - 1),
            Key::Name(n) => {
                let mut found = columns.iter().enumerate().filter(|(_, c)| *c == n);
                match (found.next(), found.next()) {
                    (Some((i, _)), None) => Some(i),
                    _ => None,
                }
            }
        })
        .collect()
}

/// Consecutive rows that tie on the keys.
fn tie_groups(rows: &[Vec<Value>], keys: &[usize]) -> Vec<Vec<Vec<Value>>> {
    let mut groups: Vec<Vec<Vec<Value>>> = Vec::new();
    for row in rows {
        let same = groups
            .last()
            .and_then(|g| g.first())
            .is_some_and(|first| keys.iter().all(|&k| first[k] == row[k]));
        if same {
            groups.last_mut().expect("checked above").push(row.clone());
        } else {
            groups.push(vec![row.clone()]);
        }
    }
    groups
}

fn values_equal(a: &Value, b: &Value, options: &Options) -> bool {
    if a == b {
        return true;
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => (*x - *y).abs() <= options.numeric_tolerance,
        (Value::Float(_) | Value::Number(_), Value::Float(_) | Value::Number(_)) => {
            match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= options.float_tolerance,
                _ => false,
            }
        }
        (Value::Array(da, va), Value::Array(db, vb)) => {
            da == db
                && va.len() == vb.len()
                && va.iter().zip(vb).all(|(x, y)| values_equal(x, y, options))
        }
        _ => false,
    }
}

fn rows_equal(a: &[Value], b: &[Value], options: &Options) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| values_equal(x, y, options))
}

fn exact(options: &Options) -> bool {
    options.numeric_tolerance.is_zero() && options.float_tolerance == 0.0
}

/// Multiset equality: by counting canonical rows when exact, by greedy pairing with
/// tolerances.
fn multiset_equal(a: &[Vec<Value>], b: &[Vec<Value>], options: &Options) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if exact(options) {
        let mut counts: HashMap<&[Value], isize> = HashMap::new();
        for r in a {
            *counts.entry(r).or_default() += 1;
        }
        for r in b {
            *counts.entry(r).or_default() -= 1;
        }
        return counts.values().all(|c| *c == 0);
    }
    let mut unmatched: Vec<&Vec<Value>> = b.iter().collect();
    for r in a {
        match unmatched.iter().position(|u| rows_equal(r, u, options)) {
            Some(i) => {
                unmatched.swap_remove(i);
            }
            None => return false,
        }
    }
    true
}

/// The rows that differ, paired by key where the key is an output column.
fn describe(l: &[Vec<Value>], t: &[Vec<Value>], columns: &[String], options: &Options) -> Diff {
    let mut only_l: Vec<Vec<Value>> = l.to_vec();
    let mut only_t: Vec<Vec<Value>> = Vec::new();
    for row in t {
        match only_l.iter().position(|r| rows_equal(r, row, options)) {
            Some(i) => {
                only_l.swap_remove(i);
            }
            None => only_t.push(row.clone()),
        }
    }
    let mut diff = Diff {
        legacy_rows: l.len(),
        target_rows: t.len(),
        ..Diff::default()
    };
    if let Some(k) = options
        .key_column
        .as_ref()
        .and_then(|key| columns.iter().position(|c| c == key))
    {
        let mut rest_t = Vec::new();
        for row in only_t {
            match only_l.iter().position(|r| r[k] == row[k]) {
                Some(i) => {
                    let legacy = only_l.swap_remove(i);
                    let differing = (0..columns.len())
                        .filter(|&c| !values_equal(&legacy[c], &row[c], options))
                        .map(|c| columns[c].clone())
                        .collect();
                    if diff.changed.len() < MAX_DIFF_ROWS {
                        diff.changed.push(ChangedRow {
                            key: row[k].clone(),
                            legacy,
                            target: row,
                            columns: differing,
                        });
                    }
                }
                None => rest_t.push(row),
            }
        }
        only_t = rest_t;
    }
    only_l.truncate(MAX_DIFF_ROWS);
    only_t.truncate(MAX_DIFF_ROWS);
    diff.only_legacy = only_l;
    diff.only_target = only_t;
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: i64) -> Value {
        Value::Number(Decimal::from(v))
    }

    fn d(s: &str) -> Value {
        Value::Number(s.parse::<Decimal>().unwrap().normalize())
    }

    /// Rows (id, referrals) sorted by referrals descending, as `ORDER BY referrals DESC`.
    fn referrals(rows: &[(i64, i64)]) -> Answer {
        Answer {
            columns: vec!["affiliate_id".into(), "referrals".into()],
            rows: rows.iter().map(|&(a, r)| vec![n(a), n(r)]).collect(),
        }
    }

    #[test]
    fn an_answer_cut_inside_a_tie_group_is_checked_by_validity() {
        let keys = [Key::Name("referrals".into())];
        let options = Options::default();
        // Legacy, LIMIT 3 taken longer: 9 has 5; 4, 7 and 8 tie at 3 across the cut.
        let all = referrals(&[(9, 5), (4, 3), (7, 3), (8, 3), (2, 1)]);
        let valid = |target: &[(i64, i64)], complete| {
            compare_cut(&all, complete, &referrals(target), &keys, &options)
        };
        // Any two of the tied rows, in any order within the group: valid.
        for target in [[(9, 5), (4, 3), (7, 3)], [(9, 5), (8, 3), (4, 3)]] {
            assert_eq!(valid(&target, true), Some(Verdict::Match), "{target:?}");
        }
        // A row legacy does not have at that value, a wrong value, a missing top row.
        for target in [
            [(9, 5), (4, 3), (5, 3)],
            [(9, 5), (4, 3), (2, 1)],
            [(4, 3), (7, 3), (8, 3)],
            [(9, 4), (4, 3), (7, 3)],
        ] {
            assert!(
                matches!(valid(&target, true), Some(Verdict::Diverged(_))),
                "{target:?}"
            );
        }
        // Legacy's longer answer ending inside the group at the cut: cannot tell.
        let short = referrals(&[(9, 5), (4, 3), (7, 3)]);
        assert_eq!(
            compare_cut(
                &short,
                false,
                &referrals(&[(9, 5), (8, 3)]),
                &keys,
                &options
            ),
            None
        );
        // A key that is not an output column: cannot tell.
        assert_eq!(
            compare_cut(&all, true, &all, &[Key::Name("nope".into())], &options),
            None
        );
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn answer(columns: &[&str], rows: Vec<Vec<Value>>) -> Answer {
        Answer {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows,
        }
    }

    #[test]
    fn unordered_rows_are_a_multiset() {
        let a = answer(&["id"], vec![vec![n(1)], vec![n(2)], vec![n(2)]]);
        let b = answer(&["id"], vec![vec![n(2)], vec![n(1)], vec![n(2)]]);
        let c = answer(&["id"], vec![vec![n(1)], vec![n(1)], vec![n(2)]]);
        let o = Options::default();
        assert_eq!(compare(&a, &b, &Order::Unordered, &o), Verdict::Match);
        assert!(matches!(
            compare(&a, &c, &Order::Unordered, &o),
            Verdict::Diverged(_)
        ));
    }

    #[test]
    fn ordered_rows_keep_their_order_but_ties_are_a_multiset() {
        let order = Order::By(vec![Key::Name("score".into())]);
        let a = answer(
            &["score", "id"],
            vec![vec![n(9), n(1)], vec![n(5), n(2)], vec![n(5), n(3)]],
        );
        let ties_swapped = answer(
            &["score", "id"],
            vec![vec![n(9), n(1)], vec![n(5), n(3)], vec![n(5), n(2)]],
        );
        let reordered = answer(
            &["score", "id"],
            vec![vec![n(5), n(2)], vec![n(9), n(1)], vec![n(5), n(3)]],
        );
        let o = Options::default();
        assert_eq!(compare(&a, &ties_swapped, &order, &o), Verdict::Match);
        let Verdict::Diverged(diff) = compare(&a, &reordered, &order, &o) else {
            panic!("order matters")
        };
        assert!(diff.order_differs);
    }

    #[test]
    fn differing_rows_are_paired_by_key_with_their_columns() {
        let a = answer(
            &["affiliate_id", "refs", "name"],
            vec![vec![n(1), n(3), t("a")], vec![n(2), n(0), t("b")]],
        );
        let b = answer(
            &["affiliate_id", "refs", "name"],
            vec![vec![n(1), n(4), t("a")], vec![n(2), n(0), t("b")]],
        );
        let o = Options {
            key_column: Some("affiliate_id".into()),
            ..Options::default()
        };
        let Verdict::Diverged(diff) = compare(&a, &b, &Order::Unordered, &o) else {
            panic!()
        };
        assert_eq!(diff.changed.len(), 1);
        assert_eq!(diff.changed[0].key, n(1));
        assert_eq!(diff.changed[0].columns, ["refs"]);
        assert!(diff.only_legacy.is_empty() && diff.only_target.is_empty());
        // Ignoring the column makes them equal.
        let ignoring = Options {
            ignore_columns: vec!["refs".into()],
            ..o
        };
        assert_eq!(
            compare(&a, &b, &Order::Unordered, &ignoring),
            Verdict::Match
        );
    }

    #[test]
    fn tolerances_and_shapes() {
        let a = answer(&["x"], vec![vec![d("10.00")], vec![d("1.001")]]);
        let b = answer(&["x"], vec![vec![d("1.000")], vec![d("10.004")]]);
        assert!(matches!(
            compare(&a, &b, &Order::Unordered, &Options::default()),
            Verdict::Diverged(_)
        ));
        let tolerant = Options {
            numeric_tolerance: "0.01".parse().unwrap(),
            ..Options::default()
        };
        assert_eq!(
            compare(&a, &b, &Order::Unordered, &tolerant),
            Verdict::Match
        );
        let other = answer(&["y"], vec![]);
        let Verdict::Diverged(diff) = compare(&a, &other, &Order::Unordered, &tolerant) else {
            panic!()
        };
        assert!(diff.shape.is_some());
    }
}
