//! What the server still owes an answer to, in order — so that the answers to messages the
//! proxy added to the stream (a target statement prepared beside the client's) are taken
//! out before the client sees them, and only those.
//!
//! The server answers messages strictly in order. The client→server side records every
//! message whose answer matters here: Parse (ParseComplete), Close (CloseComplete), Describe
//! (its RowDescription or NoData), and the points where the server says ReadyForQuery (Sync,
//! a simple Query, a FunctionCall). The server→client side pops them as the answers arrive.
//! After an error in the extended protocol the server skips every message up to the next
//! Sync, as it does; so does this queue. Messages whose answers are not recorded (Bind,
//! Execute) need nothing: the proxy never adds them, and they describe no rows.
//!
//! A Describe of a portal the target serves, and a simple Query sent as its target SQL,
//! carry how legacy describes the columns: their RowDescription is rewritten to say it.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed},
    },
};

use crate::{
    routing::route::Side,
    shadow::Offer,
    wire::messages::{self, backend},
};

/// How legacy describes each column of a statement served by the target.
pub type Described = Arc<LegacyColumns>;

/// Legacy's table OID, attribute number and type modifier of each column, written over the
/// target's RowDescription; from the second rewrite on, the last one is kept, since a
/// prepared statement's executions are described alike (libpq describes the portal at every
/// execution): the next one is compared and copied (~100 instructions) instead of walked and
/// rewritten field by field (~300 a column). The first is not kept: a simple Query's
/// columns are described afresh for each execution, and keeping its rewrite would copy the
/// description twice into two allocations that go with it.
#[derive(Debug)]
pub struct LegacyColumns {
    fields: Box<[(u32, i16, i32)]>,
    last: std::sync::Mutex<Kept>,
}

/// What a [`LegacyColumns`] keeps of its rewrites.
#[derive(Debug, Default)]
enum Kept {
    /// Nothing rewritten yet.
    #[default]
    Nothing,
    /// One rewrite made, not kept.
    Once,
    /// The target's last RowDescription body and what it was rewritten to (bodies of at most
    /// [`KEPT_DESCRIPTION`] bytes).
    Rewrite(Box<[u8]>, Box<[u8]>),
}

/// The largest RowDescription body whose rewrite is kept (a few dozen columns).
const KEPT_DESCRIPTION: usize = 2048;

impl LegacyColumns {
    pub fn new(fields: impl IntoIterator<Item = (u32, i16, i32)>) -> Described {
        Arc::new(Self {
            fields: fields.into_iter().collect(),
            last: std::sync::Mutex::new(Kept::Nothing),
        })
    }

    /// Rewrites a RowDescription `body` in place (same size) to legacy's identities; false,
    /// leaving it untouched, if it does not have this statement's columns.
    pub fn rewrite(&self, body: &mut [u8]) -> bool {
        // A poisoned lock only means a panic mid-copy: the kept pair is checked whole.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Kept::Rewrite(from, to) = &*last
            && **from == *body
        {
            body.copy_from_slice(to);
            return true;
        }
        let keep = !matches!(*last, Kept::Nothing) && body.len() <= KEPT_DESCRIPTION;
        let from: Option<Box<[u8]>> = keep.then(|| body.into());
        if !messages::describe_as(body, &self.fields) {
            return false;
        }
        *last = match from {
            Some(from) => Kept::Rewrite(from, Box::from(&*body)),
            None => Kept::Once,
        };
        true
    }
}

impl PartialEq for LegacyColumns {
    fn eq(&self, other: &Self) -> bool {
        self.fields == other.fields
    }
}

impl Eq for LegacyColumns {}

