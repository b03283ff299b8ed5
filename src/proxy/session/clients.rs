//! Who is connected, and the pause: what the console's `SHOW CLIENTS` lists and what its
//! `PAUSE` holds.
//!
//! Every session is registered from its login on, with what its startup packet said and a
//! state the relay keeps (one atomic store per batch and per ReadyForQuery). `PAUSE` holds
//! each application session's next message at a transaction boundary (the session idle,
//! nothing owed by the server): work in flight and open transactions go on to their end, no
//! new one starts, until `RESUME`. That is the moment for a flip that must not cut a
//! transaction in two. The pause is this replica's own; every replica is paused apart.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::Notify;

/// What a session is doing, as `SHOW CLIENTS` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Logging in.
    Login,
    /// Between transactions, nothing owed.
    Idle,
    /// Sent something the server has not answered yet.
    Active,
    /// Inside a transaction block, waiting for the client.
    InTransaction,
    /// Inside a failed transaction block.
    Failed,
    /// Held by `PAUSE` before its next transaction.
    Held,
}

impl State {
    const ALL: [State; 6] = [
        State::Login,
        State::Idle,
        State::Active,
        State::InTransaction,
        State::Failed,
        State::Held,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Login => "login",
            State::Idle => "idle",
            State::Active => "active",
            State::InTransaction => "idle in transaction",
            State::Failed => "idle in transaction (aborted)",
            State::Held => "held by PAUSE",
        }
    }

    /// Whether a pause waits for this session (it is inside a transaction or owed an answer).
    fn busy(self) -> bool {
        matches!(self, State::Active | State::InTransaction | State::Failed)
    }
}

/// One registered session.
#[derive(Debug)]
pub struct Client {
    pub id: u32,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: Option<SocketAddr>,
    pub tls: bool,
    /// The admin console's own sessions (never held).
    pub console: bool,
    pub connected_at: SystemTime,
    state: AtomicU8,
    /// Milliseconds since the epoch of the last change of state.
    since: AtomicU64,
    /// Batches sent (a simple Query, a Sync or a FunctionCall each).
    batches: AtomicU64,
}

/// Milliseconds since the epoch, from the kernel's coarse clock: a state changes twice per
/// query, and `SHOW CLIENTS` needs no better than a few milliseconds (`SystemTime::now` and
/// its `duration_since` cost ~200 instructions per query, 3% of the relay's under callgrind).
fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_REALTIME_COARSE exists on every Linux
    // since 2.6.32 (on failure `ts` stays zero and the time reads as the epoch).
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    (ts.tv_sec.max(0) as u64) * 1000 + (ts.tv_nsec.max(0) as u64) / 1_000_000
}

impl Client {
    pub fn state(&self) -> State {
        State::ALL[usize::from(self.state.load(Ordering::SeqCst)).min(State::ALL.len() - 1)]
    }

    /// When the session entered its current state.
    pub fn since(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.since.load(Ordering::Relaxed))
    }

    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    pub fn set(&self, state: State) {
        let new = state as u8;
        // SeqCst: a pause stores its flag and then reads every state; a session stores its
        // state and then reads the flag. One of the two sees the other.
        if self.state.swap(new, Ordering::SeqCst) != new {
            self.since.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// The client sent more: it is active (counted once per batch by [`Self::batch_sent`]).
    pub fn batch_sent(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// A ReadyForQuery with this status arrived, and the server owes nothing more (`rest`).
    pub fn ready(&self, status: u8, rest: bool) {
        let state = match status {
            b'T' => State::InTransaction,
            b'E' => State::Failed,
            _ if rest => State::Idle,
            _ => State::Active,
        };
        self.set(state);
    }
}

/// The sessions of this replica and its pause.
#[derive(Debug, Default)]
pub struct Clients {
    open: Mutex<BTreeMap<u32, Arc<Client>>>,
    paused: AtomicBool,
    resumed: Notify,
}

/// A session in the registry, for as long as this lives (it moves to the relay's task):
/// unregistered when dropped.
#[derive(Debug)]
pub struct Registered {
    clients: Arc<Clients>,
    pub client: Arc<Client>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.client.id);
    }
}

/// Who a new session is, from its startup packet and socket.
pub struct Who<'a> {
    pub id: u32,
    pub user: &'a str,
    pub database: &'a str,
    pub application_name: &'a str,
    pub peer: Option<SocketAddr>,
    pub tls: bool,
    pub console: bool,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<Client>>> {
        // Single inserts and removes: a poisoned map is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, who: Who<'_>) -> Registered {
        let now = SystemTime::now();
        let client = Arc::new(Client {
            id: who.id,
            user: who.user.to_owned(),
            database: who.database.to_owned(),
            application_name: who.application_name.to_owned(),
            peer: who.peer,
            tls: who.tls,
            console: who.console,
            connected_at: now,
            state: AtomicU8::new(State::Login as u8),
            since: AtomicU64::new(now_ms()),
            batches: AtomicU64::new(0),
        });
        self.lock().insert(who.id, Arc::clone(&client));
        Registered {
            clients: Arc::clone(self),
            client,
        }
    }

    /// Every registered session, oldest first.
    pub fn list(&self) -> Vec<Arc<Client>> {
        self.lock().values().cloned().collect()
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Holds new transactions from now on; returns false if already paused.
    pub fn pause(&self) -> bool {
        metrics::gauge!("cutover_paused").set(1.0);
        !self.paused.swap(true, Ordering::SeqCst)
    }

    /// Releases every held session; returns false if not paused.
    pub fn resume(&self) -> bool {
        let was = self.paused.swap(false, Ordering::SeqCst);
        metrics::gauge!("cutover_paused").set(0.0);
        self.resumed.notify_waiters();
        was
    }

    /// Application sessions a pause still waits for: inside a transaction, or owed answers.
    pub fn busy(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| !c.console && c.state().busy())
            .count()
    }

    /// Waits while paused (a held session). Returns at once when not paused.
    pub async fn hold(&self) {
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.paused() {
                return;
            }
            resumed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(id: u32) -> Who<'static> {
        Who {
            id,
            user: "app",
            database: "db",
            application_name: "",
            peer: None,
            tls: false,
            console: false,
        }
    }

    #[test]
    fn a_pause_waits_only_for_busy_sessions() {
        let clients = Arc::new(Clients::default());
        let a = clients.register(who(1));
        let b = clients.register(who(2));
        assert_eq!(clients.list().len(), 2);
        a.client.set(State::Idle);
        b.client.ready(b'T', true);
        assert_eq!(b.client.state(), State::InTransaction);
        assert!(clients.pause());
        assert!(!clients.pause(), "already paused");
        assert_eq!(clients.busy(), 1);
        b.client.ready(b'I', true);
        assert_eq!(clients.busy(), 0);

        drop((a, b));
    }

    #[tokio::test]
    async fn resume_releases_every_held_session() {
        let clients = Arc::new(Clients::default());
        clients.pause();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let c = Arc::clone(&clients);
                tokio::spawn(async move { c.hold().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        assert!(clients.resume());
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("released")
                .unwrap();
        }
        assert!(!clients.resume(), "not paused any more");
        clients.hold().await;
    }

    #[test]
    fn a_session_leaves_the_list_when_it_ends() {
        let clients = Arc::new(Clients::default());
        {
            let _a = clients.register(who(7));
            assert_eq!(clients.list()[0].id, 7);
        }
        assert!(clients.list().is_empty());
    }
}
