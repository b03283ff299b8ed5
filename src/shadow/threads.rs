//! The shadow's threads: its comparisons run on a runtime of their own, one per process,
//! whose threads yield the CPU to the sessions.
//!
//! A comparison costs several times what relaying the statement did (both sides' answers
//! decoded and compared). On the main runtime, at the sessions' priority, a saturated machine
//! shared its CPU between them evenly: at `shadow` with every read sampled, the clients'
//! throughput halved (docs/performance.md, "The shadow yields"). Here each thread runs at
//! nice [`NICE`]: when the CPU is short, the session threads get it first and the comparisons
//! the pool cannot keep up with are dropped and counted, as the queue already does; when it is
//! not, they run as before. Only the pool's workers run here: the divergence store, the
//! control plane and logins stay on the main runtime.
//!
//! It must never stop the shadow: a runtime that cannot be built leaves the workers on the
//! main runtime, a priority that cannot be lowered leaves them at the sessions' priority,
//! each with a warning.

use std::{future::Future, sync::OnceLock};

use tokio::runtime::{Builder, Handle, Runtime};

/// The nice value of the shadow's threads, whose CPU share against a session thread's (nice
/// 0) is then about one to ten under the kernel's fair scheduler.
const NICE: libc::c_int = 10;

/// Worker threads of the shadow's runtime, as the main runtime has.
const THREADS: usize = 2;

/// Built once and never dropped (a runtime may not be dropped inside another's tasks, and
/// its threads idle at no cost); `None` when it could not be built.
static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();

/// Spawns `task` on the shadow's threads, or on the current runtime when they could not be
/// started.
pub(super) fn spawn<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match handle() {
        Some(handle) => drop(handle.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
}

fn handle() -> Option<&'static Handle> {
    RUNTIME
        .get_or_init(|| {
            Builder::new_multi_thread()
                .worker_threads(THREADS)
                .thread_name("cutover-shadow")
                .on_thread_start(lower_priority)
                .enable_all()
                .build()
                .inspect_err(|error| {
                    tracing::warn!(%error, "shadow: cannot start its threads; comparisons run on the main runtime");
                })
                .ok()
        })
        .as_ref()
        .map(Runtime::handle)
}

/// Lowers the calling thread's priority to the process's nice value plus [`NICE`] (at most
/// 19). On Linux the nice value belongs to the thread, not the process (setpriority(2),
/// "BUGS"): the sessions' threads keep theirs. The process's value is its first thread's, so a
/// thread this runtime starts from one of its own is not lowered twice.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: errno is this thread's; getpid cannot fail; getpriority and setpriority read
        // their arguments only (`who` 0 is the calling thread).
        let lowered = unsafe {
            *libc::__errno_location() = 0;
            let base = libc::getpriority(libc::PRIO_PROCESS, libc::getpid() as libc::id_t);
            (base != -1 || *libc::__errno_location() == 0)
                && libc::setpriority(libc::PRIO_PROCESS, 0, (base + NICE).min(19)) == 0
        };
        if !lowered {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "shadow: cannot lower its threads' priority; comparisons compete with sessions for the CPU"
                );
            });
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The nice value of a thread of this process, from `/proc`.
    fn nice_of(tid: &str) -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Fields after the command's closing parenthesis: state is field 3, nice field 19.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(16).unwrap().parse().unwrap()
    }

    fn tid() -> String {
        // SAFETY: gettid has no arguments and cannot fail.
        (unsafe { libc::gettid() }).to_string()
    }

    #[test]
    fn comparisons_run_below_the_sessions_priority() {
        // SAFETY: getpid cannot fail.
        let base = nice_of(&(unsafe { libc::getpid() }).to_string());
        let caller = nice_of(&tid());
        let (tx, rx) = std::sync::mpsc::channel();
        spawn(async move {
            tx.send(tid()).unwrap();
        });
        let shadow_thread = rx.recv().unwrap();
        assert_ne!(shadow_thread, tid());
        assert_eq!(nice_of(&shadow_thread), (base + i64::from(NICE)).min(19));
        assert_eq!(nice_of(&tid()), caller, "the caller keeps its priority");
    }
}