/// A message waiting for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Awaited {
    /// Parse → ParseComplete; `injected`: the proxy's, its answer is not the client's. `seq`
    /// names the Parse to the session's statements: one the server did not carry out (it
    /// failed, or an earlier error made the server skip it) is reported back
    /// ([`Flow::take_parse_outcomes`]), since the statement it was to create does not exist.
    Parse { injected: bool, seq: u64 },
    /// Close → CloseComplete.
    Close { injected: bool },
    /// Sync → ReadyForQuery.
    Sync,
    /// A simple Query or a FunctionCall: everything up to its ReadyForQuery is its own
    /// (an error inside it skips nothing else).
    Query { described: Option<Described> },
    /// Describe → (ParameterDescription and) RowDescription or NoData.
    Describe { described: Option<Described> },
    /// The proxy's own simple Query asking how the session resolves the table's bare name
    /// ([`Flow::ask_names`]): everything up to its ReadyForQuery is the proxy's.
    Names,
}

/// What to do with an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The client's: forward it.
    Forward,
    /// The proxy's: drop it.
    Swallow,
    /// An error answering the proxy's own message: forward it (the server now skips the
    /// client's messages up to Sync too, and the client must learn why) and stop routing
    /// that statement.
    InjectedFailed,
    /// A RowDescription of the target's: to be described as legacy describes these
    /// columns (`messages::describe_as`).
    Described(Described),
}

#[derive(Debug, Default)]
pub struct Pending {
    queue: VecDeque<Awaited>,
    /// Parses the server did not carry out, by their `seq`.
    lost: Vec<u64>,
    /// The proxy's Parses the server confirmed (ParseComplete), by their `seq`.
    confirmed: Vec<u64>,
}

impl Pending {
    pub fn push(&mut self, awaited: Awaited) {
        self.queue.push_back(awaited);
    }

    /// A ParseComplete or CloseComplete arrived.
    pub fn complete(&mut self) -> Answer {
        match self.queue.front() {
            Some(Awaited::Parse { injected, .. } | Awaited::Close { injected }) => {
                let injected = *injected;
                if let Some(Awaited::Parse {
                    injected: true,
                    seq,
                }) = self.queue.pop_front()
                {
                    self.confirmed.push(seq);
                }
                if injected {
                    Answer::Swallow
                } else {
                    Answer::Forward
                }
            }
            // Not recorded (the queue was empty or out of step): never hide anything.
            _ => Answer::Forward,
        }
    }

    /// An ErrorResponse arrived.
    pub fn error(&mut self) -> Answer {
        let injected = match self.queue.front() {
            // Inside a simple Query: it ends at its own ReadyForQuery.
            Some(Awaited::Query { .. }) | None => return Answer::Forward,
            Some(Awaited::Parse { injected, .. } | Awaited::Close { injected }) => *injected,
            Some(Awaited::Sync | Awaited::Describe { .. } | Awaited::Names) => false,
        };
        // The server skips everything up to the next Sync (the failed message included: a
        // Parse that failed created nothing either).
        while let Some(front) = self.queue.front() {
            if matches!(
                front,
                Awaited::Sync | Awaited::Query { .. } | Awaited::Names
            ) {
                break;
            }
            if let Some(Awaited::Parse { seq, .. }) = self.queue.pop_front() {
                self.lost.push(seq);
            }
        }
        if injected {
            Answer::InjectedFailed
        } else {
            Answer::Forward
        }
    }

    /// A ReadyForQuery arrived: everything up to the Sync or Query it answers is done. A
    /// Parse still waiting was skipped after an error (one that came in before the Parse was
    /// sent on, so [`Self::error`] could not see it): it created nothing.
    pub fn ready(&mut self) {
        while let Some(front) = self.queue.pop_front() {
            match front {
                Awaited::Sync | Awaited::Query { .. } | Awaited::Names => return,
                Awaited::Parse { seq, .. } => self.lost.push(seq),
                Awaited::Close { .. } | Awaited::Describe { .. } => {}
            }
        }
    }

    /// A RowDescription arrived: how legacy would describe its columns, when the target
    /// produced it.
    pub fn row_description(&mut self) -> Option<Described> {
        match self.queue.front() {
            Some(Awaited::Describe { described }) => {
                let described = described.clone();
                self.queue.pop_front();
                described
            }
            Some(Awaited::Query { described }) => described.clone(),
            _ => None,
        }
    }

