//! The rewriter's passes over a statement's syntax tree: legacy table references substituted
//! by the derived target, a write's columns renamed, and the references the substitution
//! cannot carry over refused.

use std::{collections::HashSet, ops::ControlFlow};

use sqlparser::ast::{Expr, Ident, Query, SetExpr, TableFactor, Value, ValueWithSpan, VisitorMut};

use super::{Rewriter, SYSTEM_COLUMNS, folded};

/// What a pass found: the aliases of substituted tables, and the first reason to refuse.
#[derive(Default)]
pub(super) struct Findings {
    pub(super) aliases: HashSet<String>,
    pub(super) problem: Option<String>,
}

impl Findings {
    pub(super) fn refuse(&mut self, reason: String) -> ControlFlow<()> {
        self.problem.get_or_insert(reason);
        ControlFlow::Break(())
    }

    pub(super) fn result(self) -> Result<HashSet<String>, String> {
        match self.problem {
            Some(problem) => Err(problem),
            None => Ok(self.aliases),
        }
    }
}

/// The first pass: legacy table references become the derived target.
pub(super) struct Substitute<'r> {
    pub(super) rewriter: &'r Rewriter,
    pub(super) found: Findings,
}

impl VisitorMut for Substitute<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        if let Some(with) = &query.with
            && let Some(cte) = with
                .cte_tables
                .iter()
                .find(|cte| folded(&cte.alias.name) == self.rewriter.table)
        {
            return self.found.refuse(format!(
                "a CTE named {} shadows the legacy table",
                cte.alias.name
            ));
        }
        if let SetExpr::Table(_) = query.body.as_ref() {
            return self
                .found
                .refuse("TABLE statements are not rewritten".into());
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
        let TableFactor::Table {
            name, alias, args, ..
        } = factor
        else {
            return ControlFlow::Continue(());
        };
        if !self.rewriter.is_legacy(name) {
            return ControlFlow::Continue(());
        }
        if args.is_some() {
            return self
                .found
                .refuse("the legacy table is called like a function".into());
        }
        let alias = alias.take().unwrap_or_else(|| self.rewriter.legacy_alias());
        self.found.aliases.insert(folded(&alias.name));
        *factor = TableFactor::Derived {
            lateral: false,
            subquery: self.rewriter.view.clone(),
            alias: Some(alias),
            sample: None,
        };
        ControlFlow::Continue(())
    }

    fn post_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
        let text = match &value.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s)
            | Value::NationalStringLiteral(s)
            | Value::TripleSingleQuotedString(s) => s.as_str(),
            Value::DollarQuotedString(d) => d.value.as_str(),
            _ => return ControlFlow::Continue(()),
        };
        if text.to_lowercase().contains(&self.rewriter.table) {
            return self.found.refuse(format!(
                "the string '{text}' names the legacy table; references inside strings (such as ::regclass) cannot be rewritten"
            ));
        }
        ControlFlow::Continue(())
    }
}

/// Renames the written table's mapped columns in a write statement's expressions, and
/// substitutes legacy reads inside its subqueries.
pub(super) struct RenameColumns<'r, 'a> {
    pub(super) rewriter: &'r Rewriter,
    /// The name under which the written table is visible (its alias, or its name).
    pub(super) visible: String,
    /// Subquery nesting: unqualified names inside a subquery may belong to another table.
    pub(super) depth: usize,
    pub(super) substituted: &'a mut HashSet<String>,
    pub(super) problem: Option<String>,
}

impl VisitorMut for RenameColumns<'_, '_> {
    type Break = ();

    fn pre_visit_query(&mut self, _query: &mut Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _query: &mut Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
        if self.depth == 0 {
            return ControlFlow::Continue(());
        }
        let mut substitute = Substitute {
            rewriter: self.rewriter,
            found: Findings::default(),
        };
        let flow = substitute.pre_visit_table_factor(factor);
        match substitute.found.result() {
            Ok(aliases) => self.substituted.extend(aliases),
            Err(p) => {
                self.problem.get_or_insert(p);
            }
        }
        flow
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let rw = self.rewriter;
        match expr {
            Expr::Identifier(ident) => {
                let name = folded(ident);
                if let Some((_, target, _)) = rw.mapped(&name)
                    && *target != name
                {
                    if self.depth > 0 {
                        self.problem.get_or_insert(format!(
                            "unqualified {name} inside a subquery of a write: qualify it with the table it belongs to"
                        ));
                        return ControlFlow::Break(());
                    }
                    *ident = Ident::new(target.clone());
                }
            }
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                let qualifier = folded(&parts[0]);
                if qualifier == self.visible || (qualifier == "excluded" && self.depth == 0) {
                    rw.rename_ident(&mut parts[1]);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// The second pass: references the substitution cannot carry over.
pub(super) struct Check<'r> {
    pub(super) rewriter: &'r Rewriter,
    pub(super) found: Findings,
}

impl VisitorMut for Check<'_> {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        match expr {
            Expr::Identifier(ident) => {
                let name = folded(ident);
                if SYSTEM_COLUMNS.contains(&name.as_str()) && !self.rewriter.columns.contains(&name)
                {
                    return self
                        .found
                        .refuse(format!("system column {name} does not exist on the target"));
                }
                if self.found.aliases.contains(&name) && !self.rewriter.columns.contains(&name) {
                    return self.found.refuse(format!(
                        "{name} is a whole-row reference to the legacy table; its type is the legacy row type"
                    ));
                }
            }
            Expr::CompoundIdentifier(parts) => {
                let names: Vec<String> = parts.iter().map(folded).collect();
                if let [.., last] = names.as_slice()
                    && SYSTEM_COLUMNS.contains(&last.as_str())
                {
                    return self
                        .found
                        .refuse(format!("system column {last} does not exist on the target"));
                }
                // schema.table.column → table.column (the derived table has no schema).
                if names.len() == 3
                    && names[0] == self.rewriter.schema
                    && names[1] == self.rewriter.table
                {
                    parts.remove(0);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}
