//! Why a query type is slower on v2: the shape of both statements' plans, as PostgreSQL
//! would run them for any parameters (the generic plan), in a line each — `Limit → Sort →
//! Seq Scan on affiliates_optimized` says what is missing. Asked only of read types whose
//! target is slower than legacy in the window; never executes the statements.

use serde::Serialize;
use tokio_postgres::Client;

use crate::{
    routing::rewrite::{Rewrite, Rewriter},
    routing::rules::RuleSet,
};

/// Both sides' plan shapes.
#[derive(Debug, Clone, Serialize)]
pub struct Plans {
    pub legacy: String,
    pub target: String,
}

/// The plans of a query type's example statement and of what v2 runs for it, or `None`
/// when the rules give no example, v2 cannot serve it, or PostgreSQL cannot plan it here
/// (another database, a parameter whose type it cannot infer).
pub async fn of(client: &Client, rules: &RuleSet, query_type: &str) -> Option<Plans> {
    let rule = rules.query_types.iter().find(|q| q.name == query_type)?;
    let legacy = rule.example_sql.clone()?;
    // The rule's own target, or what the rewriter makes of its example (as the proxy does).
    let target = match &rule.target_sql {
        Some(sql) => sql.clone(),
        None => match Rewriter::new(&rules.table).rewrite(&legacy) {
            Rewrite::Target(sql) => sql,
            Rewrite::NotRoutable(_) => return None,
        },
    };
    Some(Plans {
        legacy: shape(client, &legacy).await?,
        target: shape(client, &target).await?,
    })
}

/// The generic plan of `sql`, its nodes from the top down joined by arrows.
async fn shape(client: &Client, sql: &str) -> Option<String> {
    // The server says how many parameters the statement takes (and whether it plans here).
    let params = match client.prepare(sql).await {
        Ok(statement) => statement.params().len(),
        Err(error) => {
            tracing::debug!(%error, "the report cannot plan a statement");
            return None;
        }
    };
    let execute = if params == 0 {
        "EXPLAIN (COSTS OFF) EXECUTE cutover_report_plan".to_owned()
    } else {
        let nulls = vec!["NULL"; params].join(", ");
        format!("EXPLAIN (COSTS OFF) EXECUTE cutover_report_plan({nulls})")
    };
    // In a read-only transaction rolled back; the prepared statement is the session's, so
    // it is deallocated whatever happens.
    let _ = client
        .batch_execute("BEGIN READ ONLY; SET LOCAL plan_cache_mode = force_generic_plan")
        .await;
    let plan = match client
        .batch_execute(&format!("PREPARE cutover_report_plan AS {sql}"))
        .await
    {
        Ok(()) => client.simple_query(&execute).await.ok(),
        Err(_) => None,
    };
    let _ = client.batch_execute("ROLLBACK").await;
    let _ = client.batch_execute("DEALLOCATE cutover_report_plan").await;
    let lines: Vec<String> = plan?
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    Some(nodes(&lines))
}

/// The plan nodes of EXPLAIN's text lines (the first line and every `->` line), top down.
fn nodes(lines: &[String]) -> String {
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let node = line.trim_start();
            match node.strip_prefix("->") {
                Some(rest) => Some(rest.trim().to_owned()),
                None if i == 0 => Some(node.to_owned()),
                None => None,
            }
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_from_explain_text() {
        let lines: Vec<String> = [
            "Limit",
            "  ->  Sort",
            "        Sort Key: level_1_referrals DESC",
            "        ->  Seq Scan on affiliates",
            "              Filter: (level_1_referrals > 0)",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(nodes(&lines), "Limit → Sort → Seq Scan on affiliates");
    }
}