    /// A NoData arrived.
    pub fn no_data(&mut self) {
        if let Some(Awaited::Describe { .. }) = self.queue.front() {
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's Parse numbered `seq`.
    fn parse(seq: u64) -> Awaited {
        Awaited::Parse {
            injected: false,
            seq,
        }
    }

    /// The proxy's own Parse numbered `seq`.
    fn injected_parse(seq: u64) -> Awaited {
        Awaited::Parse {
            injected: true,
            seq,
        }
    }

    /// A queue holding `awaited`, in order.
    fn pending(awaited: impl IntoIterator<Item = Awaited>) -> Pending {
        let mut p = Pending::default();
        for a in awaited {
            p.push(a);
        }
        p
    }

    const INJECTED_CLOSE: Awaited = Awaited::Close { injected: true };

    #[test]
    fn injected_answers_are_swallowed_in_order() {
        let mut p = pending([parse(0), INJECTED_CLOSE, injected_parse(0), Awaited::Sync]);
        assert_eq!(p.complete(), Answer::Forward);
        assert_eq!(p.complete(), Answer::Swallow);
        assert_eq!(p.complete(), Answer::Swallow);
        p.ready();
        assert_eq!(p.complete(), Answer::Forward);
    }

    #[test]
    fn an_error_skips_to_sync_like_the_server() {
        // The client's Parse fails: the proxy's Close and Parse are skipped by the server.
        let mut p = pending([
            parse(0),
            INJECTED_CLOSE,
            injected_parse(0),
            Awaited::Sync,
            parse(0),
        ]);
        assert_eq!(p.error(), Answer::Forward);
        assert_eq!(p.lost.len(), 2, "the failed Parse and the skipped one");
        p.ready();
        assert_eq!(p.complete(), Answer::Forward);

        // The proxy's Parse fails: forwarded, reported.
        let mut p = pending([injected_parse(0), Awaited::Sync]);
        assert_eq!(p.error(), Answer::InjectedFailed);

        // An error inside a simple Query skips nothing.
        let mut p = pending([Awaited::Query { described: None }, injected_parse(0)]);
        assert_eq!(p.error(), Answer::Forward);
        p.ready();
        assert_eq!(p.complete(), Answer::Swallow);
    }

    /// In a pipeline the server's error can be in before the client's next messages have
    /// been sent on: a Parse queued after the error is skipped all the same, answered by
    /// nothing, and must be reported lost when the Sync's ReadyForQuery arrives (else a
    /// Bind of that statement in a later batch would be served from its target variant,
    /// where the server says it does not exist — seed 24 of the safe-cutover model).
    #[test]
    fn a_parse_sent_after_the_error_came_in_is_lost_too() {
        let mut p = pending([parse(1)]);
        assert_eq!(p.complete(), Answer::Forward);
        // An Execute fails (Bind and Execute are not queued); nothing is waiting yet.
        assert_eq!(p.error(), Answer::Forward);
        for a in [parse(2), INJECTED_CLOSE, injected_parse(3), Awaited::Sync] {
            p.push(a);
        }
        p.ready();
        assert_eq!(
            p.lost,
            vec![2, 3],
            "skipped after the error, never answered"
        );
        assert!(p.confirmed.is_empty());
    }

    #[test]
    fn a_kept_rewrite_is_the_rewrite() {
        // RowDescription of one column "id": table 0, attnum 0, int8, typlen 8, typmod -1,
        // in `format`.
        let description = |format: i16| {
            let mut body = 1i16.to_be_bytes().to_vec();
            body.extend_from_slice(b"id\0");
            body.extend_from_slice(&0u32.to_be_bytes());
            body.extend_from_slice(&0i16.to_be_bytes());
            body.extend_from_slice(&20u32.to_be_bytes());
            body.extend_from_slice(&8i16.to_be_bytes());
            body.extend_from_slice(&(-1i32).to_be_bytes());
            body.extend_from_slice(&format.to_be_bytes());
            body
        };
        let legacy = LegacyColumns::new([(16384, 1, -1)]);
        for (n, format) in [0, 0, 0, 1, 1, 0].into_iter().enumerate() {
            let mut fresh = description(format);
            assert!(messages::describe_as(&mut fresh, &[(16384, 1, -1)]));
            let mut kept = description(format);
            assert!(legacy.rewrite(&mut kept));
            assert_eq!(kept, fresh, "format {format}");
            // The first rewrite is not kept (a simple Query's columns are described once);
            // from the second on, the last one is.
            let last = legacy.last.lock().unwrap();
            match (n, &*last) {
                (0, Kept::Once) => {}
                (1.., Kept::Rewrite(from, to)) => {
                    assert_eq!(**from, *description(format));
                    assert_eq!(**to, *fresh);
                }
                (n, kept) => panic!("after rewrite {n}: {kept:?}"),
            }
        }
        // Another statement's columns: refused and untouched, kept rewrite or not.
        let mut two = description(0);
        two[1] = 2;
        let before = two.clone();
        assert!(!legacy.rewrite(&mut two));
        assert_eq!(two, before);
    }

    #[test]
    fn describes_of_target_portals_carry_legacy_columns() {
        let legacy: Described = LegacyColumns::new([(16384, 1, -1)]);
        let mut p = Pending::default();
        p.push(Awaited::Describe { described: None });
        p.push(Awaited::Describe {
            described: Some(Arc::clone(&legacy)),
        });
        p.push(Awaited::Sync);
        assert_eq!(p.row_description(), None);
        assert_eq!(p.row_description(), Some(legacy));
        p.ready();
        assert!(p.queue.is_empty());
    }
}

/// What the two directions of one session's relay share: the answers the server owes, the
/// session's unsettled writes, and whether routing prepared statements is still safe.
#[derive(Debug, Default)]
pub struct Flow {
    answers: Mutex<Pending>,
    writes: Writes,
    /// A target variant the proxy prepared failed: this session routes no more prepared
    /// statements (the client saw the error).
    routing_broken: AtomicBool,
    /// The side serving the writes and locking reads of the open transaction: 0 none yet,
    /// 1 legacy, 2 the target. Meaningful while a write is unsettled (a transaction that
    /// has written has not ended); the next transaction decides again.
    write_side: AtomicU8,
    /// Something was served by the target: its errors are given legacy's names.
    target_served: AtomicBool,
    /// How this session resolves the legacy table's bare name (`NAMES_*`).
    names: AtomicU8,
    /// What the answer to the question in flight says (`NAMES_LEGACY` or `NAMES_ELSEWHERE`).
    names_answer: AtomicU8,
    /// The proxy's names question has been sent and its ReadyForQuery has not come back:
    /// the server side takes its rows out.
    question_in_flight: AtomicBool,
    /// Woken when the question is answered.
    names_answered: tokio::sync::Notify,
    /// The last ReadyForQuery said idle: no transaction is open.
    idle: AtomicBool,
    /// Parses lost or confirmed wait to be taken ([`Self::take_parse_outcomes`]): looked
    /// at before every client message, so the answers' lock is taken only when there are.
    parse_outcomes: AtomicBool,
    /// The client has sent extended-protocol messages that no Sync has closed yet.
    batch_open: AtomicBool,
    /// Reads for the shadow, held from their Execute (or simple Query) until a ReadyForQuery
    /// has been relayed to the client ([`Self::defer`], [`Self::take_offers`]).
    offers: Mutex<Vec<Offer>>,
    /// Some are held: looked at after every read that carried a ReadyForQuery, so that
    /// their lock is taken only when there are.
    offers_held: AtomicBool,
}

/// The room a session's held offers keep once handed over (a pipelined batch of many
/// compared reads lets its room go).
const OFFERS_KEPT: usize = 4;

/// How a session resolves the legacy table's bare name (`affiliates`): its search_path (from
/// the startup packet, the role's or database's settings, `SET`), its temporary tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The bare name is the legacy table.
    Legacy,
    /// The bare name is another table (or none): its statements are not the legacy table's.
    Elsewhere,
    /// Not known yet, or it may have changed since it was asked.
    Unknown,
}

const NAMES_UNKNOWN: u8 = 0;
const NAMES_ASKED: u8 = 1;
const NAMES_LEGACY: u8 = 2;
const NAMES_ELSEWHERE: u8 = 3;

impl Flow {
    /// A message whose answer matters is being sent; a Sync or a Query also ends a batch.
    pub fn expect(&self, awaited: Awaited) {
        if matches!(awaited, Awaited::Sync | Awaited::Query { .. }) {
            self.writes.batch_sent();
        }
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(awaited);
    }

