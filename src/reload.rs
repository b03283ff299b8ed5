//! Hot reload of the rule files: on SIGHUP, and when a file of the rules directory changes
//! (polled every second: a plain, a symlinked or a Kubernetes ConfigMap directory alike).
//!
//! A new set is validated whole before it replaces the old one (a statement in flight keeps
//! the classification it started with). A broken set changes nothing: every diagnostic is
//! logged with its `file:line:column`, the failure is counted
//! (`cutover_rules_reloads_total{outcome="failed"}`), and the last good rules go on serving.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{classify::Classifier, control, rules::RuleSet, session::Shared};

/// Loads the rules again; on success they replace the running ones. Returns the number of
/// query types loaded.
pub fn reload(shared: &Shared) -> Result<usize, crate::rules::RulesError> {
    let dir = &shared.config.rules;
    match RuleSet::load_dir(dir) {
        Ok(rules) => {
            let rules = Arc::new(rules);
            let names: Vec<&str> = rules.query_types.iter().map(|q| q.name.as_str()).collect();
            shared.metrics.queries.set_names(&names);
            let count = names.len();
            shared
                .classifier
                .store(Arc::new(Classifier::new(Arc::clone(&rules))));
            shared.control.set_rules(Arc::clone(&rules));
            // Target SQL may have changed: check statements again before routing them; the
            // column map too: legacy's names for the target's errors are read again.
            if let Some(checks) = &shared.checks {
                checks.clear();
                checks.set_table(rules.table.clone());
            }
            shared.metrics.rules_reloaded.increment(1);
            tracing::info!(dir = %dir.display(), query_types = count, "rules reloaded");
            // New query types get their baseline in the live state.
            if let Some(database) = shared.control.database().cloned() {
                tokio::spawn(async move {
                    match crate::connect::connect(&database).await {
                        Ok(client) => {
                            if let Err(error) = control::seed_query_types(&client, &rules).await {
                                tracing::warn!(%error, "reloaded rules not seeded into the live state");
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "reloaded rules not seeded into the live state")
                        }
                    }
                });
            }
            Ok(count)
        }
        Err(errors) => {
            shared.metrics.rules_reload_failed.increment(1);
            for diagnostic in &errors.0 {
                tracing::error!(%diagnostic, "rules not reloaded: the last good rules stay");
            }
            Err(errors)
        }
    }
}

/// What the directory looks like: each `.toml` file's name, size and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .map(|p| {
                    // metadata() follows symlinks: a ConfigMap's swapped target shows.
                    let meta = std::fs::metadata(&p).ok();
                    let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
                    let modified = meta.and_then(|m| m.modified().ok());
                    (p, len, modified)
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Reloads on `requested` (SIGHUP) and on a change of the directory, until `shutdown`.
pub async fn watch(shared: Arc<Shared>, requested: Arc<Notify>, shutdown: CancellationToken) {
    let dir = shared.config.rules.clone();
    let mut last = snapshot(&dir);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = requested.notified() => {
                last = snapshot(&dir);
                let _ = reload(&shared);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let now = snapshot(&dir);
                if now != last {
                    last = now;
                    let _ = reload(&shared);
                }
            }
        }
    }
}
