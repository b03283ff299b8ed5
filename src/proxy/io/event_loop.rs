//! The session threads' event loop: the relay of a logged-in session over plain sockets runs
//! here, on a loop of our own (`epoll` through `mio`, and a run queue), instead of a tokio
//! runtime.
//!
//! Why: under `pgbench -S`, tokio's machinery around each wake-up (the park through its time
//! driver, each socket's readiness kept under a lock, the task's scheduling) cost more than
//! the relay's own work — ~3.5k of the ~6.5k instructions per transaction the proxy spent
//! against pgbouncer's 4.1k (callgrind; docs/performance.md). Here an event sets a flag on its
//! socket and queues the task waiting for it; a task is one boxed future, polled on this
//! thread only.
//!
//! What stays on tokio: everything before the relay (negotiation, TLS, login) and every
//! session with TLS on either leg (rustls reads to know whether a socket is readable). The
//! relay's rare waits keep working here: the loop thread enters the main runtime's context,
//! so a timer or a channel of tokio's wakes the session from that runtime's threads, through
//! the loop's inbox.
//!
//! A loop never blocks on anything but `epoll_wait`, and a task woken from another thread
//! costs a lock and, when the loop sleeps, one write to its eventfd.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::Future,
    io,
    panic::AssertUnwindSafe,
    pin::Pin,
    rc::Rc,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use mio::{Events, Interest, Registry, Token};
use slab::Slab;

pub use super::loop_stream::{Plain, Stream};

/// A session's relay, made on its loop from its two sockets once they are registered there.
pub type Start = Box<dyn FnOnce(Stream, Stream) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A logged-in session handed to a loop.
pub struct Job {
    pub client: Plain,
    pub upstream: Plain,
    pub start: Start,
}

/// The token of the loop's own eventfd (other threads' jobs and wake-ups).
const INBOX: Token = Token(usize::MAX);
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// The session threads, each running one loop; jobs are dealt to them in turn.
pub struct Loops {
    remotes: Vec<Arc<Remote>>,
    next: AtomicUsize,
}

impl Loops {
    /// Starts `count` loop threads (at least one). Their sessions' tokio timers and
    /// channels belong to `runtime`.
    pub fn start(count: usize, runtime: tokio::runtime::Handle) -> io::Result<Self> {
        let mut remotes = Vec::with_capacity(count);
        for id in 0..count.max(1) {
            let poll = mio::Poll::new()?;
            let remote = Arc::new(Remote {
                id,
                inbox: Mutex::new(Inbox::default()),
                notified: AtomicBool::new(false),
                waker: mio::Waker::new(poll.registry(), INBOX)?,
            });
            let runtime = runtime.clone();
            let theirs = Arc::clone(&remote);
            std::thread::Builder::new()
                .name(format!("cutover-sessions-{id}"))
                .spawn(move || {
                    let _context = runtime.enter();
                    if let Err(error) = run(poll, &theirs) {
                        tracing::error!(%error, "session thread stopped");
                    }
                })?;
            remotes.push(remote);
        }
        Ok(Self {
            remotes,
            next: AtomicUsize::new(0),
        })
    }

    /// Hands a session to the next loop; gives it back if the loops are closed.
    pub fn hand(&self, job: Job) -> Result<(), Job> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.remotes.len();
        let remote = &self.remotes[n];
        {
            let mut inbox = remote.lock();
            if inbox.closing {
                return Err(job);
            }
            inbox.jobs.push(job);
        }
        remote.notify();
        Ok(())
    }

    /// Each loop ends once its sessions have; no job is taken after this.
    pub fn close(&self) {
        for remote in &self.remotes {
            remote.lock().closing = true;
            remote.notify();
        }
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        self.close();
    }
}

/// What other threads give a loop.
#[derive(Default)]
struct Inbox {
    jobs: Vec<Job>,
    /// Tasks woken from another thread.
    woken: Vec<usize>,
    closing: bool,
}

/// A loop as other threads see it.
struct Remote {
    id: usize,
    inbox: Mutex<Inbox>,
    /// Whether the eventfd was written since the loop last emptied the inbox.
    notified: AtomicBool,
    waker: mio::Waker,
}

impl Remote {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        // Nothing is left half-done under this lock: a panic elsewhere leaves it usable.
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        if !self.notified.swap(true, Ordering::AcqRel)
            && let Err(error) = self.waker.wake()
        {
            tracing::error!(%error, "cannot wake a session thread");
        }
    }
}

thread_local! {
    /// The id of the loop this thread runs (`usize::MAX`: none).
    static CURRENT: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Tasks to poll, woken on this thread.
    static READY: RefCell<VecDeque<usize>> = const { RefCell::new(VecDeque::new()) };
    /// This loop's registry and its sockets' readiness, by token.
    static SOCKETS: RefCell<Option<Sockets>> = const { RefCell::new(None) };
}

/// The sockets of a loop.
pub(super) struct Sockets {
    pub registry: Registry,
    pub readiness: Slab<Rc<Readiness>>,
}