    /// A write has been sent whose transaction has not been seen to end.
    pub fn unsettled(&self) -> bool {
        self.writes.unsettled()
    }

    /// An execution is being sent to the target.
    pub fn target_sent(&self) {
        self.target_served.store(true, Relaxed);
    }

    /// Whether this session has had anything served by the target.
    pub fn target_served(&self) -> bool {
        self.target_served.load(Relaxed)
    }

    /// The side the open transaction's writes and locking reads are served by, once its
    /// first one was sent.
    pub fn write_side(&self) -> Option<Side> {
        if !self.writes.unsettled() {
            return None;
        }
        match self.write_side.load(Relaxed) {
            1 => Some(Side::Legacy),
            2 => Some(Side::Target),
            _ => None,
        }
    }

    /// A write or locking read is being sent, served by `side`: the first of its
    /// transaction decides the transaction's write side.
    pub fn write_sent_to(&self, side: Side) {
        if self.write_side().is_none() {
            let code = match side {
                Side::Legacy => 1,
                Side::Target => 2,
            };
            self.write_side.store(code, Relaxed);
        }
        self.writes.write_sent();
    }

    /// How the session resolves the table's bare name, as far as the proxy knows.
    pub fn names(&self) -> Resolution {
        match self.names.load(Relaxed) {
            NAMES_LEGACY => Resolution::Legacy,
            NAMES_ELSEWHERE => Resolution::Elsewhere,
            _ => Resolution::Unknown,
        }
    }

