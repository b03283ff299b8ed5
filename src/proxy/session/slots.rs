//! Connection slots: how many clients may be logging in, and how many may be logged in.
//!
//! A connection takes a login slot when its startup packet arrives and trades it for a
//! session slot once authenticated. The two limits are apart so that clients that never
//! finish their login (they also time out: `authentication_timeout`) cannot take the places
//! of authenticated ones: `max_client_connections` counts sessions only.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

pub struct Slots {
    sessions: AtomicUsize,
    logins: AtomicUsize,
    max_sessions: usize,
    max_logins: usize,
}

/// Why a connection gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max_client_connections` sessions are open.
    Sessions,
    /// `max_logins_in_progress` logins are under way.
    Logins,
}

impl Slots {
    pub fn new(max_sessions: usize, max_logins: usize) -> Arc<Self> {
        Arc::new(Self {
            sessions: AtomicUsize::new(0),
            logins: AtomicUsize::new(0),
            max_sessions,
            max_logins,
        })
    }

    /// A login slot for a new connection (refused early when sessions are full already:
    /// logging in would be for nothing).
    pub fn login(self: &Arc<Self>) -> Result<Slot, Full> {
        if self.sessions.load(Ordering::Acquire) >= self.max_sessions {
            return Err(Full::Sessions);
        }
        if self.logins.fetch_add(1, Ordering::AcqRel) >= self.max_logins {
            self.logins.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Logins);
        }
        Ok(Slot {
            slots: Arc::clone(self),
            session: AtomicBool::new(false),
        })
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    pub fn logins(&self) -> usize {
        self.logins.load(Ordering::Acquire)
    }
}

/// One connection's place: a login until [`Slot::authenticated`], a session after.
pub struct Slot {
    slots: Arc<Slots>,
    session: AtomicBool,
}

impl Slot {
    /// Trades the login slot for a session slot; `Err` (and the login slot kept, released
    /// on drop) when the sessions are full.
    pub fn authenticated(&self) -> Result<(), Full> {
        if self.session.load(Ordering::Acquire) {
            return Ok(());
        }
        let slots = &self.slots;
        if slots.sessions.fetch_add(1, Ordering::AcqRel) >= slots.max_sessions {
            slots.sessions.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Sessions);
        }
        slots.logins.fetch_sub(1, Ordering::AcqRel);
        self.session.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = if *self.session.get_mut() {
            &self.slots.sessions
        } else {
            &self.slots.logins
        };
        counter.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_in_progress_do_not_take_sessions_places() {
        let slots = Slots::new(2, 3);
        let stalled: Vec<Slot> = (0..3).map(|_| slots.login().unwrap()).collect();
        assert_eq!(slots.login().err(), Some(Full::Logins));
        drop(stalled);
        let a = slots.login().unwrap();
        let b = slots.login().unwrap();
        a.authenticated().unwrap();
        b.authenticated().unwrap();
        assert_eq!((slots.sessions(), slots.logins()), (2, 0));
        assert_eq!(slots.login().err(), Some(Full::Sessions));
        drop(a);
        let c = slots.login().unwrap();
        let d = slots.login().unwrap();
        c.authenticated().unwrap();
        assert_eq!(d.authenticated(), Err(Full::Sessions));
        drop((b, c, d));
        assert_eq!((slots.sessions(), slots.logins()), (0, 0));
    }
}
