//! The shadow: reads offered by the sessions are run again, on both schemas, by a pool of
//! the proxy's own connections, and their answers compared.
//!
//! It must never slow a client down or change what it sees:
//! - sessions hand a read over with [`Shadow::hand`] once the client has had its answer (its
//!   ReadyForQuery relayed), so a comparison never competes with the statement it compares:
//!   a `try_send` into a bounded queue; when the queue is full the comparison is dropped and
//!   counted (`cutover_shadow_dropped_total`), never waited for, and its parameters are not
//!   even copied when the queue was already full as it was bound ([`Shadow::prepare`]);
//! - the pool's connections are its own (the shadow role, `statement_timeout`,
//!   `default_transaction_read_only`), so a slow or failing target side costs the shadow,
//!   not the session; a shadow statement that times out is `skipped`, not a divergence;
//! - nothing the shadow does reaches a client: its failures become outcomes and metrics;
//! - its comparisons run on threads of their own at a lower priority (`threads`): on a
//!   saturated machine they get the CPU the sessions leave, and the rest are dropped.
//!
//! What it compares: the legacy statement and its target SQL, each on committed data. A
//! client's own uncommitted writes are invisible to both sides alike, so a read inside a
//! transaction that wrote is compared on what was committed before it — never against a
//! target that has not yet received the transaction's writes (dual-write syncs v2 at
//! COMMIT). See `run` for the comparison, the confirmation in one snapshot and the
//! classification of what held.

pub mod compare;
pub mod divergence;
mod redact;
mod run;
mod tally;
mod threads;

pub use run::Skip;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    config::ShadowConfig,
    routing::classify::determinism::Determinism,
    routing::classify::{Classification, Typed},
    routing::rules::RuleSet,
    shadow::{divergence::Store, tally::Tallied},
};

/// One bound parameter, as the client sent it.
#[derive(Debug, Clone)]
pub struct Param {
    pub binary: bool,
    /// `None` is SQL NULL.
    pub value: Option<Bytes>,
}

/// A read to compare.
#[derive(Debug)]
pub struct Job {
    /// The statement's classification (a [`Typed`] read with a target route).
    pub classification: Arc<Classification>,
    /// The legacy SQL, as the client sent it.
    pub sql: Arc<str>,
    /// Parameter type OIDs from the Parse (0: unspecified).
    pub param_types: Arc<[u32]>,
    /// The Bind's body as the client sent it (empty for a simple Query): the relay copies
    /// it whole, the worker reads its values out ([`Job::unpack`]), off the relay's thread.
    pub bind: Bytes,
    /// The Bind's values, slices of `bind`; filled by [`Job::unpack`] on the worker.
    pub params: Vec<Param>,
    /// The SQL carries its values inline (simple protocol): samples normalize them away.
    pub inline: bool,
    /// The rules it was classified under.
    pub rules: Arc<RuleSet>,
}

impl Job {
    /// Reads the Bind's values into `params`; false if the Bind is malformed (the server
    /// refused it too: nothing to compare).
    pub fn unpack(&mut self) -> bool {
        if self.bind.is_empty() {
            return true;
        }
        let Some(values) = crate::wire::messages::bind_params(&self.bind) else {
            return false;
        };
        let start = self.bind.as_ptr() as usize;
        self.params = values
            .iter()
            .map(|(binary, value)| Param {
                binary: *binary,
                value: value.map(|v| {
                    let at = v.as_ptr() as usize - start;
                    self.bind.slice(at..at + v.len())
                }),
            })
            .collect();
        true
    }

    fn typed(&self) -> Option<&Typed> {
        match &*self.classification {
            Classification::Typed(t) => Some(t),
            _ => None,
        }
    }
}

/// A read for the shadow, made when its statement is bound and handed over when it runs
/// ([`Shadow::prepare`], [`Shadow::hand`]).
#[derive(Debug)]
pub enum Offer {
    /// Copied, to compare.
    Job(Job),
    /// Not copied: the queue had no room for it, or its answer is not determined.
    Uncopied(Arc<Classification>),
}

