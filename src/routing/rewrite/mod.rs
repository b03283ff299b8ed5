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
    VisitMut,
};

use crate::{
    routing::fingerprint,
    routing::rules::{TableMap, quote_ident},
};

mod passes;
mod target;

use passes::{Check, Findings, RenameColumns, Substitute};
pub use target::{TargetPlan, bind_target};

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
    /// Legacy columns in table order: (legacy name, target name, derived).
    order: Vec<(String, String, bool)>,
    key: String,
    /// The key's value for an INSERT that leaves it to legacy's default.
    key_default: Option<Expr>,
    target: ObjectName,
    /// `SELECT <legacy columns from target columns> FROM <target>`, parsed once.
    view: Box<Query>,
    /// For write statements when a derived column carries legacy's own value in another
    /// target column (`legacy_copy`): the same rewriter with that column mapped there, so
    /// that a write reads and writes legacy's value as legacy would.
    writes: Option<Box<Rewriter>>,
}

/// System columns a derived table does not have.
const SYSTEM_COLUMNS: &[&str] = &["ctid", "xmin", "xmax", "cmin", "cmax", "tableoid", "oid"];

impl Rewriter {
    pub fn new(table: &TableMap) -> Self {
        let mut rewriter = Self::for_columns(table);
        if table.columns.iter().any(|c| c.legacy_copy.is_some()) {
            let mut writes = table.clone();
            for c in &mut writes.columns {
                if let Some(copy) = c.legacy_copy.take() {
                    c.target = copy;
                    c.derived = false;
                }
            }
            rewriter.writes = Some(Box::new(Self::for_columns(&writes)));
        }
        rewriter
    }

