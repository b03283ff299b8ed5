//! What the relay's threads count for the shadow: a read the queue had no room for
//! (`dropped`) and a read whose answer is known up front not to be determined
//! (`nondeterministic`). Counted with atomics, in a map read without a lock; the divergence
//! store adds them to each query type's counts at its next flush.
//!
//! It must never make a session wait for the shadow: the shadow's threads run at a lower
//! priority (`threads`), and one preempted while it held a lock a session thread wanted
//! would stall that session. Only the first count of a query type takes locks: its own,
//! and the store's metrics handles (which a comparison takes too) to find its label's.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicI64, Ordering::Relaxed},
};

use arc_swap::ArcSwap;
use metrics::Counter;

/// What a relay thread counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tallied {
    /// The shadow's queue had no room.
    Dropped,
    /// The statement's answer is not determined (a volatile function, a LIMIT that may tie).
    Nondeterministic,
}

impl Tallied {
    /// Every kind, in the order a [`Tally`] keeps them.
    pub const ALL: [Tallied; 2] = [Tallied::Dropped, Tallied::Nondeterministic];

    /// Where it is in [`Self::ALL`].
    fn index(self) -> usize {
        match self {
            Tallied::Dropped => 0,
            Tallied::Nondeterministic => 1,
        }
    }
}

/// One query type's counts since the last flush, and its label's metrics for each, in the
/// order of [`Tallied::ALL`].
struct Tally {
    pending: [AtomicI64; 2],
    metrics: [Counter; 2],
}

/// Query types a process tallies (past them, the store counts under its lock, as before).
const MAX_TALLIES: usize = 1024;

type Map = std::collections::HashMap<String, Arc<Tally>, foldhash::fast::RandomState>;

#[derive(Default)]
pub(super) struct Tallies {
    map: ArcSwap<Map>,
    /// Held while a query type's tally is added, so that two adds do not lose one.
    adding: Mutex<()>,
}

impl Tallies {
    /// Counts one `tallied` for `query_type`, and in its label's metric; `metrics` gives a
    /// new query type's (in the order of [`Tallied::ALL`]). False, counting nothing, when
    /// the map is full.
    pub fn add(
        &self,
        query_type: &str,
        tallied: Tallied,
        metrics: impl FnOnce() -> [Counter; 2],
    ) -> bool {
        if let Some(tally) = self.map.load().get(query_type) {
            tally.count(tallied);
            return true;
        }
        // A poisoned lock guards nothing but the order of adds.
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.map.load_full();
        if let Some(tally) = current.get(query_type) {
            tally.count(tallied);
            return true;
        }
        if current.len() >= MAX_TALLIES {
            return false;
        }
        let tally = Arc::new(Tally {
            pending: Default::default(),
            metrics: metrics(),
        });
        tally.count(tallied);
        let mut map = Map::clone(&current);
        map.insert(query_type.to_owned(), tally);
        self.map.store(Arc::new(map));
        true
    }

    /// Takes every query type's counts since the last call: `each(query_type, [dropped,
    /// nondeterministic])`, for those that counted any.
    pub fn drain(&self, mut each: impl FnMut(&str, [i64; 2])) {
        for (query_type, tally) in self.map.load().iter() {
            let counts = tally.pending.each_ref().map(|n| n.swap(0, Relaxed));
            if counts != [0, 0] {
                each(query_type, counts);
            }
        }
    }
}

impl Tally {
    fn count(&self, tallied: Tallied) {
        self.pending[tallied.index()].fetch_add(1, Relaxed);
        self.metrics[tallied.index()].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_taken_once_and_past_the_bound_refused() {
        let tallies = Tallies::default();
        let noop = || [Counter::noop(), Counter::noop()];
        assert!(tallies.add("a", Tallied::Dropped, noop));
        assert!(tallies.add("a", Tallied::Dropped, noop));
        assert!(tallies.add("a", Tallied::Nondeterministic, noop));
        assert!(tallies.add("b", Tallied::Nondeterministic, noop));
        let mut seen = Vec::new();
        tallies.drain(|q, counts| seen.push((q.to_owned(), counts)));
        seen.sort();
        assert_eq!(
            seen,
            [("a".to_owned(), [2, 1]), ("b".to_owned(), [0, 1])],
            "each query type's counts"
        );
        let mut again = 0;
        tallies.drain(|_, _| again += 1);
        assert_eq!(again, 0, "taken once");
        for n in 0..MAX_TALLIES {
            tallies.add(&format!("q{n}"), Tallied::Dropped, noop);
        }
        assert!(
            !tallies.add("one too many", Tallied::Dropped, noop),
            "a full map refuses (the store then counts under its lock)"
        );
        assert!(
            tallies.add("a", Tallied::Dropped, noop),
            "a known one still counts"
        );
    }
}
