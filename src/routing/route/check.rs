//! Route checks: before a statement is served by the target, the proxy makes sure the
//! client will not notice — its target SQL prepares, takes the parameters the legacy
//! statement takes (with the types the server gives them there), and returns the same
//! columns with the same names and types. Checked once per statement (SQL text and the
//! parameter types the client gave), on the proxy's own connection, off the session's path:
//! until the answer is in, the statement is served by legacy.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_postgres::types::{Kind, Type};
use tokio_util::sync::CancellationToken;

/// Checks remembered at most (then forgotten all at once, and made again as needed).
const MAX_CHECKS: usize = 10_000;

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The target may serve it; its parameters are declared with these types, and the
    /// columns it returns are described as legacy describes them.
    Ready {
        param_types: Arc<[u32]>,
        columns: Arc<[LegacyColumn]>,
    },
    /// It stays on legacy, and why.
    Refused(String),
}

/// What a RowDescription says of a legacy column besides its name and type: the table and
/// attribute it comes from (0 for an expression) and its type modifier. Drivers use them
/// (JDBC's `getColumnTypeName` says `bigserial` for `affiliate_id` because of them), so a
/// target-served answer is described with legacy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegacyColumn {
    pub table_oid: u32,
    pub attnum: i16,
    pub typmod: i32,
}

struct Request {
    key: String,
    legacy_sql: String,
    target_sql: String,
    param_types: Vec<u32>,
}

/// The checks of one proxy.
pub struct Checks {
    done: Mutex<HashMap<String, Check>>,
    asked: Mutex<std::collections::HashSet<String>>,
    requests: mpsc::Sender<Request>,
    receiver: Mutex<Option<mpsc::Receiver<Request>>>,
    /// Woken whenever a check is done.
    finished: tokio::sync::Notify,
    /// The table whose errors [`Self::identities`] maps (set before [`Self::run`]).
    table: Mutex<Option<crate::routing::rules::TableMap>>,
    /// Legacy's names for the target's, read when the connection first comes up.
    identities: arc_swap::ArcSwapOption<super::identity::Identities>,
    /// Counts the times what was found was forgotten ([`Self::clear`]).
    generation: std::sync::atomic::AtomicU64,
}

impl Default for Checks {
    fn default() -> Self {
        Self::new()
    }
}

impl Checks {
    pub fn new() -> Self {
        let (requests, receiver) = mpsc::channel(256);
        Self {
            done: Mutex::default(),
            asked: Mutex::default(),
            requests,
            receiver: Mutex::new(Some(receiver)),
            finished: tokio::sync::Notify::new(),
            table: Mutex::new(None),
            identities: arc_swap::ArcSwapOption::empty(),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The check of `key`, or `None` while it has not been made (and then it is asked
    /// for, once).
    pub fn get(
        &self,
        key: &str,
        legacy_sql: &str,
        target_sql: &str,
        param_types: &[u32],
    ) -> Option<Check> {
        if let Some(check) = self.done.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Some(check.clone());
        }
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        if asked.len() >= MAX_CHECKS {
            asked.clear();
        }
        if asked.insert(key.to_owned()) {
            let request = Request {
                key: key.to_owned(),
                legacy_sql: legacy_sql.to_owned(),
                target_sql: target_sql.to_owned(),
                param_types: param_types.to_vec(),
            };
            if self.requests.try_send(request).is_err() {
                // Busy: ask again next time.
                asked.remove(key);
            }
        }
        None
    }

    /// The check of `key`, waiting for it up to `patience` if it has not been made (asked
    /// for if need be); `None` if it is still not in.
    pub async fn wait(
        &self,
        key: &str,
        legacy_sql: &str,
        target_sql: &str,
        param_types: &[u32],
        patience: Duration,
    ) -> Option<Check> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if let Some(check) = self.get(key, legacy_sql, target_sql, param_types) {
                return Some(check);
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return None;
            }
        }
    }

    /// The table whose target errors are to read as legacy's (from the rules).
    pub fn set_table(&self, table: crate::routing::rules::TableMap) {
        *self.table.lock().unwrap_or_else(|e| e.into_inner()) = Some(table);
        self.identities.store(None);
    }

    /// Legacy's names for the target's objects, once read.
    pub fn identities(&self) -> Option<Arc<super::identity::Identities>> {
        self.identities.load_full()
    }

