//! A rule's explicit target SQL bound to the statements of its query type.

use std::ops::ControlFlow;

use sqlparser::ast::{Statement, Value, ValueWithSpan, VisitMut, VisitorMut};

use super::{Rewrite, printed};
use crate::routing::fingerprint;

/// Binds a rule's explicit target SQL to one statement of its query type.
///
/// The rule's target takes the parameters of its example statement (`$1`, `$2`, …). A
/// statement of the same fingerprint may carry literals where the example has parameters
/// (the simple protocol) or other parameter numbers: the values are lined up position by
/// position (equal fingerprints have the same shape) and the target's `$n` replaced by what
/// the statement has there. Where the example has a literal, the statement must have the
/// same literal — the target was written for it — or the statement is not routable.
pub fn bind_target(example: &str, statements: &[Statement], target: &str) -> Rewrite {
    match TargetPlan::new(example, target) {
        Ok(plan) => plan.bind(statements),
        Err(reason) => Rewrite::NotRoutable(reason),
    }
}

/// A rule's example and target SQL, parsed once, ready to bind statements of its type.
#[derive(Debug, Clone)]
pub struct TargetPlan {
    example_values: Vec<Value>,
    target: Vec<Statement>,
}

impl TargetPlan {
    pub fn new(example: &str, target: &str) -> Result<Self, String> {
        let example = fingerprint::parse(example)
            .map_err(|e| format!("the rule's example does not parse: {e}"))?;
        let target = fingerprint::parse(target)
            .map_err(|e| format!("the rule's target SQL does not parse: {e}"))?;
        Ok(Self {
            example_values: values_of(&example),
            target,
        })
    }

    /// The target SQL with the statement's values in place of the example's parameters.
    pub fn bind(&self, statements: &[Statement]) -> Rewrite {
        let (want, got) = (&self.example_values, values_of(statements));
        if want.len() != got.len() {
            return Rewrite::NotRoutable(
                "the statement has a different number of values than the rule's example (an IN-list of another length?)".into(),
            );
        }
        let mut bound: Vec<Option<Value>> = Vec::new();
        for (w, g) in want.iter().zip(&got) {
            match w {
                Value::Placeholder(p) if p.starts_with('$') => {
                    let Ok(n) = p[1..].parse::<usize>() else {
                        return Rewrite::NotRoutable(format!(
                            "unexpected parameter {p} in the rule's example"
                        ));
                    };
                    if n == 0 {
                        return Rewrite::NotRoutable("parameter $0 in the rule's example".into());
                    }
                    if bound.len() < n {
                        bound.resize(n, None);
                    }
                    match &bound[n - 1] {
                        Some(previous) if previous != g => {
                            return Rewrite::NotRoutable(format!(
                                "the rule's example uses {p} twice, the statement has two different values there"
                            ));
                        }
                        _ => bound[n - 1] = Some(g.clone()),
                    }
                }
                literal if literal != g => {
                    return Rewrite::NotRoutable(format!(
                        "the statement has {g} where the rule's example has {literal}, and the rule's target SQL was written for the example"
                    ));
                }
                _ => {}
            }
        }
        let mut target = self.target.clone();
        let mut binder = BindParameters {
            bound: &bound,
            missing: None,
        };
        for statement in &mut target {
            let _ = statement.visit(&mut binder);
        }
        if let Some(p) = binder.missing {
            return Rewrite::NotRoutable(format!(
                "the rule's target SQL uses {p}, which its example does not have"
            ));
        }
        printed(&target)
    }
}

/// The values of statements in visiting order, as fingerprints normalize them (NULL aside).
fn values_of(statements: &[Statement]) -> Vec<Value> {
    struct Collect(Vec<Value>);
    impl sqlparser::ast::Visitor for Collect {
        type Break = ();
        fn post_visit_value(&mut self, value: &ValueWithSpan) -> ControlFlow<()> {
            if !matches!(value.value, Value::Null) {
                self.0.push(value.value.clone());
            }
            ControlFlow::Continue(())
        }
    }
    let mut collect = Collect(Vec::new());
    for s in statements {
        let _ = sqlparser::ast::Visit::visit(s, &mut collect);
    }
    collect.0
}

struct BindParameters<'a> {
    bound: &'a [Option<Value>],
    missing: Option<String>,
}

impl VisitorMut for BindParameters<'_> {
    type Break = ();

    fn post_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
        if let Value::Placeholder(p) = &value.value
            && let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
        {
            match self.bound.get(n.wrapping_sub(1)).cloned().flatten() {
                Some(v) => value.value = v,
                None => {
                    self.missing = Some(p.clone());
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }
}
