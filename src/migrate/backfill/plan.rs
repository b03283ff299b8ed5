//! The backfill's plan: the rows as of one snapshot, placed by an in-memory walk of their
//! parent links, and the quarantine of the rows no root reaches.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::Quarantined;
use crate::migrate::copy_in::CopyIn;
use crate::routing::rules::{TableMap, quote_ident};

/// Where a plan goes. A run commits it (`cutover.backfill_plan`, the quarantine and the
/// progress row) for the phases after it; a dry run, already inside a transaction that is
/// rolled back, keeps it in a temporary table and its quarantine in memory, and writes
/// nothing a real run or dual-write would read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PlanInto {
    Commit,
    DryRun,
}

impl PlanInto {
    fn table(self) -> &'static str {
        match self {
            PlanInto::Commit => "cutover.backfill_plan",
            PlanInto::DryRun => "pg_temp.backfill_plan",
        }
    }
}

/// The plan: levels and paths of reachable rows, and the quarantine of the others (returned).
pub(super) async fn plan(
    client: &Client,
    table: &TableMap,
    into: PlanInto,
) -> Result<Vec<Quarantined>, tokio_postgres::Error> {
    let legacy = table.legacy.quoted();
    let key = quote_ident(&table.key);
    let plan = into.table();
    let (open, create) = match into {
        PlanInto::Commit => (
            "BEGIN ISOLATION LEVEL REPEATABLE READ;
             DROP TABLE IF EXISTS cutover.backfill_plan;",
            "CREATE UNLOGGED TABLE",
        ),
        PlanInto::DryRun => ("", "CREATE TEMP TABLE"),
    };
    // The rows themselves, as of one snapshot: the copy reads them from the plan, so v2 is
    // legacy as of this instant, consistent (every parent with its children), whatever the
    // application does meanwhile; what it does is handed over by dual-write
    // (cutover.backfill_catchup) and replayed at the end. The walk (levels, paths,
    // counters, what no root reaches) is done here from the parent links alone
    // (`migrate::tree`); the rows join it after, in the same snapshot.
    client.batch_execute(open).await?;
    let links = read_links(client, &legacy, &key).await?;
    let walk = crate::migrate::tree::Walk::new(&links);
    drop(links);
    client
        .batch_execute(
            "CREATE TEMP TABLE backfill_tree (
                 affiliate_id int8, parent int8, level int, path ltree, direct int, network int
             ) ON COMMIT DROP",
        )
        .await?;
    let mut copy = CopyIn::start(client, "COPY backfill_tree FROM STDIN").await?;
    let mut rows = walk.copy_rows();
    while rows.write_next(copy.rows()) {
        copy.flush_full().await?;
    }
    copy.finish().await?;
    client
        .batch_execute(&format!(
            "ANALYZE backfill_tree;
             -- In key order, the order the rows are copied in: each batch then reads
             -- its rows from adjacent pages, already sorted.
             SET LOCAL work_mem = '256MB';
             {create} {plan} AS
             SELECT l.*, t.level, t.path, t.direct, t.network
             FROM backfill_tree t JOIN {legacy} l ON l.{key} = t.affiliate_id
             ORDER BY l.{key};
             CREATE UNIQUE INDEX ON {plan} (level, affiliate_id);
             CREATE UNIQUE INDEX ON {plan} (affiliate_id);
             ANALYZE {plan};"
        ))
        .await?;
    // The unreachable rows are few; their reasons are found by following their parents.
    // From the plan's snapshot: rows the application adds meanwhile are not unreachable,
    // and a plan is never committed without its quarantine.
    let parents: HashMap<i64, Option<i64>> = walk.unreachable().iter().copied().collect();
    let mut ids: Vec<i64> = parents.keys().copied().collect();
    ids.sort();
    let quarantine: Vec<Quarantined> = ids
        .into_iter()
        .map(|id| Quarantined {
            affiliate_id: id,
            parent_affiliate_id: parents[&id],
            reason: reason_for(id, &parents),
        })
        .collect();
    if into == PlanInto::DryRun {
        return Ok(quarantine);
    }
    client
        .batch_execute(
            "DELETE FROM cutover.backfill_quarantine;
             DELETE FROM cutover.backfill_progress;
             INSERT INTO cutover.backfill_progress (phase, counters_exact)
             SELECT 'rows', NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized)
                        AND NOT EXISTS (SELECT 1 FROM fature_v2.hierarchy_index)
                        AND NOT EXISTS (SELECT 1 FROM fature_v2.network_size_deltas);",
        )
        .await?;
    for q in &quarantine {
        client
            .execute(
                "INSERT INTO cutover.backfill_quarantine (affiliate_id, parent_affiliate_id, reason)
                 VALUES ($1, $2, $3)",
                &[&q.affiliate_id, &q.parent_affiliate_id, &q.reason],
            )
            .await?;
    }
    client.batch_execute("COMMIT").await?;
    Ok(quarantine)
}

/// Legacy's parent links (key, parent key), read out with `COPY` in the caller's snapshot.
async fn read_links(
    client: &Client,
    legacy: &str,
    key: &str,
) -> Result<Vec<(i64, Option<i64>)>, tokio_postgres::Error> {
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT {key}::int8, parent_affiliate_id::int8 FROM {legacy}) TO STDOUT"
        ))
        .await?;
    futures_util::pin_mut!(stream);
    let mut links = Vec::new();
    let mut rest: Vec<u8> = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        rest.extend_from_slice(&chunk?);
        let complete = rest.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in rest[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            links.push(parse_link(line));
        }
        rest.drain(..complete);
    }
    Ok(links)
}

/// One `COPY` text row of two int8 columns, the second possibly `\N`. PostgreSQL writes
/// them, so they are well formed.
fn parse_link(line: &[u8]) -> (i64, Option<i64>) {
    let number = |field: &[u8]| -> i64 {
        std::str::from_utf8(field)
            .ok()
            .and_then(|f| f.parse().ok())
            .expect("PostgreSQL writes int8 in decimal")
    };
    let tab = line
        .iter()
        .position(|b| *b == b'\t')
        .expect("two columns were asked for");
    let parent = &line[tab + 1..];
    (
        number(&line[..tab]),
        (parent != b"\\N").then(|| number(parent)),
    )
}

/// Why an unreachable row cannot be placed: follow its parents among the unreachable rows
/// (`parents` holds them all, and only them).
fn reason_for(id: i64, parents: &HashMap<i64, Option<i64>>) -> String {
    let mut seen = vec![id];
    let mut at = id;
    loop {
        match parents.get(&at).copied().flatten() {
            // Only unreachable rows are in the map: a parent outside it does not exist.
            Some(p) if !parents.contains_key(&p) => {
                return if at == id {
                    format!("orphan: its parent {p} does not exist")
                } else {
                    format!("under orphan {at}, whose parent {p} does not exist")
                };
            }
            Some(p) => {
                if p == id {
                    return "cycle: following its parents comes back to it".into();
                }
                if seen.contains(&p) {
                    return format!("under the parent cycle through {p}");
                }
                seen.push(p);
                at = p;
            }
            None => return "unreachable from any root".into(),
        }
    }
}

pub(super) async fn quarantined(
    client: &Client,
) -> Result<Vec<Quarantined>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT affiliate_id, parent_affiliate_id, reason FROM cutover.backfill_quarantine ORDER BY affiliate_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| Quarantined {
            affiliate_id: r.get(0),
            parent_affiliate_id: r.get(1),
            reason: r.get(2),
        })
        .collect())
}