    fn for_columns(table: &TableMap) -> Self {
        let select_list: Vec<String> = table
            .columns
            .iter()
            .map(|c| {
                if c.legacy == c.target {
                    quote_ident(&c.legacy)
                } else {
                    format!("{} AS {}", quote_ident(&c.target), quote_ident(&c.legacy))
                }
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM {}.{}",
            select_list.join(", "),
            quote_ident(&table.target.schema),
            quote_ident(&table.target.name)
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
            order: table
                .columns
                .iter()
                .map(|c| (c.legacy.clone(), c.target.clone(), c.derived))
                .collect(),
            key: table.key.clone(),
            key_default: table.key_default.as_deref().and_then(|sql| {
                // Validated when the rules loaded: `SELECT <expr>` parses.
                let mut statements = fingerprint::parse(&format!("SELECT {sql}")).ok()?;
                let Some(Statement::Query(q)) = statements.pop() else {
                    return None;
                };
                let SetExpr::Select(select) = *q.body else {
                    return None;
                };
                match select.projection.into_iter().next()? {
                    sqlparser::ast::SelectItem::UnnamedExpr(e) => Some(e),
                    _ => None,
                }
            }),
            target: ObjectName::from(vec![
                Ident::with_quote('"', table.target.schema.clone()),
                Ident::with_quote('"', table.target.name.clone()),
            ]),
            view,
            writes: None,
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
        printed(&statements)
    }

    fn rewrite_one(&self, statement: &mut Statement) -> Result<(), String> {
        let query = match statement {
            Statement::Query(q) => q,
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => {
                return self
                    .writes
                    .as_deref()
                    .unwrap_or(self)
                    .rewrite_write(statement);
            }
            other => {
                let kind = other
                    .to_string()
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_uppercase();
                return Err(format!(
                    "{kind} statements on the legacy table are not rewritten"
                ));
            }
        };
        // Two passes: FROM clauses are visited after the select list, so whole-row
        // references can only be recognized once every substituted alias is known.
        let aliases = self.substitute_reads(query.as_mut())?;
        self.check(query.as_mut(), aliases)
    }

    /// Replaces every legacy table reference in `node` by the derived target; returns the
    /// names under which they are visible.
    fn substitute_reads<V: VisitMut + ?Sized>(
        &self,
        node: &mut V,
    ) -> Result<HashSet<String>, String> {
        let mut substitute = Substitute {
            rewriter: self,
            found: Findings::default(),
        };
        let _ = node.visit(&mut substitute);
        substitute.found.result()
    }

    /// Refuses what substitution cannot carry over (strings naming the table, whole-row
    /// references to `aliases`, system columns) and fixes schema-qualified columns.
    fn check<V: VisitMut + ?Sized>(
        &self,
        node: &mut V,
        aliases: HashSet<String>,
    ) -> Result<(), String> {
        let mut check = Check {
            rewriter: self,
            found: Findings {
                aliases,
                problem: None,
            },
        };
        let _ = node.visit(&mut check);
        check.found.result().map(|_| ())
    }

    /// INSERT, UPDATE and DELETE whose target is the legacy table: the target table is
    /// renamed, mapped columns are renamed where they belong to it, RETURNING keeps the
    /// legacy names, and a write to a derived column is refused. Other references to the
    /// legacy table (subqueries, FROM, USING) are substituted as in reads.
    fn rewrite_write(&self, statement: &mut Statement) -> Result<(), String> {
        let mut substituted = HashSet::new();
        let mut add_key_default = false;
        let visible = match statement {
            Statement::Insert(insert) => {
                let sqlparser::ast::TableObject::TableName(name) = &mut insert.table else {
                    return Err("INSERT into a table function is not rewritten".into());
                };
                if !self.is_legacy(name) {
                    return self.rewrite_other_write(statement);
                }
                *name = self.target.clone();
                if insert.columns.is_empty()
                    && let Some(source) = &insert.source
                {
                    // Without a column list the values follow the legacy table's order: name
                    // those columns, so they land in the right ones (and derived ones refuse).
                    let SetExpr::Values(values) = source.body.as_ref() else {
                        return Err(
                            "INSERT … SELECT without a column list: name the columns".into()
                        );
                    };
                    let n = values.rows.first().map_or(0, |row| row.content.len());
                    insert.columns = self
                        .order
                        .iter()
                        .take(n)
                        .map(|(l, _, _)| ObjectName::from(vec![Ident::new(l.clone())]))
                        .collect();
                }
                let names_key = insert.columns.iter().any(|c| {
                    matches!(c.0.last(), Some(ObjectNamePart::Identifier(i)) if folded(i) == self.key)
                });
                if !names_key {
                    // The key comes from legacy's default: the target gets the same one,
                    // added once the statement is checked (its string names the sequence).
                    let (Some(_), Some(source)) = (&self.key_default, insert.source.as_ref())
                    else {
                        return Err(format!(
                            "the INSERT leaves {} to legacy's default (its sequence), which the target does not have: set [table] key_default, or give the query type an explicit target",
                            self.key
                        ));
                    };
                    if !matches!(source.body.as_ref(), SetExpr::Values(_)) {
                        return Err(format!(
                            "INSERT … SELECT that leaves {} to its default is not rewritten",
                            self.key
                        ));
                    }
                    add_key_default = true;
                }
                for column in &mut insert.columns {
                    self.rename_written(column)?;
                }
                // The renamed table stays visible under its legacy name.
                insert.table_alias.get_or_insert_with(|| {
                    sqlparser::ast::TableAliasWithoutColumns {
                        explicit: true,
                        alias: Ident::new(self.table.clone()),
                    }
                });
                if let Some(sqlparser::ast::OnInsert::OnConflict(conflict)) = &mut insert.on {
                    match &mut conflict.conflict_target {
                        Some(sqlparser::ast::ConflictTarget::Columns { columns, .. }) => {
                            for c in columns.iter_mut() {
                                self.rename_ident(c);
                            }
                        }
                        Some(sqlparser::ast::ConflictTarget::OnConstraint(_)) => {
                            return Err(
                                "ON CONFLICT ON CONSTRAINT names a legacy constraint".into()
                            );
                        }
                        _ => {}
                    }
                    if let sqlparser::ast::OnConflictAction::DoUpdate(update) = &mut conflict.action
                    {
                        for a in &mut update.assignments {
                            self.rename_assignment(a)?;
                        }
                    }
                }
                let visible = insert
                    .table_alias
                    .as_ref()
                    .map_or_else(|| self.table.clone(), |a| folded(&a.alias));
                self.alias_back_returning(insert.returning.as_mut(), &visible);
                visible
            }
            Statement::Update(update) => {
                let TableFactor::Table { name, alias, .. } = &mut update.table.relation else {
                    return Err("UPDATE of a derived table is not rewritten".into());
                };
                if !self.is_legacy(name) || !update.table.joins.is_empty() {
                    return self.rewrite_other_write(statement);
                }
                *name = self.target.clone();
                let visible = folded(&alias.get_or_insert_with(|| self.legacy_alias()).name);
                for a in &mut update.assignments {
                    self.rename_assignment(a)?;
                }
                if let Some(
                    sqlparser::ast::UpdateTableFromKind::AfterSet(from)
                    | sqlparser::ast::UpdateTableFromKind::BeforeSet(from),
                ) = &mut update.from
                {
                    self.substitute_in(from, &mut substituted)?;
                }
                self.alias_back_returning(update.returning.as_mut(), &visible);
                visible
            }
            Statement::Delete(delete) => {
                let (sqlparser::ast::FromTable::WithFromKeyword(from)
                | sqlparser::ast::FromTable::WithoutKeyword(from)) = &mut delete.from;
                let [only] = from.as_mut_slice() else {
                    return Err("DELETE from several tables is not rewritten".into());
                };
                let TableFactor::Table { name, alias, .. } = &mut only.relation else {
                    return Err("DELETE from a derived table is not rewritten".into());
                };
                if !self.is_legacy(name) {
                    return self.rewrite_other_write(statement);
                }
                *name = self.target.clone();
                let visible = folded(&alias.get_or_insert_with(|| self.legacy_alias()).name);
                if let Some(using) = &mut delete.using {
                    self.substitute_in(using, &mut substituted)?;
                }
                self.alias_back_returning(delete.returning.as_mut(), &visible);
                visible
            }
            _ => unreachable!("only writes get here"),
        };
        let mut renamer = RenameColumns {
            rewriter: self,
            visible,
            depth: 0,
            substituted: &mut substituted,
            problem: None,
        };
        let _ = statement.visit(&mut renamer);
        if let Some(problem) = renamer.problem {
            return Err(problem);
        }
        self.check(statement, substituted)?;
        if add_key_default
            && let (Statement::Insert(insert), Some(default)) = (statement, &self.key_default)
            && let Some(source) = insert.source.as_mut()
            && let SetExpr::Values(values) = source.body.as_mut()
        {
            for row in &mut values.rows {
                row.content.insert(0, default.clone());
            }
            insert
                .columns
                .insert(0, ObjectName::from(vec![Ident::new(self.key.clone())]));
        }
        Ok(())
    }

    /// A write to another table that reads the legacy one (in a subquery, FROM or USING):
    /// the reads are substituted, the written table is left alone.
    fn rewrite_other_write(&self, statement: &mut Statement) -> Result<(), String> {
        let aliases = self.substitute_reads(statement)?;
        self.check(statement, aliases)
    }

    fn substitute_in(
        &self,
        tables: &mut [sqlparser::ast::TableWithJoins],
        aliases: &mut HashSet<String>,
    ) -> Result<(), String> {
        for t in tables {
            aliases.extend(self.substitute_reads(t)?);
        }
        Ok(())
    }

    /// `AS <legacy name>`: keeps references qualified by the table's name valid.
    fn legacy_alias(&self) -> TableAlias {
        TableAlias {
            explicit: true,
            name: Ident::new(self.table.clone()),
            columns: Vec::new(),
            at: None,
        }
    }

    /// The target name of a legacy column (unchanged when not mapped).
    fn mapped(&self, legacy: &str) -> Option<&(String, String, bool)> {
        self.order.iter().find(|(l, _, _)| l == legacy)
    }

    fn rename_ident(&self, ident: &mut Ident) {
        if let Some((_, target, _)) = self.mapped(&folded(ident))
            && *target != folded(ident)
        {
            *ident = Ident::new(target.clone());
        }
    }

    /// A column the statement writes: renamed, or refused if derived.
    fn rename_written(&self, column: &mut ObjectName) -> Result<(), String> {
        let Some(ObjectNamePart::Identifier(ident)) = column.0.last_mut() else {
            return Ok(());
        };
        let name = folded(ident);
        if let Some((legacy, _, true)) = self.mapped(&name) {
            return Err(format!(
                "the statement writes {legacy}, which the target derives itself; give the query type an explicit target"
            ));
        }
        self.rename_ident(ident);
        Ok(())
    }

    fn rename_assignment(&self, assignment: &mut sqlparser::ast::Assignment) -> Result<(), String> {
        match &mut assignment.target {
            sqlparser::ast::AssignmentTarget::ColumnName(c) => self.rename_written(c),
            sqlparser::ast::AssignmentTarget::Tuple(cs) => {
                cs.iter_mut().try_for_each(|c| self.rename_written(c))
            }
        }
    }

    /// RETURNING keeps the legacy names: `*` becomes the legacy column list and a mapped
    /// column is aliased back (`direct_referrals_count AS level_1_referrals`).
    fn alias_back_returning(
        &self,
        returning: Option<&mut Vec<sqlparser::ast::SelectItem>>,
        visible: &str,
    ) {
        use sqlparser::ast::SelectItem;
        let Some(items) = returning else { return };
        let mut out = Vec::with_capacity(items.len());
        for item in items.drain(..) {
            match item {
                SelectItem::Wildcard(_) => {
                    for (legacy, _, _) in &self.order {
                        out.push(SelectItem::ExprWithAlias {
                            expr: Expr::Identifier(Ident::new(legacy.clone())),
                            alias: Ident::new(legacy.clone()),
                        });
                    }
                }
                SelectItem::QualifiedWildcard(kind, _)
                    if kind.to_string().to_lowercase() == visible =>
                {
                    for (legacy, _, _) in &self.order {
                        out.push(SelectItem::ExprWithAlias {
                            expr: Expr::CompoundIdentifier(vec![
                                Ident::new(visible.to_owned()),
                                Ident::new(legacy.clone()),
                            ]),
                            alias: Ident::new(legacy.clone()),
                        });
                    }
                }
                SelectItem::UnnamedExpr(expr) => {
                    let last = match &expr {
                        Expr::Identifier(i) => Some(folded(i)),
                        Expr::CompoundIdentifier(parts) => parts.last().map(folded),
                        _ => None,
                    };
                    match last {
                        Some(name) if self.mapped(&name).is_some_and(|(l, t, _)| l != t) => {
                            out.push(SelectItem::ExprWithAlias {
                                expr,
                                alias: Ident::new(name),
                            });
                        }
                        _ => out.push(SelectItem::UnnamedExpr(expr)),
                    }
                }
                other => out.push(other),
            }
        }
        *items = out;
    }

    /// Whether any of the statements refers to the legacy table (relations anywhere, and
    /// COPY's table, which the relation visitor does not see).
    pub fn concerns(&self, statements: &[Statement]) -> bool {
        let mut found = false;
        for statement in statements {
            let _ = sqlparser::ast::visit_relations(statement, |name| {
                found |= self.is_legacy(name);
                ControlFlow::<()>::Continue(())
            });
        }
        found
            || statements.iter().any(|s| {
                matches!(s, Statement::Copy { source: sqlparser::ast::CopySource::Table { table_name, .. }, .. } if self.is_legacy(table_name))
            })
    }

    /// Whether any of the statements names the legacy table without its schema.
    pub fn names_unqualified(&self, statements: &[Statement]) -> bool {
        let bare = |name: &ObjectName| self.is_legacy(name) && name.0.len() == 1;
        let mut found = false;
        for statement in statements {
            let _ = sqlparser::ast::visit_relations(statement, |name| {
                found |= bare(name);
                ControlFlow::<()>::Continue(())
            });
        }
        found
            || statements.iter().any(|s| {
                matches!(s, Statement::Copy { source: sqlparser::ast::CopySource::Table { table_name, .. }, .. } if bare(table_name))
            })
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

/// Statements printed as the target SQL — never SQL that does not parse back.
fn printed(statements: &[Statement]) -> Rewrite {
    let text = statements
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    match fingerprint::parse(&text) {
        Ok(_) => Rewrite::Target(text),
        Err(e) => Rewrite::NotRoutable(format!(
            "the rewritten SQL would not parse ({e}); this is a cutover bug"
        )),
    }
}

/// An identifier as PostgreSQL resolves it: unquoted ones fold to lower case.
fn folded(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::routing::rules::RuleSet;

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
    fn writes_rename_the_table_and_alias_returning_back() {
        let t = target(
            "UPDATE affiliates SET status = $1, updated_at = now() WHERE affiliate_id = $2 AND level_1_referrals > 0 RETURNING *",
        );
        assert!(
            t.starts_with(
                "UPDATE \"fature_v2\".\"affiliates_optimized\" AS affiliates SET status = $1"
            ),
            "{t}"
        );
        // A write reads legacy's own counter, carried in v2 (`legacy_copy`), as legacy would.
        assert!(t.contains("legacy_level_1_referrals > 0"), "{t}");
        assert!(t.contains("RETURNING affiliate_id AS affiliate_id"), "{t}");
        assert!(
            t.contains("legacy_level_1_referrals AS level_1_referrals"),
            "{t}"
        );
        // And writes it.
        let t = target("UPDATE affiliates SET level_1_referrals = level_1_referrals + 1");
        assert!(
            t.ends_with("SET legacy_level_1_referrals = legacy_level_1_referrals + 1"),
            "{t}"
        );
        let t = target("INSERT INTO affiliates VALUES (1, NULL, 'x', 'n')");
        assert!(
            t.contains("(affiliate_id, parent_affiliate_id, external_id, name) VALUES"),
            "{t}"
        );
        let t = target(
            "DELETE FROM affiliates a USING affiliates p WHERE a.parent_affiliate_id = p.affiliate_id AND p.level_1_referrals = 0 RETURNING a.level_1_referrals",
        );
        assert!(
            t.starts_with("DELETE FROM \"fature_v2\".\"affiliates_optimized\" a USING (SELECT"),
            "{t}"
        );
        assert!(t.contains("p.level_1_referrals = 0"), "{t}");
        assert!(
            t.ends_with("RETURNING a.legacy_level_1_referrals AS level_1_referrals"),
            "{t}"
        );
        let t = target(
            "INSERT INTO affiliates (affiliate_id, external_id, name, registration_date) VALUES ($1, $2, $3, now()) ON CONFLICT (external_id) DO UPDATE SET name = EXCLUDED.name",
        );
        assert!(
            t.contains("ON CONFLICT(external_id) DO UPDATE SET name = EXCLUDED.name"),
            "{t}"
        );
    }

    #[test]
    fn explicit_targets_take_the_statement_s_values() {
        let example = "SELECT count(*) FROM x WHERE a = $1 AND b < $2 AND kind = 'k'";
        let target = "SELECT n FROM y WHERE a = $1 AND depth <= GREATEST($2, 1)";
        let bind = |sql: &str| bind_target(example, &fingerprint::parse(sql).unwrap(), target);
        assert_eq!(
            bind("select count(*) from x where a = 7 and b < 3 and kind = 'k'"),
            Rewrite::Target("SELECT n FROM y WHERE a = 7 AND depth <= GREATEST(3, 1)".into())
        );
        assert_eq!(
            bind("SELECT count(*) FROM x WHERE a = $2 AND b < $1 AND kind = 'k'"),
            Rewrite::Target("SELECT n FROM y WHERE a = $2 AND depth <= GREATEST($1, 1)".into())
        );
        assert!(
            matches!(bind("SELECT count(*) FROM x WHERE a = 1 AND b < 2 AND kind = 'other'"), Rewrite::NotRoutable(r) if r.contains("'other'"))
        );
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
        // Without a `legacy_copy`, a write of the derived column has nowhere to go on v2.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
        let mut table = RuleSet::load_dir(&dir).unwrap().table;
        table.columns.iter_mut().for_each(|c| c.legacy_copy = None);
        for sql in [
            "UPDATE affiliates SET level_1_referrals = 0",
            "INSERT INTO affiliates (affiliate_id, level_1_referrals) VALUES (1, 1)",
        ] {
            match Rewriter::new(&table).rewrite(sql) {
                Rewrite::NotRoutable(why) => assert!(why.contains("derives itself"), "{why}"),
                Rewrite::Target(t) => panic!("{sql}: rewritten to {t}"),
            }
        }
        let t = target("INSERT INTO affiliates (external_id) VALUES ('x'), ('y')");
        assert!(t.contains("(affiliate_id, external_id) VALUES (nextval('public.affiliates_affiliate_id_seq'), 'x'), (nextval("), "{t}");
        assert!(
            refused("INSERT INTO affiliates (external_id) SELECT 'x'").contains("INSERT … SELECT")
        );
        assert!(refused("TRUNCATE affiliates").contains("not rewritten"));
        assert!(refused("SELEC * FROM affiliates").contains("parser"));
    }
}