/// The `query_type` label of a query type's metrics: its rule's name, or `automatic`.
pub fn label(typed: &Typed) -> &str {
    if typed.named {
        &typed.query_type
    } else {
        "automatic"
    }
}

/// The shadow of one proxy: its queue and its store.
pub struct Shadow {
    queue: mpsc::Sender<Job>,
    receiver: std::sync::Mutex<Option<mpsc::Receiver<Job>>>,
    config: ShadowConfig,
    /// The database sessions must be on to be shadowed (the pool's).
    database: String,
    pub store: Arc<Store>,
}

impl Shadow {
    pub fn new(config: ShadowConfig) -> Self {
        let (queue, receiver) = mpsc::channel(config.queue);
        Self {
            queue,
            receiver: std::sync::Mutex::new(Some(receiver)),
            database: config
                .database
                .get_dbname()
                .or(config.database.get_user())
                .unwrap_or("postgres")
                .to_owned(),
            config,
            store: Arc::new(Store::new()),
        }
    }

    /// Whether sessions on `database` can be shadowed (the pool reads that database).
    pub fn serves(&self, database: &str) -> bool {
        self.database == database
    }

    /// What to hand over when the statement runs: its job, made by `job` only when the
    /// queue has room for it now and its answer can be compared; else nothing is copied and
    /// [`Self::hand`] counts it as an offer would have been counted. Out of line:
    /// `benches/instructions.rs` counts the shadow's hand-off by this function's calls.
    #[inline(never)]
    pub fn prepare(
        &self,
        classification: &Arc<Classification>,
        job: impl FnOnce() -> Job,
    ) -> Offer {
        if self.queue.capacity() > 0 && Self::determined(classification) {
            Offer::Job(job())
        } else {
            Offer::Uncopied(Arc::clone(classification))
        }
    }

    /// Hands a read over when it runs; never waits. A job the queue has no room for is
    /// dropped and counted; a statement whose answer is not determined is counted
    /// `nondeterministic` without running.
    pub fn hand(&self, offer: Offer) {
        let classification = match offer {
            Offer::Job(job) => {
                if !self.comparable(&job.classification) {
                    return;
                }
                match self.queue.try_send(job) {
                    Ok(()) => return,
                    Err(
                        mpsc::error::TrySendError::Full(job)
                        | mpsc::error::TrySendError::Closed(job),
                    ) => job.classification,
                }
            }
            Offer::Uncopied(classification) => {
                if !self.comparable(&classification) {
                    return;
                }
                classification
            }
        };
        if let Classification::Typed(typed) = &*classification {
            self.store
                .tally(&typed.query_type, label(typed), Tallied::Dropped);
        }
    }

    /// A read whose answer is determined (whether to copy it for a comparison).
    fn determined(classification: &Classification) -> bool {
        matches!(classification, Classification::Typed(Typed { read: Some(plan), .. })
            if !matches!(plan.determinism, Determinism::Nondeterministic(_)))
    }

    /// Whether the statement's answers can be compared; a nondeterministic one is counted
    /// here.
    fn comparable(&self, classification: &Classification) -> bool {
        let Classification::Typed(typed) = classification else {
            return false;
        };
        let Some(plan) = &typed.read else {
            return false;
        };
        if let Determinism::Nondeterministic(_) = plan.determinism {
            self.store
                .tally(&typed.query_type, label(typed), Tallied::Nondeterministic);
            return false;
        }
        true
    }

    /// Starts the pool's workers and the store's writer (once).
    pub fn start(
        self: &Arc<Self>,
        store_database: tokio_postgres::Config,
        shutdown: CancellationToken,
    ) {
        let Some(receiver) = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let receiver = Arc::new(Mutex::new(receiver));
        // The comparisons on threads that yield the CPU to the sessions (`threads`).
        for n in 0..self.config.connections {
            threads::spawn(run::worker(
                n,
                Arc::clone(self),
                Arc::clone(&receiver),
                shutdown.clone(),
            ));
        }
        tokio::spawn(Arc::clone(&self.store).run(store_database, shutdown));
    }

    fn statement_timeout(&self) -> Duration {
        self.config.statement_timeout
    }
}
