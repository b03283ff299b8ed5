//! The proxy's order to close every session ([`Terminate`]), cheap to wait for: the relay
//! waits for it beside every read, so it is polled at every wake-up of every session.
//!
//! `tokio_util`'s `CancellationToken` did this before: polling its future takes the token's
//! lock, one lock for every session of every worker thread, several times a query (7% of the
//! proxy's instructions per `pgbench -S` transaction under callgrind, and a cache line that
//! both workers write). Here a wait registers its task's waker once, under a lock; every
//! later poll by the same task is one atomic load and a comparison.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

/// Set once, never reset.
#[derive(Default)]
pub struct Terminate {
    cancelled: AtomicBool,
    /// The wakers of the waits registered, by their key.
    waiting: Mutex<HashMap<u64, Waker>>,
    next_key: AtomicU64,
}

impl Terminate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Orders every session closed: wakes every wait.
    pub fn cancel(&self) {
        // Before the wakers are taken: a wait registered after that sees the flag.
        self.cancelled.store(true, Ordering::SeqCst);
        let waiting: Vec<Waker> = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, waker)| waker)
            .collect();
        for waker in waiting {
            waker.wake();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Ready once [`Self::cancel`] has been called.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            terminate: self,
            key: None,
            waker: None,
        }
    }
}

/// A wait for [`Terminate::cancel`]; one per session is kept and polled again and again.
pub struct Cancelled<'a> {
    terminate: &'a Terminate,
    /// Its key in `waiting`, once registered.
    key: Option<u64>,
    /// The waker registered, to tell whether a poll comes from the same task.
    waker: Option<Waker>,
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.terminate.is_cancelled() {
            return Poll::Ready(());
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let terminate = this.terminate;
        let key = *this
            .key
            .get_or_insert_with(|| terminate.next_key.fetch_add(1, Ordering::Relaxed));
        terminate
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, cx.waker().clone());
        this.waker = Some(cx.waker().clone());
        // Registered after the wakers were taken: the flag is already set.
        if terminate.is_cancelled() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.terminate
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_wait_ends_when_cancelled_and_none_before() {
        let terminate = std::sync::Arc::new(Terminate::new());
        let mut waits = Vec::new();
        for _ in 0..3 {
            let t = std::sync::Arc::clone(&terminate);
            waits.push(tokio::spawn(async move {
                let mut wait = t.cancelled();
                // Polled again and again by the same task, as the relay does.
                loop {
                    tokio::select! {
                        () = &mut wait => return,
                        () = tokio::task::yield_now() => {}
                    }
                }
            }));
        }
        tokio::task::yield_now().await;
        assert!(waits.iter().all(|w| !w.is_finished()));
        terminate.cancel();
        for wait in waits {
            tokio::time::timeout(std::time::Duration::from_secs(5), wait)
                .await
                .expect("woken")
                .unwrap();
        }
        // A wait made after the order is ready at once, and nothing is left registered.
        terminate.cancelled().await;
        assert!(terminate.waiting.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_wait_parked_on_it_alone_is_woken() {
        let terminate = std::sync::Arc::new(Terminate::new());
        let t = std::sync::Arc::clone(&terminate);
        let wait = tokio::spawn(async move { t.cancelled().await });
        tokio::task::yield_now().await;
        terminate.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), wait)
            .await
            .expect("woken")
            .unwrap();
    }
}
