//! Rewriting: a statement on the legacy table becomes the same statement on the target.
//!
//! Reads are rewritten by *substitution*: every reference to the legacy table in a FROM
//! clause — in joins and self-joins, subqueries, CTEs (recursive too), under any alias —
//! becomes a derived table over the target that has exactly the legacy table's columns, in
//! its order, with its names (`direct_referrals_count AS level_1_referrals`):
//!
//! ```sql
//! SELECT a.name FROM affiliates a            -- legacy
//! SELECT a.name FROM (SELECT affiliate_id, …, direct_referrals_count AS level_1_referrals, …
//!                     FROM fature_v2.affiliates_optimized) AS a      -- target
//! ```
//!
//! Everything that names the legacy table's columns — qualified or not, `*` and `a.*`, window
//! functions, aggregates — then means on the target what it meant on legacy, and the output
//! columns keep their legacy names and types. PostgreSQL pulls such a subquery up into the
//! outer query, so the plan is the one a direct query on the target would get.
//!
//! What cannot be rewritten safely is *not routable*, with the reason, and stays on legacy:
//! SQL the parser cannot read; the table named in a string (`'public.affiliates'::regclass`);
//! a whole-row reference (`row_to_json(a)`: its type is the legacy row type); system columns
//! (`ctid`); a CTE that shadows the table's name; and statements other than queries (writes
//! are mirrored row by row by dual-write). The rewriter never returns SQL that does not parse.

use std::{collections::HashSet, ops::ControlFlow};

use sqlparser::ast::{
    Expr, Ident, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableAlias, TableFactor,
    Value, ValueWithSpan, VisitMut, VisitorMut,
};

use crate::{classify::fingerprint, rules::TableMap};

/// What a statement becomes on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// The target SQL, taking the same parameters.
    Target(String),
    /// Stays on legacy, and why.
    NotRoutable(String),
}

/// Rewrites statements on one legacy table.
#[derive(Debug, Clone)]
pub struct Rewriter {
    schema: String,
    table: String,
    columns: HashSet<String>,
    /// `SELECT <legacy columns from target columns> FROM <target>`, parsed once.
    view: Box<Query>,
}

/// System columns a derived table does not have.
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid", "oid"];

impl Rewriter {
    pub fn new(table: &TableMap) -> Self {
        let select_list: Vec<String> = table
            .columns
            .iter()
            .map(|c| {
                if c.legacy == c.target {
                    quote(&c.legacy)
                } else {
                    format!("{} AS {}", quote(&c.target), quote(&c.legacy))
                }
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM {}.{}",
            select_list.join(", "),
            quote(&table.target.schema),
            quote(&table.target.name)
        );
        let view = match fingerprint::parse(&sql).ok().and_then(|mut s| s.pop()) {
            Some(Statement::Query(q)) => q,
            // Built from validated identifiers, each quoted: always one SELECT.
            _ => unreachable!("the view query is a SELECT: {sql}"),
        };
        Self {
            schema: table.legacy.schema.clone(),
            table: table.legacy.name.clone(),
            columns: table.columns.iter().map(|c| c.legacy.clone()).collect(),
            view,
        }
    }

    /// Rewrites SQL text (one or more statements).
    pub fn rewrite(&self, sql: &str) -> Rewrite {
        match fingerprint::parse(sql) {
            Ok(statements) => self.rewrite_statements(statements),
            Err(e) => Rewrite::NotRoutable(format!("the SQL parser cannot read it: {e}")),
        }
    }

    /// Rewrites parsed statements.
    pub fn rewrite_statements(&self, mut statements: Vec<Statement>) -> Rewrite {
        for statement in &mut statements {
            if let Err(reason) = self.rewrite_one(statement) {
                return Rewrite::NotRoutable(reason);
            }
        }
        let text = statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        // Never hand out SQL that does not parse back.
        match fingerprint::parse(&text) {
            Ok(_) => Rewrite::Target(text),
            Err(e) => Rewrite::NotRoutable(format!(
                "the rewritten SQL would not parse ({e}); this is a cutover bug"
            )),
        }
    }

    fn rewrite_one(&self, statement: &mut Statement) -> Result<(), String> {
        let query = match statement {
            Statement::Query(q) => q,
            other => {
                let kind = other
                    .to_string()
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_uppercase();
                return Err(
                    if matches!(kind.as_str(), "INSERT" | "UPDATE" | "DELETE" | "MERGE") {
                        format!(
                            "{kind} statements are mirrored row by row (dual-write), not rewritten"
                        )
                    } else {
                        format!("{kind} statements on the legacy table are not rewritten")
                    },
                );
            }
        };
        // Two passes: FROM clauses are visited after the select list, so whole-row
        // references can only be recognized once every substituted alias is known.
        let mut substitute = Substitute {
            rewriter: self,
            aliases: HashSet::new(),
            problem: None,
        };
        let _ = query.visit(&mut substitute);
        if let Some(problem) = substitute.problem {
            return Err(problem);
        }
        let mut check = Check {
            rewriter: self,
            aliases: substitute.aliases,
            problem: None,
        };
        let _ = query.visit(&mut check);
        match check.problem {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// Whether an object name refers to the legacy table (under the default search_path).
    fn is_legacy(&self, name: &ObjectName) -> bool {
        let parts: Option<Vec<String>> = name
            .0
            .iter()
            .map(|p| match p {
                ObjectNamePart::Identifier(ident) => Some(folded(ident)),
                ObjectNamePart::Function(_) => None,
            })
            .collect();
        match parts.as_deref() {
            Some([table]) => *table == self.table,
            Some([schema, table]) => *schema == self.schema && *table == self.table,
            _ => false,
        }
    }
}

/// An identifier as PostgreSQL resolves it: unquoted ones fold to lower case.
fn folded(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The first pass: legacy table references become the derived target.
struct Substitute<'r> {
    rewriter: &'r Rewriter,
    /// Names under which substituted tables are visible (aliases, or the table's name).
    aliases: HashSet<String>,
    problem: Option<String>,
}

impl Substitute<'_> {
    fn refuse(&mut self, reason: String) -> ControlFlow<()> {
        self.problem.get_or_insert(reason);
        ControlFlow::Break(())
    }
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
            return self.refuse(format!(
                "a CTE named {} shadows the legacy table",
                cte.alias.name
            ));
        }
        if let SetExpr::Table(_) = query.body.as_ref() {
            return self.refuse("TABLE statements are not rewritten".into());
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
            return self.refuse("the legacy table is called like a function".into());
        }
        let alias = alias.take().unwrap_or_else(|| TableAlias {
            explicit: true,
            name: Ident::new(self.rewriter.table.clone()),
            columns: Vec::new(),
            at: None,
        });
        self.aliases.insert(folded(&alias.name));
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
            return self.refuse(format!(
                "the string '{text}' names the legacy table; references inside strings (such as ::regclass) cannot be rewritten"
            ));
        }
        ControlFlow::Continue(())
    }
}