/// Runs `f` with this thread's loop's sockets; `None` off a loop thread.
pub(super) fn with_sockets<T>(f: impl FnOnce(&mut Sockets) -> T) -> Option<T> {
    SOCKETS.with_borrow_mut(|s| s.as_mut().map(f))
}

/// What a socket's last events said, and who waits for the next.
#[derive(Default)]
pub(super) struct Readiness {
    /// Set by an event, cleared by a read that emptied the socket.
    pub readable: Cell<bool>,
    /// The peer's end (or an error) was seen: a read never blocks again.
    pub read_closed: Cell<bool>,
    pub reader: Cell<Option<Waker>>,
    pub writer: Cell<Option<Waker>>,
}

impl Readiness {
    /// Keeps `waker` to be woken by the next event of the kind `slot` waits for.
    pub fn wait(slot: &Cell<Option<Waker>>, waker: &Waker) {
        match slot.take() {
            Some(kept) if kept.will_wake(waker) => slot.set(Some(kept)),
            _ => slot.set(Some(waker.clone())),
        }
    }
}

/// A task's waker: queues the task on its loop, from this thread or another.
struct TaskWaker {
    key: usize,
    /// Set while the task is queued (or being woken): a task is queued once.
    queued: AtomicBool,
    remote: Arc<Remote>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if CURRENT.get() == self.remote.id {
            READY.with_borrow_mut(|ready| ready.push_back(self.key));
        } else {
            self.remote.lock().woken.push(self.key);
            self.remote.notify();
        }
    }
}

struct Task {
    future: Pin<Box<dyn Future<Output = ()>>>,
    waker: Waker,
    state: Arc<TaskWaker>,
}

/// The loop: poll what is ready, take what other threads gave, wait for events.
fn run(mut poll: mio::Poll, remote: &Arc<Remote>) -> io::Result<()> {
    CURRENT.set(remote.id);
    SOCKETS.set(Some(Sockets {
        registry: poll.registry().try_clone()?,
        readiness: Slab::new(),
    }));
    let mut tasks: Slab<Task> = Slab::new();
    let mut events = Events::with_capacity(EVENTS);
    loop {
        // Only the tasks queued before this batch: one woken again while it runs (a session
        // that always has work) waits for the next, after the sockets' events are read.
        let batch = READY.with_borrow(VecDeque::len);
        for _ in 0..batch {
            let Some(key) = READY.with_borrow_mut(VecDeque::pop_front) else {
                break;
            };
            let Some(task) = tasks.get_mut(key) else {
                continue; // woken after it ended
            };
            // Cleared before the poll: a wake-up during the poll queues it again.
            task.state.queued.store(false, Ordering::Release);
            let mut cx = Context::from_waker(&task.waker);
            // A panic (a bug) ends its own session, as a panicking tokio task would, not
            // every session of this thread.
            let polled =
                std::panic::catch_unwind(AssertUnwindSafe(|| task.future.as_mut().poll(&mut cx)));
            match polled {
                Ok(Poll::Pending) => {}
                Ok(Poll::Ready(())) => drop(tasks.remove(key)),
                Err(_) => {
                    tracing::error!("a session's relay panicked: its connections are closed");
                    drop(tasks.remove(key));
                }
            }
        }

        // Cleared before the inbox is read: what another thread adds after this wakes us.
        remote.notified.store(false, Ordering::Release);
        let (jobs, woken, closing) = {
            let mut inbox = remote.lock();
            let (jobs, woken) = (
                std::mem::take(&mut inbox.jobs),
                std::mem::take(&mut inbox.woken),
            );
            (jobs, woken, inbox.closing)
        };
        READY.with_borrow_mut(|ready| ready.extend(woken));
        for job in jobs {
            start(job, &mut tasks, remote);
        }
        let idle = READY.with_borrow(VecDeque::is_empty);
        if closing && tasks.is_empty() && idle {
            return Ok(());
        }

        let timeout = if idle {
            None
        } else {
            Some(std::time::Duration::ZERO)
        };
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        with_sockets(|sockets| {
            for event in &events {
                let Some(io) = sockets.readiness.get(event.token().0) else {
                    continue; // the eventfd, or a socket already gone
                };
                if event.is_read_closed() || event.is_error() {
                    // Kept: no new event comes for an end already seen, and a read that
                    // took the last bytes before it (short) clears `readable`.
                    io.read_closed.set(true);
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    io.readable.set(true);
                    if let Some(waker) = io.reader.take() {
                        waker.wake();
                    }
                }
                // A write is always tried first (`Stream::poll_write`): no flag to keep.
                if (event.is_writable() || event.is_write_closed() || event.is_error())
                    && let Some(waker) = io.writer.take()
                {
                    waker.wake();
                }
            }
        });
    }
}