    /// Forgets what was found (the rules changed).
    pub fn clear(&self) {
        self.done.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // After the maps: whoever reads the new generation then finds them cleared (the
        // reader's lock of `done` follows the read, the maps' unlock precedes the change).
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes whenever what was found is forgotten: a check kept since an earlier
    /// generation is to be asked again. Read before [`Self::get`], so that a check made
    /// before a `clear` is never kept as one made after it.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Answers the requests on a connection of its own to `database`.
    pub async fn run(
        self: Arc<Self>,
        database: tokio_postgres::Config,
        shutdown: CancellationToken,
    ) {
        let Some(mut receiver) = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut client: Option<tokio_postgres::Client> = None;
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = receiver.recv() => match r { Some(r) => r, None => return },
            };
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = crate::net::connect::connect_as(&database, "cutover route checks")
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "route checks: no database; statements stay on legacy"))
                    .ok();
            }
            if let Some(c) = &client
                && self.identities.load().is_none()
            {
                let table = self.table.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(table) = table {
                    match super::identity::Identities::load(c, &table).await {
                        Ok(map) => self.identities.store(Some(Arc::new(map))),
                        Err(e) => {
                            tracing::warn!(error = %e, "route checks: legacy's names for the target's errors could not be read")
                        }
                    }
                }
            }
            let Some(c) = &client else {
                self.asked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&request.key);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let check = match check(c, &request).await {
                Ok(check) => check,
                Err(error) if error.as_db_error().is_none() => {
                    // The connection failed, not the statement: ask again later.
                    self.asked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&request.key);
                    continue;
                }
                Err(error) => Check::Refused(format!(
                    "the legacy statement does not prepare: {}",
                    error
                        .as_db_error()
                        .map_or(String::new(), |e| e.message().to_owned())
                )),
            };
            if let Check::Refused(why) = &check {
                tracing::warn!(key = %short(&request.key), %why, "statement stays on legacy");
            }
            let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
            if done.len() >= MAX_CHECKS {
                done.clear();
            }
            done.insert(request.key, check);
            drop(done);
            self.finished.notify_waiters();
        }
    }
}

fn short(key: &str) -> &str {
    &key[..key.len().min(80)]
}

/// A type for `prepare_typed`: the known one, or the OID as it came (0 lets the server
/// infer it).
pub(crate) fn type_of(oid: u32) -> Type {
    Type::from_oid(oid)
        .unwrap_or_else(|| Type::new(format!("oid{oid}"), oid, Kind::Pseudo, String::new()))
}

async fn check(
    client: &tokio_postgres::Client,
    request: &Request,
) -> Result<Check, tokio_postgres::Error> {
    let types: Vec<Type> = request.param_types.iter().map(|&o| type_of(o)).collect();
    let legacy = client.prepare_typed(&request.legacy_sql, &types).await?;
    let target = match client
        .prepare_typed(&request.target_sql, legacy.params())
        .await
    {
        Ok(t) => t,
        Err(e) => {
            return Ok(Check::Refused(format!(
                "the target SQL does not prepare: {}",
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_owned())
            )));
        }
    };
    if legacy.params().len() != target.params().len() {
        return Ok(Check::Refused(format!(
            "the target SQL takes {} parameters, the legacy statement {}",
            target.params().len(),
            legacy.params().len()
        )));
    }
    if let Some((i, p)) = legacy
        .params()
        .iter()
        .zip(target.params())
        .enumerate()
        .find(|(_, (l, t))| l != t)
    {
        return Ok(Check::Refused(format!(
            "parameter ${} is {} on legacy and {} on the target",
            i + 1,
            p.0,
            p.1
        )));
    }
    let shape = |s: &tokio_postgres::Statement| -> Vec<(String, u32)> {
        s.columns()
            .iter()
            .map(|c| (c.name().to_owned(), c.type_().oid()))
            .collect()
    };
    let (l, t) = (shape(&legacy), shape(&target));
    if l != t {
        let describe = |cols: &[(String, u32)], s: &tokio_postgres::Statement| {
            cols.iter()
                .zip(s.columns())
                .map(|((n, _), c)| format!("{n} {}", c.type_()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Ok(Check::Refused(format!(
            "the client would see other columns: legacy ({}), target ({})",
            describe(&l, &legacy),
            describe(&t, &target)
        )));
    }
    let mut columns = Vec::with_capacity(legacy.columns().len());
    for c in legacy.columns() {
        let (table_oid, attnum) = (c.table_oid().unwrap_or(0), c.column_id().unwrap_or(0));
        let typmod = if table_oid == 0 {
            // An expression: PostgreSQL gives nearly all of them -1.
            -1
        } else {
            client
                .query_opt(
                    "SELECT atttypmod FROM pg_attribute WHERE attrelid = $1 AND attnum = $2",
                    &[&table_oid, &attnum],
                )
                .await?
                .map_or(-1, |r| r.get(0))
        };
        columns.push(LegacyColumn {
            table_oid,
            attnum,
            typmod,
        });
    }
    Ok(Check::Ready {
        param_types: legacy.params().iter().map(Type::oid).collect(),
        columns: columns.into(),
    })
}