/// The second pass: references the substitution cannot carry over.
struct Check<'r> {
    rewriter: &'r Rewriter,
    aliases: HashSet<String>,
    problem: Option<String>,
}

impl Check<'_> {
    fn refuse(&mut self, reason: String) -> ControlFlow<()> {
        self.problem.get_or_insert(reason);
        ControlFlow::Break(())
    }
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
                        .refuse(format!("system column {name} does not exist on the target"));
                }
                if self.aliases.contains(&name) && !self.rewriter.columns.contains(&name) {
                    return self.refuse(format!(
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::rules::RuleSet;

    fn rewriter() -> Rewriter {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
        let rules = RuleSet::load_dir(&dir).expect("the customer's rules are valid");
        Rewriter::new(&rules.table)
    }

    fn target(sql: &str) -> String {
        match rewriter().rewrite(sql) {
            Rewrite::Target(t) => t,
            Rewrite::NotRoutable(why) => panic!("{sql}: not routable: {why}"),
        }
    }

    fn refused(sql: &str) -> String {
        match rewriter().rewrite(sql) {
            Rewrite::NotRoutable(why) => why,
            Rewrite::Target(t) => panic!("{sql}: rewritten to {t}"),
        }
    }

    #[test]
    fn references_become_the_derived_target() {
        let t =
            target("SELECT a.level_1_referrals FROM public.affiliates a WHERE a.affiliate_id = $1");
        assert!(
            t.contains("\"direct_referrals_count\" AS \"level_1_referrals\""),
            "{t}"
        );
        assert!(
            t.contains("FROM \"fature_v2\".\"affiliates_optimized\") a WHERE"),
            "{t}"
        );
        assert!(!t.contains("public.affiliates"), "{t}");
        let t = target("SELECT affiliates.name FROM affiliates");
        assert!(t.ends_with(") AS affiliates"), "{t}");
        let t = target("SELECT public.affiliates.name FROM public.affiliates");
        assert!(t.starts_with("SELECT affiliates.name FROM"), "{t}");
    }

    #[test]
    fn other_tables_and_ctes_are_left_alone() {
        let t = target(
            "WITH RECURSIVE d AS (SELECT affiliate_id FROM affiliates UNION ALL SELECT a.affiliate_id FROM affiliates a JOIN d ON a.parent_affiliate_id = d.affiliate_id) SELECT count(*) FROM d, other_table o",
        );
        assert_eq!(t.matches("affiliates_optimized").count(), 2, "{t}");
        assert!(
            t.contains("other_table AS o") || t.contains("other_table o"),
            "{t}"
        );
    }

    #[test]
    fn unsafe_statements_are_not_routable() {
        assert!(refused("SELECT 'public.affiliates'::regclass FROM affiliates").contains("string"));
        assert!(refused("SELECT row_to_json(a) FROM affiliates a").contains("whole-row"));
        assert!(refused("SELECT ctid FROM affiliates").contains("system column"));
        assert!(
            refused("WITH affiliates AS (SELECT 1) SELECT * FROM affiliates").contains("shadows")
        );
        assert!(refused("UPDATE affiliates SET name = 'x'").contains("dual-write"));
        assert!(refused("SELEC * FROM affiliates").contains("parser"));
    }
}
