//! Hot reload of the rule files: on SIGHUP, and when a file of the rules directory changes
//! (polled every second: a plain, a symlinked or a Kubernetes ConfigMap directory alike).
//! On SIGHUP also the configuration ([`reconfigure`]): the admin and read tokens and the auth
//! file are swapped in; a changed setting that only a restart applies is named in the log.
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

use crate::{
    control, proxy::session::Shared, routing::classify::Classifier, routing::rules::RuleSet,
};

/// Registers every series the rules' query types and the fixed label sets give, at zero
/// (see [`crate::metrics::AtZero`]).
pub fn metrics_at_zero(rules: &RuleSet) {
    let names: Vec<&str> = rules.query_types.iter().map(|q| q.name.as_str()).collect();
    let skips = crate::shadow::Skip::ALL.map(crate::shadow::Skip::label);
    let kinds = crate::routing::rules::changes::ChangeKind::ALL.map(|k| k.as_str());
    crate::metrics::AtZero {
        query_types: &names,
        outcomes: &crate::shadow::divergence::Outcome::LABELS,
        skip_reasons: &skips,
        change_kinds: &kinds,
    }
    .register();
}

/// What a reload (SIGHUP, or the console's `RELOAD`) did.
#[derive(Debug)]
pub struct Reloaded {
    /// The configuration: applied and needing a restart, or why it was not reloaded (`None`:
    /// no source to read it again from).
    pub config: Option<Result<Reconfigured, String>>,
    /// The rules: how many query types, or every diagnostic (the last good rules stay).
    pub rules: Result<usize, crate::routing::rules::RulesError>,
}

/// Reloads what can be reloaded live: the configuration (when the proxy knows where it came
/// from) and the rules. What it did is the caller's to report (SIGHUP on standard error, the
/// console in its answer); the rules' reload logs as always.
pub fn everything(shared: &Shared) -> Reloaded {
    let config = shared
        .config_source
        .get()
        .map(|source| source().and_then(|config| reconfigure(shared, &config)));
    Reloaded {
        config,
        rules: reload(shared),
    }
}

/// What a SIGHUP applied of a new configuration, and what it could not.
#[derive(Debug, Default)]
pub struct Reconfigured {
    pub applied: Vec<&'static str>,
    /// Changed, but only a restart applies them.
    pub need_restart: Vec<&'static str>,
}

/// Applies what can be applied live of `new` (validated already): tokens and the auth file.
/// An auth file that cannot be read leaves the old one (the error is returned); nothing
/// else is changed then either.
pub fn reconfigure(
    shared: &Shared,
    new: &crate::config::ServeConfig,
) -> Result<Reconfigured, String> {
    let old = &shared.config;
    let mut done = Reconfigured::default();
    let file = match &new.auth.file {
        Some(path) => Some(Arc::new(
            crate::proxy::auth::AuthFile::load(path).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let tokens = crate::proxy::auth::Tokens {
        admin: new.admin_tokens.clone(),
        read: new.read_tokens.clone(),
    };
    if **shared.tokens.load() != tokens {
        shared.tokens.store(Arc::new(tokens));
        done.applied.push("admin_tokens / read_tokens");
    }
    if file.is_some() || shared.secrets.file.load().is_some() {
        shared.secrets.file.store(file);
        done.applied.push("auth_file (read again)");
    }
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    for (key, changed) in [
        ("listen", old.listen != new.listen),
        (
            "upstream",
            differs(&old.upstream_config, &new.upstream_config)
                || old.upstream_verify != new.upstream_verify,
        ),
        ("admin", old.admin != new.admin),
        (
            "max_client_connections",
            old.max_client_connections != new.max_client_connections,
        ),
        (
            "max_logins_in_progress",
            old.max_logins_in_progress != new.max_logins_in_progress,
        ),
        (
            "max_message_bytes",
            old.max_message_bytes != new.max_message_bytes,
        ),
        (
            "shutdown_grace_seconds",
            old.shutdown_grace != new.shutdown_grace,
        ),
        ("worker_threads", old.worker_threads != new.worker_threads),
        ("rules", old.rules != new.rules),
        ("tls_cert / tls_key", differs(&old.tls, &new.tls)),
        (
            "client_tls_required",
            old.client_tls_required != new.client_tls_required,
        ),
        ("control", differs(&old.control, &new.control)),
        ("shadow*", differs(&old.shadow, &new.shadow)),
        (
            "authentication_timeout_seconds",
            old.authentication_timeout != new.authentication_timeout,
        ),
        (
            "auth_url / auth_query",
            differs(&old.auth.query, &new.auth.query),
        ),
    ] {
        if changed {
            done.need_restart.push(key);
        }
    }
    Ok(done)
}

/// Loads the rules again; on success they replace the running ones. Returns the number of
/// query types loaded.
pub fn reload(shared: &Shared) -> Result<usize, crate::routing::rules::RulesError> {
    let dir = &shared.config.rules;
    match RuleSet::load_dir(dir) {
        Ok(rules) => {
            let rules = Arc::new(rules);
            let names: Vec<&str> = rules.query_types.iter().map(|q| q.name.as_str()).collect();
            shared.metrics.queries.set_names(&names);
            let count = names.len();
            metrics_at_zero(&rules);
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
                    match crate::net::connect::connect(&database).await {
                        Ok(mut client) => {
                            if let Err(error) = control::seed_query_types(&mut client, &rules).await
                            {
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
