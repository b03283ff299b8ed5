//! The relay's two directions run as one task, and the first to end ends the session
//! ([`race`]). Unlike `tokio::select!`, which polls every branch at each wake-up of the task,
//! each direction here gets a waker of its own and is polled only when something it waits
//! for happened: a query wakes the session twice (the client's message, the server's
//! answer), and polling the direction that was not woken asked its socket for readiness
//! again, under the socket's lock, each time (~500 of the relay's ~7,500 instructions per
//! `pgbench -S` transaction under callgrind).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

/// Runs `a` and `b` until one of them ends, with what it ended with; the other is then
/// dropped where it stands.
pub fn race<'f, A, B, T>(a: Pin<&'f mut A>, b: Pin<&'f mut B>) -> Race<'f, A, B>
where
    A: Future<Output = T> + ?Sized,
    B: Future<Output = T> + ?Sized,
{
    Race { a, b, wakers: None }
}

pub struct Race<'f, A: ?Sized, B: ?Sized> {
    a: Pin<&'f mut A>,
    b: Pin<&'f mut B>,
    /// Each branch's own waker, made for the task that polls the race.
    wakers: Option<[(Arc<Branch>, Waker); 2]>,
}

/// A branch's waker: notes that the branch has something to do, and wakes the task.
struct Branch {
    woken: AtomicBool,
    task: Waker,
}

impl Wake for Branch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<A, B, T> Future for Race<'_, A, B>
where
    A: Future<Output = T> + ?Sized,
    B: Future<Output = T> + ?Sized,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let same_task = this
            .wakers
            .as_ref()
            .is_some_and(|[(a, _), _]| a.task.will_wake(cx.waker()));
        if !same_task {
            // First poll, or polled from another task: both branches are polled (they then
            // register the new wakers wherever they wait).
            let branch = || {
                let branch = Arc::new(Branch {
                    woken: AtomicBool::new(true),
                    task: cx.waker().clone(),
                });
                let waker = Waker::from(Arc::clone(&branch));
                (branch, waker)
            };
            this.wakers = Some([branch(), branch()]);
        }
        let Some([(a_branch, a_waker), (b_branch, b_waker)]) = &this.wakers else {
            unreachable!("set above")
        };
        // The flag is taken before the poll: a wake-up during the poll is kept for the next.
        if a_branch.woken.swap(false, Ordering::AcqRel)
            && let Poll::Ready(end) = this.a.as_mut().poll(&mut Context::from_waker(a_waker))
        {
            return Poll::Ready(end);
        }
        if b_branch.woken.swap(false, Ordering::AcqRel)
            && let Poll::Ready(end) = this.b.as_mut().poll(&mut Context::from_waker(b_waker))
        {
            return Poll::Ready(end);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::{pin::pin, time::Duration};

    use super::*;

    #[tokio::test]
    async fn the_first_to_end_wins_and_only_the_woken_branch_is_polled() {
        let polls = [std::cell::Cell::new(0), std::cell::Cell::new(0)];
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        // A: polled once to start, then only when its channel says something.
        let a = pin!(async {
            polls[0].set(polls[0].get() + 1);
            let mut rx = rx;
            std::future::poll_fn(|cx| {
                polls[0].set(polls[0].get() + 1);
                Pin::new(&mut rx).poll(cx)
            })
            .await
            .unwrap()
        });
        // B: woken by its timer ten times, never ends.
        let b = pin!(async {
            loop {
                polls[1].set(polls[1].get() + 1);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let race = race(a, b);
        let send = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(7).unwrap();
        };
        let (won, ()) = tokio::join!(race, send);
        assert_eq!(won, 7);
        assert!(polls[1].get() > 5, "B ran: {}", polls[1].get());
        // A's poll_fn: its first poll, then the one its message woke (B's wake-ups, and the
        // join's, polled only B).
        assert_eq!(polls[0].get(), 1 + 2, "A polled {} times", polls[0].get());
    }
}