    /// A statement that may change how the session resolves the bare name is being sent: ask
    /// again before the next statement that depends on it.
    pub fn names_may_change(&self) {
        self.names.store(NAMES_UNKNOWN, Relaxed);
    }

    /// A client message of type `tag` is being sent (for [`Self::ask_names`]: whether an
    /// extended-protocol batch is open).
    pub fn client_sent(&self, tag: u8) {
        use crate::wire::messages::frontend;
        match tag {
            frontend::SYNC => self.batch_open.store(false, Relaxed),
            frontend::PARSE
            | frontend::BIND
            | frontend::EXECUTE
            | frontend::DESCRIBE
            | frontend::CLOSE
            | frontend::FLUSH => self.batch_open.store(true, Relaxed),
            _ => {}
        }
    }

    /// Between transactions with nothing owed: the last ReadyForQuery said idle, no
    /// extended-protocol batch is open and every batch sent has been answered. Where a pause
    /// may hold the session's next message.
    pub fn at_rest(&self) -> bool {
        self.idle.load(Relaxed) && !self.batch_open.load(Relaxed) && self.writes.all_answered()
    }

    /// Whether the proxy may ask its names question now, and if so records it as asked: the
    /// answer is unknown, and the session is between transactions with nothing owed (the
    /// question then runs as a transaction of its own and changes nothing of the client's).
    /// The caller sends the question before the client's next message.
    pub fn ask_names(&self) -> bool {
        if self.names.load(Relaxed) != NAMES_UNKNOWN
            || !self.idle.load(Relaxed)
            || self.batch_open.load(Relaxed)
        {
            return false;
        }
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if !answers.queue.is_empty() {
            return false;
        }
        answers.push(Awaited::Names);
        self.names_answer.store(NAMES_ELSEWHERE, Relaxed);
        self.question_in_flight.store(true, Relaxed);
        self.names.store(NAMES_ASKED, Relaxed);
        true
    }

