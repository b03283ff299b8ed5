//! The network-size fold while cutover serves: v2's `total_network_size` changes by deltas
//! (migration 0017, `fature_v2.network_size_deltas`) that writers append without locking
//! any ancestor; this loop adds them into the rows in short batches
//! (`fature_v2.fold_network_sizes`), so that the deltas stay few and the column close to
//! the truth. The truth itself (column plus pending deltas) never depends on it.
//!
//! Every replica runs it; the function lets one fold at a time and does not wait for a
//! writer (rows a writer holds are left for the next round; any other wait gives up after
//! 20 ms), so it can neither deadlock nor hold up the application for long. A database without migration 0017 is looked at again every
//! minute; a failure is logged once and retried.

use std::time::Duration;

use tokio_postgres::{Client, Config, error::SqlState};
use tokio_util::sync::CancellationToken;

/// Affiliates folded per statement, each its own short transaction. Small on purpose: a
/// row the fold updates (the root's among them) makes every writer's foreign-key check on
/// it wait until the fold commits (measured after the flip, 8 writers under one root: with
/// 5,000 per fold once a second the CPUs were 57% busy, with 200 every 250 ms 98%).
const BATCH: i32 = 200;
/// Between rounds.
const PAUSE: Duration = Duration::from_millis(250);
/// Before looking again at a database without the fold (not migrated to 0017 yet).
const ABSENT_PAUSE: Duration = Duration::from_secs(60);

/// Folds pending network-size deltas on `database` until `shutdown`.
pub async fn run(database: Config, shutdown: CancellationToken) {
    let mut client: Option<Client> = None;
    let mut retrying = crate::net::connect::Retrying::default();
    let mut pause = PAUSE;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = PAUSE;
        if client.as_ref().is_none_or(Client::is_closed) {
            client = crate::net::connect::connect_as(&database, "cutover fold")
                .await
                .ok();
        }
        let Some(c) = client.as_ref() else { continue };
        match round(c, &shutdown).await {
            Ok(folded) => {
                retrying.recovered();
                metrics::counter!("cutover_network_sizes_folded_total").increment(folded);
            }
            Err(error) if error.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {
                tracing::debug!(
                    "fature_v2.fold_network_sizes is not there (migration 0017 not applied)"
                );
                pause = ABSENT_PAUSE;
            }
            Err(error) => {
                let error = crate::net::connect::cause(&error);
                if retrying.is_new(&error) {
                    tracing::warn!(%error, "network-size fold failed; retrying");
                }
            }
        }
    }
}

/// Batches until a batch is not full; returns the affiliates folded.
async fn round(
    client: &Client,
    shutdown: &CancellationToken,
) -> Result<u64, tokio_postgres::Error> {
    let mut folded = 0u64;
    loop {
        let n: i32 = client
            .query_one("SELECT fature_v2.fold_network_sizes($1)", &[&BATCH])
            .await?
            .get(0);
        folded += u64::try_from(n).unwrap_or(0);
        if n < BATCH || shutdown.is_cancelled() {
            return Ok(folded);
        }
    }
}