/// Registers a job's sockets on this loop and queues its relay.
fn start(job: Job, tasks: &mut Slab<Task>, remote: &Arc<Remote>) {
    let (client, upstream) = match (Stream::register(job.client), Stream::register(job.upstream)) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (Err(error), _) | (_, Err(error)) => {
            tracing::warn!(%error, "cannot register a session's sockets: closing it");
            return;
        }
    };
    let future = (job.start)(client, upstream);
    let entry = tasks.vacant_entry();
    let state = Arc::new(TaskWaker {
        key: entry.key(),
        queued: AtomicBool::new(true),
        remote: Arc::clone(remote),
    });
    READY.with_borrow_mut(|ready| ready.push_back(entry.key()));
    entry.insert(Task {
        future,
        waker: Waker::from(Arc::clone(&state)),
        state,
    });
}

/// The interest every relayed socket is registered with.
pub(super) const BOTH: Interest = Interest::READABLE.add(Interest::WRITABLE);

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
        time::Duration,
    };

    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::io::{Duplex, buffers::read_some, write_all_now};

    fn job(start: Start) -> (Job, UnixStream, UnixStream) {
        let (client, client_peer) = UnixStream::pair().unwrap();
        let (upstream, upstream_peer) = UnixStream::pair().unwrap();
        // A loop that never answers fails the test instead of hanging it (a blocked read
        // would also hold the runtime's shutdown).
        for peer in [&client_peer, &upstream_peer] {
            peer.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            peer.set_write_timeout(Some(Duration::from_secs(20)))
                .unwrap();
        }
        let job = Job {
            client: Plain::Unix(client),
            upstream: Plain::Unix(upstream),
            start,
        };
        (job, client_peer, upstream_peer)
    }

    /// Runs a blocking peer off the runtime's threads.
    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(f))
            .await
            .expect("the loop answered in time")
            .unwrap()
    }

    /// Hands `loops` a session that echoes four bytes after `pause`, and checks that they
    /// come back and that the loop then closes the session's socket.
    async fn echo_through(loops: &Loops, pause: Duration) {
        let (echo, mut client, _upstream) = job(Box::new(move |mut client, _| {
            Box::pin(async move {
                let mut buf = [0u8; 4];
                client.read_exact(&mut buf).await.unwrap();
                tokio::time::sleep(pause).await;
                client.write_all(&buf).await.unwrap();
            })
        }));
        loops.hand(echo).ok().unwrap();
        let echoed = blocking(move || {
            client.write_all(b"ping").unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).unwrap();
            let mut more = Vec::new();
            client.read_to_end(&mut more).unwrap();
            (back, more)
        })
        .await;
        assert_eq!(echoed, (*b"ping", Vec::new()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_session_panicking_leaves_its_neighbours_and_tokio_timers_wake_them() {
        let loops = Loops::start(1, tokio::runtime::Handle::current()).unwrap();
        let (panics, mut panics_client, _) = job(Box::new(|_, _| {
            Box::pin(async { panic!("a bug in one session") })
        }));
        loops.hand(panics).ok().unwrap();
        // Its reply waits for a timer of the runtime's (woken from that runtime's thread).
        echo_through(&loops, Duration::from_millis(20)).await;
        let closed = blocking(move || panics_client.read(&mut [0u8; 1]).unwrap()).await;
        assert_eq!(closed, 0, "the panicking session's sockets were closed");
        loops.close();
        assert!(
            loops
                .hand(job(Box::new(|_, _| Box::pin(async {}))).0)
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_session_that_always_has_work_does_not_starve_the_others() {
        let loops = Loops::start(1, tokio::runtime::Handle::current()).unwrap();
        // Wakes itself at every poll, forever (until its sockets close).
        let (spinning, _spinning_client, _) = job(Box::new(|_, _| {
            Box::pin(std::future::poll_fn(|cx| {
                cx.waker().wake_by_ref();
                Poll::<()>::Pending
            }))
        }));
        loops.hand(spinning).ok().unwrap();
        echo_through(&loops, Duration::ZERO).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn more_than_the_sockets_hold_goes_through_whole() {
        let loops = Loops::start(2, tokio::runtime::Handle::current()).unwrap();
        // Client to upstream, as the relay reads and writes: more than both sockets' buffers
        // hold, so reads empty the socket, writes find it full, and both wait for events.
        let (copy, mut client, mut upstream) = job(Box::new(|mut client, mut upstream| {
            Box::pin(async move {
                let (mut from, _) = client.halves();
                let (_, mut to) = upstream.halves();
                let mut buf = BytesMut::new();
                while read_some(&mut from, &mut buf).await.unwrap() > 0 {
                    write_all_now(&mut to, &buf).await.unwrap();
                    buf.clear();
                }
            })
        }));
        loops.hand(copy).ok().unwrap();
        let sent: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::task::spawn_blocking(move || {
            client.write_all(&sent).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let received = blocking(move || {
            let mut all = Vec::new();
            upstream.read_to_end(&mut all).unwrap();
            all
        })
        .await;
        writer.await.unwrap();
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "the bytes arrived in order");
    }
}
