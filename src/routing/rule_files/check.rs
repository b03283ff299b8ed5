//! `cutover rules check --database-url`: the rules against a real database. The tables and
//! columns they name exist; every explicit target SQL prepares, takes the parameters of its
//! legacy statement and returns the same columns with the same types, so that a client could
//! not tell which side answered.

use tokio_postgres::{Client, types::Type};

use super::{Diagnostic, Matcher, RuleSet, TableName};

/// Every problem found, as diagnostics at the rule that causes it.
pub async fn check_against_database(
    client: &Client,
    rules: &RuleSet,
) -> Result<Vec<Diagnostic>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    let table = &rules.table;

    let legacy_columns = columns_of(client, &table.legacy).await?;
    if legacy_columns.is_empty() {
        problems.push(table.location.diagnostic(format!(
            "table {} does not exist in the database",
            table.legacy
        )));
    } else {
        let listed: Vec<&str> = table.columns.iter().map(|c| c.legacy.as_str()).collect();
        for c in &listed {
            if !legacy_columns.iter().any(|l| l == c) {
                problems.push(
                    table
                        .location
                        .diagnostic(format!("column {c:?} is not in {}", table.legacy)),
                );
            }
        }
        for l in &legacy_columns {
            if !listed.contains(&l.as_str()) {
                problems.push(table.location.diagnostic(format!(
                    "{} has a column {l:?} that the rules do not list",
                    table.legacy
                )));
            }
        }
        if problems.is_empty()
            && listed
                != legacy_columns
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
        {
            problems.push(table.location.diagnostic(format!(
                "columns are not listed in {}'s order ({})",
                table.legacy,
                legacy_columns.join(", ")
            )));
        }
    }

    let target_columns = columns_of(client, &table.target).await?;
    if target_columns.is_empty() || legacy_columns.is_empty() {
        // One cause, not a "does not prepare" for every statement that follows from it.
        if target_columns.is_empty() {
            problems.push(table.location.diagnostic(format!(
                "table {} does not exist in the database: run `cutover migrate` first (the statements are not checked without it)",
                table.target
            )));
        }
        return Ok(problems);
    } else {
        for c in &table.columns {
            if !target_columns.contains(&c.target) {
                problems.push(table.location.diagnostic(format!(
                    "column {:?} (for legacy {:?}) is not in {}",
                    c.target, c.legacy, table.target
                )));
            }
            if let Some(copy) = &c.legacy_copy
                && !target_columns.contains(copy)
            {
                problems.push(table.location.diagnostic(format!(
                    "column {copy:?} (legacy_copy of {:?}) is not in {}",
                    c.legacy, table.target
                )));
            }
        }
    }

    let rewriter = crate::routing::rewrite::Rewriter::new(table);
    for qt in &rules.query_types {
        let (Matcher::Fingerprint(_), Some(example), Some(match_location)) =
            (&qt.matcher, &qt.example_sql, &qt.match_location)
        else {
            continue;
        };
        // The explicit target, or the rewritten statement (checked the same way: a client
        // must not be able to tell which side answered).
        let (target, target_location, what) = match &qt.target_sql {
            Some(t) => (
                t.clone(),
                qt.target_location.as_ref().unwrap_or(&qt.location),
                "the target SQL",
            ),
            None => match rewriter.rewrite(example) {
                crate::routing::rewrite::Rewrite::Target(t) => {
                    (t, match_location, "the rewritten statement")
                }
                crate::routing::rewrite::Rewrite::NotRoutable(_) => continue,
            },
        };
        let legacy = match client.prepare(example).await {
            Ok(s) => s,
            Err(e) => {
                problems.push(match_location.diagnostic(format!(
                    "{}: the legacy statement does not prepare: {}",
                    qt.name,
                    db_message(&e)
                )));
                continue;
            }
        };
        let prepared = match client.prepare(&target).await {
            Ok(s) => s,
            Err(e) => {
                problems.push(target_location.diagnostic(format!(
                    "{}: {what} does not prepare: {}",
                    qt.name,
                    db_message(&e)
                )));
                continue;
            }
        };
        if prepared.params().len() > legacy.params().len() {
            problems.push(target_location.diagnostic(format!(
                "{}: {what} takes {} parameters, the legacy statement {}",
                qt.name,
                prepared.params().len(),
                legacy.params().len()
            )));
        }
        for (i, (t, l)) in prepared.params().iter().zip(legacy.params()).enumerate() {
            if t != l {
                problems.push(target_location.diagnostic(format!(
                    "{}: parameter ${} is {} in {what} but {} in the legacy statement",
                    qt.name,
                    i + 1,
                    t.name(),
                    l.name()
                )));
            }
        }
        let shape = |s: &tokio_postgres::Statement| -> Vec<(String, Type)> {
            s.columns()
                .iter()
                .map(|c| (c.name().to_owned(), c.type_().clone()))
                .collect()
        };
        let (want, got) = (shape(&legacy), shape(&prepared));
        if want.len() != got.len() {
            problems.push(target_location.diagnostic(format!(
                "{}: {what} returns {} columns, the legacy statement {}",
                qt.name,
                got.len(),
                want.len()
            )));
            continue;
        }
        for ((wn, wt), (gn, gt)) in want.iter().zip(&got) {
            if wn != gn || wt != gt {
                problems.push(target_location.diagnostic(format!(
                    "{}: column {gn} {} of {what} does not match legacy's {wn} {}",
                    qt.name,
                    gt.name(),
                    wt.name()
                )));
            }
        }
    }
    Ok(problems)
}

async fn columns_of(
    client: &Client,
    table: &TableName,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = to_regclass(quote_ident($1) || '.' || quote_ident($2))
               AND attnum > 0 AND NOT attisdropped
             ORDER BY attnum",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}