    /// Waits (up to `patience`) for the answer to the names question, if one is in flight.
    pub async fn names_answered(&self, patience: std::time::Duration) {
        let wait = async {
            loop {
                let notified = self.names_answered.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.names.load(Relaxed) != NAMES_ASKED {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(patience, wait).await;
    }

    /// Whether a server message belongs to the proxy's names question (its rows and
    /// command tag, which the relay does not otherwise look at, must be read too).
    pub fn question_in_flight(&self) -> bool {
        self.question_in_flight.load(Relaxed)
    }

    /// A server message answering the names question: the proxy's, taken out — except what
    /// the server sends unasked (notices, notifications, parameter changes).
    #[cold]
    #[inline(never)]
    fn names_reply(&self, answers: &mut Pending, tag: u8, body: &[u8]) -> Answer {
        match tag {
            backend::DATA_ROW => {
                if messages::first_value(body) == Some(b"t".as_slice()) {
                    self.names_answer.store(NAMES_LEGACY, Relaxed);
                }
                Answer::Swallow
            }
            backend::ROW_DESCRIPTION
            | backend::COMMAND_COMPLETE
            | backend::EMPTY_QUERY_RESPONSE
            | backend::ERROR_RESPONSE => Answer::Swallow,
            backend::READY_FOR_QUERY => {
                answers.queue.pop_front();
                self.idle
                    .store(messages::ready_status(body) == Some(b'I'), Relaxed);
                self.question_in_flight.store(false, Relaxed);
                // Unless a statement that may change the answer was sent meanwhile.
                let _ = self.names.compare_exchange(
                    NAMES_ASKED,
                    self.names_answer.load(Relaxed),
                    Relaxed,
                    Relaxed,
                );
                self.names_answered.notify_waiters();
                Answer::Swallow
            }
            _ => Answer::Forward,
        }
    }

    /// Whether [`Self::take_parse_outcomes`] has something to give (one atomic load: looked
    /// at before every client message).
    #[inline]
    pub fn parse_outcomes_waiting(&self) -> bool {
        self.parse_outcomes.load(Relaxed)
    }

    /// The `seq` of every Parse the server did not carry out, and of every Parse of the
    /// proxy's the server confirmed, since the last call.
    pub fn take_parse_outcomes(&self) -> (Vec<u64>, Vec<u64>) {
        if !self.parse_outcomes.swap(false, Relaxed) {
            return (Vec::new(), Vec::new());
        }
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        (
            std::mem::take(&mut answers.lost),
            std::mem::take(&mut answers.confirmed),
        )
    }

    fn note_parse_outcomes(&self, answers: &Pending) {
        if !answers.lost.is_empty() || !answers.confirmed.is_empty() {
            self.parse_outcomes.store(true, Relaxed);
        }
    }

    /// Holds a read for the shadow until the client has had its answer: the comparison's
    /// statements then do not compete with the statement they compare, nor the hand-off
    /// (which may wake a shadow thread) delay it. Out of line: `benches/instructions.rs`
    /// counts the shadow's hand-off by this function's calls.
    #[inline(never)]
    pub fn defer(&self, offer: Offer) {
        let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
        if offers.capacity() == 0 {
            // One read per batch is the rule.
            offers.reserve_exact(1);
        }
        offers.push(offer);
        self.offers_held.store(true, Relaxed);
    }

    /// Whether reads are held ([`Self::take_offers`] has some to give).
    #[inline]
    pub fn offers_waiting(&self) -> bool {
        self.offers_held.load(Relaxed)
    }

    /// The reads held so far, swapped into `into` (empty): called once a ReadyForQuery has
    /// been relayed, and when the session ends.
    pub fn take_offers(&self, into: &mut Vec<Offer>) {
        if !self.offers_held.swap(false, Relaxed) {
            return;
        }
        if into.capacity() > OFFERS_KEPT {
            *into = Vec::new();
        }
        let mut offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *offers, into);
    }

    /// Batches sent so far (each ends with a Sync, a simple Query or a FunctionCall).
    pub fn batches_sent(&self) -> u64 {
        self.writes.sent.load(Relaxed)
    }

    pub fn routing_broken(&self) -> bool {
        self.routing_broken.load(Relaxed)
    }

    /// Where a server message (`tag`, whole `body` for the kinds the relay inspects) stands
    /// in the answers the server owes.
    pub fn answer(&self, tag: u8, body: &[u8]) -> Answer {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if self.question_in_flight() && answers.queue.front() == Some(&Awaited::Names) {
            return self.names_reply(&mut answers, tag, body);
        }
        match tag {
            backend::ROW_DESCRIPTION => answers
                .row_description()
                .map_or(Answer::Forward, Answer::Described),
            backend::NO_DATA => {
                answers.no_data();
                Answer::Forward
            }
            backend::PARSE_COMPLETE | backend::CLOSE_COMPLETE => {
                let answer = answers.complete();
                self.note_parse_outcomes(&answers);
                answer
            }
            backend::ERROR_RESPONSE => self.error(&mut answers),
            backend::READY_FOR_QUERY => {
                answers.ready();
                self.note_parse_outcomes(&answers);
                let status = messages::ready_status(body);
                self.idle.store(status == Some(b'I'), Relaxed);
                self.writes.ready(status.unwrap_or(b'I'));
                Answer::Forward
            }
            _ => Answer::Forward,
        }
    }

    /// An ErrorResponse arrived (out of line: [`Self::answer`] runs for every answer).
    #[cold]
    #[inline(never)]
    fn error(&self, answers: &mut Pending) -> Answer {
        let answer = answers.error();
        self.note_parse_outcomes(answers);
        if answer == Answer::InjectedFailed {
            self.routing_broken.store(true, Relaxed);
            tracing::warn!(
                "a target statement the proxy prepared failed; this session's prepared statements stay on legacy"
            );
        }
        answer
    }
}

/// Whether the session has written in a transaction that has not ended yet — seen from both
/// directions of the relay. Dual-write brings v2 level with legacy at COMMIT, so until then a
/// read of the transaction's own writes must be served by legacy: the session's reads stay
/// there while a write is unsettled.
///
/// Counted in batches (a Sync, a simple Query or a FunctionCall each end one, answered by one
/// ReadyForQuery): a write belongs to the batch being sent; it is settled once a
/// ReadyForQuery that says idle (`I`) answers that batch or a later one.
#[derive(Debug, Default)]
pub struct Writes {
    sent: AtomicU64,
    last_write: AtomicU64,
    answered: AtomicU64,
    settled: AtomicU64,
}

impl Writes {
    /// A write statement is being sent (in the current batch).
    pub fn write_sent(&self) {
        self.last_write.store(self.sent.load(Relaxed) + 1, Relaxed);
    }

    /// A Sync, Query or FunctionCall is being sent: the current batch ends.
    pub fn batch_sent(&self) {
        self.sent.fetch_add(1, Relaxed);
    }

    /// A ReadyForQuery arrived with this transaction status.
    pub fn ready(&self, status: u8) {
        // The ReadyForQuery that ends the startup answers no batch.
        if self.answered.load(Relaxed) >= self.sent.load(Relaxed) {
            return;
        }
        let answered = self.answered.fetch_add(1, Relaxed) + 1;
        if status == b'I' {
            self.settled.store(answered, Relaxed);
        }
    }

    /// Every batch sent has had its ReadyForQuery.
    pub fn all_answered(&self) -> bool {
        self.answered.load(Relaxed) >= self.sent.load(Relaxed)
    }

    /// A write has been sent whose transaction has not been seen to end.
    pub fn unsettled(&self) -> bool {
        self.last_write.load(Relaxed) > self.settled.load(Relaxed)
    }
}

#[cfg(test)]
mod writes_tests {
    use super::*;

    fn data_row(value: &[u8]) -> Vec<u8> {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend_from_slice(&(value.len() as i32).to_be_bytes());
        body.extend_from_slice(value);
        body
    }

    #[test]
    fn the_names_question_is_asked_between_transactions_only_and_its_answer_taken_out() {
        let flow = Flow::default();
        assert!(!flow.ask_names(), "not before the server said it is ready");
        assert_eq!(flow.answer(backend::READY_FOR_QUERY, b"I"), Answer::Forward);
        flow.client_sent(crate::wire::messages::frontend::PARSE);
        assert!(!flow.ask_names(), "not inside an extended-protocol batch");
        flow.client_sent(crate::wire::messages::frontend::SYNC);
        assert!(flow.ask_names());
        assert!(!flow.ask_names(), "once");
        assert_eq!(flow.names(), Resolution::Unknown);
        assert_eq!(flow.answer(backend::ROW_DESCRIPTION, b""), Answer::Swallow);
        assert_eq!(
            flow.answer(backend::DATA_ROW, &data_row(b"t")),
            Answer::Swallow
        );
        // What the server sends unasked is the client's.
        assert_eq!(flow.answer(backend::NOTICE_RESPONSE, b""), Answer::Forward);
        assert_eq!(
            flow.answer(backend::COMMAND_COMPLETE, b"SELECT 1\0"),
            Answer::Swallow
        );
        assert_eq!(flow.answer(backend::READY_FOR_QUERY, b"I"), Answer::Swallow);
        assert_eq!(flow.names(), Resolution::Legacy);
        assert!(!flow.question_in_flight());
        // Changed: asked again; a failed question leaves the table elsewhere (not routed).
        flow.names_may_change();
        assert!(flow.ask_names());
        assert_eq!(flow.answer(backend::ERROR_RESPONSE, b""), Answer::Swallow);
        assert_eq!(flow.answer(backend::READY_FOR_QUERY, b"I"), Answer::Swallow);
        assert_eq!(flow.names(), Resolution::Elsewhere);
        // A change sent while the question is in flight wins over its answer.
        flow.names_may_change();
        assert!(flow.ask_names());
        flow.names_may_change();
        assert_eq!(
            flow.answer(backend::DATA_ROW, &data_row(b"t")),
            Answer::Swallow
        );
        assert_eq!(flow.answer(backend::READY_FOR_QUERY, b"I"), Answer::Swallow);
        assert_eq!(flow.names(), Resolution::Unknown);
        // Inside a transaction: not asked.
        flow.expect(Awaited::Query { described: None });
        assert_eq!(flow.answer(backend::READY_FOR_QUERY, b"T"), Answer::Forward);
        assert!(!flow.ask_names());
    }

    #[test]
    fn a_write_is_settled_when_its_transaction_ends() {
        let w = Writes::default();
        assert!(!w.unsettled());
        // BEGIN; UPDATE … (one batch, answered "in a transaction")
        w.write_sent();
        w.batch_sent();
        w.ready(b'T');
        assert!(w.unsettled());
        // COMMIT
        w.batch_sent();
        w.ready(b'I');
        assert!(!w.unsettled());
        // An autocommit write, and a new transaction's write sent before its answer.
        w.write_sent();
        w.batch_sent();
        w.batch_sent(); // BEGIN
        w.write_sent();
        w.batch_sent();
        w.ready(b'I'); // answers the autocommit write
        assert!(w.unsettled(), "the later write's transaction is still open");
        w.ready(b'T');
        w.ready(b'T');
        assert!(w.unsettled());
    }
}
