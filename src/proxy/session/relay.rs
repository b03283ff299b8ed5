//! The relay: frames from the client to the upstream and back, as the peers sent them.
//!
//! Both directions run concurrently in the session's task (a client may pipeline more than
//! the sockets' buffers hold while the server answers, so a relay that only moves one way
//! at a time can deadlock). Each direction reads what is available, walks the frame
//! headers, looks at the few frames it must (whole), streams the rest — a 50 MB DataRow is
//! forwarded as it arrives, never buffered whole — and writes everything it read in one
//! write. Frames are forwarded byte for byte, except the server's BackendKeyData (replaced
//! by the proxy's key). The login is over before the relay starts (`session::login`).

use std::{
    pin::pin,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio_postgres::error::SqlState;

use super::{
    Shared,
    clients::{Client, State},
    pending::{Answer, Flow},
    prepared::error_with_client_names,
    statements::{MAX_INSPECTED_BIND, Statements},
};
use crate::{
    proxy::{
        cancel::KeyGuard,
        io::{
            Duplex, WriteNow,
            buffers::{ReadReady, read_some},
            outgoing::Outgoing,
            race::race,
        },
    },
    shadow::{Offer, Shadow},
    wire::{
        self, WireError,
        messages::{self, backend, frontend},
    },
};

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// The client closed its socket (its transaction, if any, rolls back upstream).
    ClientClosed,
    /// The client said Terminate.
    ClientTerminated,
    /// The upstream closed (after a FATAL it sent, or unexpectedly: the client got 08006).
    UpstreamClosed,
    /// Closed by the proxy's shutdown (57P01).
    Shutdown,
    /// A malformed or oversized client message (08P01).
    ProtocolViolation(WireError),
}

/// Bytes of a Bind that hold its portal's and statement's names (each at most 64 bytes
/// from any real driver); the rest of the message streams through.
const BIND_PREFIX: usize = 256;
/// A buffer grown past this (a large message inspected whole) is released once empty.
const KEEP_BUFFER: usize = 1 << 20;
/// No server message is refused for size: PostgreSQL itself bounds them.
const MAX_SERVER_MESSAGE: usize = usize::MAX;

pub struct Relay<'a, C, U> {
    client: &'a mut C,
    upstream: &'a mut U,
    id: u32,
    shared: &'a Shared,
    /// The shadow, when this session's database is the one it reads.
    shadow: Option<&'a Shadow>,
    /// This session in the registry (`SHOW CLIENTS`, `PAUSE`).
    me: &'a Client,
}

impl<'a, C: Duplex, U: Duplex> Relay<'a, C, U> {
    pub fn new(
        client: &'a mut C,
        upstream: &'a mut U,
        id: u32,
        shared: &'a Shared,
        shadow: Option<&'a Shadow>,
        me: &'a Client,
    ) -> Self {
        Self {
            client,
            upstream,
            id,
            shared,
            shadow,
            me,
        }
    }

    pub async fn run(self) -> End {
        let shared = self.shared;
        shared.metrics.clients.increment(1.0);
        let (mut client_rd, mut client_wr) = self.client.halves();
        let (mut upstream_rd, mut upstream_wr) = self.upstream.halves();

        // Whether the client has been sent only whole frames, so that a proxy-made error
        // can be written to it without cutting a frame in two.
        let client_at_boundary = AtomicBool::new(true);
        let flow = Flow::default();
        let mut to_upstream = ClientToServer {
            shared,
            me: self.me,
            flow: &flow,
            buf: BytesMut::new(),
            out: Outgoing::default(),
            streaming: 0,
            statements: Statements::new(shared, self.shadow, self.id, &flow),
        };
        let mut to_client = ServerToClient {
            shared,
            id: self.id,
            buf: BytesMut::new(),
            out: Outgoing::default(),
            streaming: 0,
            last_was_fatal: false,
            key_guard: None,
            at_boundary: &client_at_boundary,
            flow: &flow,
            me: self.me,
            shadow: self.shadow,
            offers: Vec::new(),
        };

        // Each direction is polled only when something it waits for happened (`race`).
        let end = race(
            pin!(to_upstream.run(&mut client_rd, &mut upstream_wr)),
            pin!(to_client.run(&mut upstream_rd, &mut client_wr)),
        )
        .await;
        shared.metrics.clients.decrement(1.0);
        drop((client_rd, client_wr, upstream_rd, upstream_wr));
        // Reads whose answer the session did not live to relay are compared all the same.
        to_client.hand_offers();

        let (code, message) = match &end {
            End::ProtocolViolation(error) => {
                shared.metrics.protocol_violations.increment(1);
                tracing::warn!(%error, "protocol violation");
                (
                    SqlState::PROTOCOL_VIOLATION,
                    format!("invalid frontend message: {error}"),
                )
            }
            End::Shutdown => (
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection because the cutover proxy is shutting down".to_owned(),
            ),
            End::UpstreamClosed if !to_client.last_was_fatal => {
                shared.metrics.upstream_lost.increment(1);
                (
                    SqlState::CONNECTION_FAILURE,
                    "server closed the connection unexpectedly (connection to the database server through cutover was lost)".to_owned(),
                )
            }
            _ => return end,
        };
        if client_at_boundary.load(Relaxed) {
            super::refuse(self.client, &code, &message).await;
        }
        end
    }
}

/// Client → upstream.
struct ClientToServer<'s> {
    shared: &'s Shared,
    me: &'s Client,
    flow: &'s Flow,
    buf: BytesMut,
    /// What the read became so far, when the relay replaced a frame of it.
    out: Outgoing,
    /// Bytes of a frame still to stream through without looking.
    streaming: usize,
    statements: Statements<'s>,
}

/// The upstream is gone. Give the other direction a moment to relay what the server said
/// before closing (a FATAL error, usually).
async fn upstream_gone() -> End {
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    End::UpstreamClosed
}

impl ClientToServer<'_> {
    /// Sends what the read became so far and the `ready` bytes after it, then `frames` in
    /// the place of the `total` bytes that follow (dropped), in one write; false if the
    /// upstream is gone.
    async fn send_with<W: WriteNow>(
        &mut self,
        upstream: &mut W,
        ready: usize,
        total: usize,
        frames: &[u8],
    ) -> bool {
        let ready = self.out.splice(&mut self.buf, ready, total, frames);
        self.out.send(upstream, &mut self.buf, ready).await
    }

    async fn run<R, W>(&mut self, client: &mut R, upstream: &mut W) -> End
    where
        R: ReadReady,
        W: WriteNow,
    {
        let max = self.shared.config.max_message_bytes;
        loop {
            // No buffer held while the client has nothing to say (see `buffers`).
            match read_some(client, &mut self.buf).await {
                Ok(0) | Err(_) => return End::ClientClosed,
                Ok(_) => {}
            }
            // Active first, then the pause read: see `Client::set`.
            self.me.set(State::Active);
            if self.shared.clients.paused()
                && self.streaming == 0
                && self.flow.at_rest()
                && self.buf.first() != Some(&frontend::TERMINATE)
            {
                // Held at a transaction boundary until RESUME (nothing sent yet).
                self.me.set(State::Held);
                tokio::select! {
                    _ = Box::pin(self.shared.clients.hold()) => {}
                    _ = self.shared.terminate.cancelled() => return End::Shutdown,
                }
                self.me.set(State::Active);
            }
            let mut ready = 0;
            let mut terminate = false;
            loop {
                if self.streaming > 0 {
                    let take = self.streaming.min(self.buf.len() - ready);
                    ready += take;
                    self.streaming -= take;
                    if self.streaming > 0 {
                        break;
                    }
                }
                let header = match wire::header(&self.buf[ready..], max) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => {
                        // The whole frames before it go on, as PostgreSQL would have executed
                        // them before failing at this one: a write among them is not dropped.
                        let _ = self.out.send(upstream, &mut self.buf, ready).await;
                        return End::ProtocolViolation(e);
                    }
                };
                let available = self.buf.len() - ready;
                match header.tag {
                    frontend::QUERY
                    | frontend::PARSE
                    | frontend::EXECUTE
                    | frontend::CLOSE
                    | frontend::SYNC
                    | frontend::DESCRIBE
                    | frontend::FUNCTION_CALL
                    | frontend::TERMINATE => {
                        if available < header.total {
                            self.buf.reserve(header.total - available);
                            break;
                        }
                        if let Some(question) = self
                            .statements
                            .names_question(header.tag, &self.buf[ready + 5..ready + header.total])
                        {
                            // Asked first, in its own transaction; the statement waits for
                            // the answer (one round trip, once per session or change).
                            if !self.send_with(upstream, ready, 0, &question).await {
                                return upstream_gone().await;
                            }
                            ready = 0;
                            Box::pin(self.statements.await_names()).await;
                        }
                        self.statements.client_sent(header.tag);
                        if matches!(
                            header.tag,
                            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
                        ) {
                            self.me.batch_sent();
                        }
                        if header.tag == frontend::QUERY
                            && let Some(check) = self
                                .statements
                                .query_check_to_await(&self.buf[ready + 5..ready + header.total])
                        {
                            Box::pin(self.statements.await_check(check)).await;
                        }
                        let replacement = self
                            .statements
                            .inspect(header.tag, &self.buf[ready + 5..ready + header.total]);
                        terminate |= header.tag == frontend::TERMINATE;
                        match replacement {
                            None => ready += header.total,
                            Some(frame) => {
                                // Sent with the rest of the read.
                                ready = self.out.splice(&mut self.buf, ready, header.total, &frame);
                            }
                        }
                    }
                    tag => {
                        if tag != frontend::BIND {
                            self.statements.client_sent(tag);
                        } else {
                            self.statements.settle();
                            // Bind starts with the portal's and the statement's names; its
                            // parameters (possibly large) stream through unread — unless
                            // the execution may be routed or compared, and the Bind is small.
                            let prefix = header.total.min(BIND_PREFIX);
                            if available < prefix {
                                self.buf.reserve(prefix - available);
                                break;
                            }
                            let names = messages::bind_names(&self.buf[ready + 5..ready + prefix]);
                            if let Some(question) = names.and_then(|(_, statement)| {
                                self.statements.names_question_for_bind(statement)
                            }) {
                                if !self.send_with(upstream, ready, 0, &question).await {
                                    return upstream_gone().await;
                                }
                                ready = 0;
                                Box::pin(self.statements.await_names()).await;
                                // The Bind again, from the start of the buffer.
                                continue;
                            }
                            // Counted as sent once the question is settled (the question
                            // is asked only outside an extended-protocol batch).
                            self.statements.client_sent(tag);
                            if let Some((portal, statement)) = names {
                                let whole = if header.total <= MAX_INSPECTED_BIND {
                                    self.statements.bind_needs_whole(statement)
                                } else {
                                    None
                                };
                                if whole.is_some() && available < header.total {
                                    self.buf.reserve(header.total - available);
                                    break;
                                }
                                if whole.is_some_and(|w| w.routed_write)
                                    && let Some(check) =
                                        self.statements.bind_check_to_await(statement)
                                {
                                    Box::pin(self.statements.await_check(check)).await;
                                }
                                let whole = whole
                                    .map(|w| (&self.buf[ready + 5..ready + header.total], w.stage));
                                // The Bind up to its statement's name, what a routed one
                                // replaces.
                                let named = 5 + portal.len() + 1 + statement.len() + 1;
                                if let Some(frames) = self.statements.bind(portal, statement, whole)
                                {
                                    // Sent with the rest of the read, the Bind's values
                                    // where they were.
                                    ready = self.out.splice(&mut self.buf, ready, named, frames)
                                        + (header.total - named);
                                    continue;
                                }
                            }
                        }
                        if available >= header.total {
                            ready += header.total;
                        } else {
                            ready += available;
                            self.streaming = header.total - available;
                            break;
                        }
                    }
                }
            }
            // Flushed before the next read: over TLS, records the socket could not take yet
            // wait in the TLS session until a flush (or a next write that may never come).
            if !self.out.send(upstream, &mut self.buf, ready).await {
                return upstream_gone().await;
            }
            release_if_large(&mut self.buf);
            if terminate {
                let _ = upstream.flush().await;
                return End::ClientTerminated;
            }
        }
    }
}

/// Upstream → client.
struct ServerToClient<'s> {
    shared: &'s Shared,
    id: u32,
    buf: BytesMut,
    streaming: usize,
    /// The last frame relayed was a FATAL error: an upstream close is expected.
    last_was_fatal: bool,
    key_guard: Option<KeyGuard>,
    at_boundary: &'s AtomicBool,
    /// Shared with the client side (see [`Flow`]).
    flow: &'s Flow,
    me: &'s Client,
    /// What the read became so far, when the relay replaced a frame of it.
    out: Outgoing,
    /// The shadow, when this session's database is the one it reads.
    shadow: Option<&'s Shadow>,
    /// The reads for the shadow the client side held until their answers
    /// ([`Flow::defer`]), taken out to be handed over (kept empty between).
    offers: Vec<Offer>,
}

/// What to do with an inspected server frame.
enum Action {
    Forward,
    Replace(Bytes),
}

impl ServerToClient<'_> {
    /// Hands the shadow the reads the client side held (see [`Flow::defer`]).
    #[inline]
    fn hand_offers(&mut self) {
        // Only a session the shadow serves holds any.
        if self.flow.offers_waiting() {
            self.hand_held_offers();
        }
    }

    /// The shadow's hand-off on the relay's thread, out of line (`benches/instructions.rs`
    /// counts it apart by this name).
    #[inline(never)]
    fn hand_held_offers(&mut self) {
        self.flow.take_offers(&mut self.offers);
        for offer in self.offers.drain(..) {
            if let Some(shadow) = self.shadow {
                shadow.hand(offer);
            }
        }
    }

    async fn run<R, W>(&mut self, upstream: &mut R, client: &mut W) -> End
    where
        R: ReadReady,
        W: WriteNow,
    {
        // One wait for the whole session, polled at every wake-up (see `proxy::shutdown`).
        let shared = self.shared;
        let mut terminated = shared.terminate.cancelled();
        loop {
            // No buffer held while the server has nothing to say (see `buffers`).
            let read = tokio::select! {
                biased;
                () = &mut terminated, if self.streaming == 0 => return End::Shutdown,
                read = read_some(upstream, &mut self.buf) => read,
            };
            match read {
                Ok(0) | Err(_) => return End::UpstreamClosed,
                Ok(_) => {}
            }
            let mut ready = 0;
            // A ReadyForQuery is in this read: once relayed, the held reads are handed over.
            let mut answered = false;
            loop {
                if self.streaming > 0 {
                    let take = self.streaming.min(self.buf.len() - ready);
                    ready += take;
                    self.streaming -= take;
                    if self.streaming > 0 {
                        break;
                    }
                }
                let Ok(Some(header)) = wire::header(&self.buf[ready..], MAX_SERVER_MESSAGE) else {
                    // Incomplete (or, from a real server, impossible) header: wait for more.
                    break;
                };
                let available = self.buf.len() - ready;
                match header.tag {
                    tag if inspected(tag, self.flow) => {
                        if available < header.total {
                            self.buf.reserve(header.total - available);
                            break;
                        }
                        let body = &self.buf[ready + 5..ready + header.total];
                        let answer = self.flow.answer(header.tag, body);
                        if header.tag == backend::READY_FOR_QUERY {
                            answered = true;
                            self.me.ready(
                                messages::ready_status(body).unwrap_or(b'I'),
                                self.flow.at_rest(),
                            );
                        }
                        let action = match answer {
                            Answer::Swallow => Action::Replace(Bytes::new()),
                            Answer::Described(legacy) => {
                                // Same size: rewritten where it lies, and forwarded.
                                legacy.rewrite(&mut self.buf[ready + 5..ready + header.total]);
                                Action::Forward
                            }
                            Answer::InjectedFailed | Answer::Forward => inspect_server_frame(
                                header.tag,
                                body,
                                &mut self.last_was_fatal,
                                &mut self.key_guard,
                                self.shared,
                                self.id,
                                self.flow,
                            ),
                        };
                        match action {
                            Action::Forward => ready += header.total,
                            Action::Replace(frame) => {
                                // Sent with the rest of the read.
                                ready = self.out.splice(&mut self.buf, ready, header.total, &frame);
                            }
                        }
                    }
                    _ => {
                        self.last_was_fatal = false;
                        if available >= header.total {
                            ready += header.total;
                        } else {
                            ready += available;
                            self.streaming = header.total - available;
                            break;
                        }
                    }
                }
            }
            self.at_boundary.store(false, Relaxed);
            // Flushed: over TLS, records the socket could not take yet wait in the TLS
            // session until a flush, and the relay's next step is to wait for the server,
            // which may have nothing more to say (a large answer to a slow reader hung that
            // way, issue 17). Free on plain TCP.
            if !self.out.send(client, &mut self.buf, ready).await {
                return End::ClientClosed;
            }
            if answered {
                self.hand_offers();
            }
            release_if_large(&mut self.buf);
            self.at_boundary.store(self.streaming == 0, Relaxed);
        }
    }
}

/// Gives back the memory of a buffer that grew for one large message.
fn release_if_large(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
        *buf = BytesMut::new();
    }
}

/// Whether the relay reads a server frame of type `tag` whole: the kinds that routing,
/// cancel keys and dual-write reports need, and while the proxy's names question is in flight its
/// rows and command tag (which it takes out).
fn inspected(tag: u8, flow: &Flow) -> bool {
    match tag {
        backend::BACKEND_KEY_DATA
        | backend::ERROR_RESPONSE
        | backend::NOTICE_RESPONSE
        | backend::READY_FOR_QUERY
        | backend::PARSE_COMPLETE
        | backend::CLOSE_COMPLETE
        | backend::ROW_DESCRIPTION
        | backend::NO_DATA => true,
        backend::DATA_ROW | backend::COMMAND_COMPLETE | backend::EMPTY_QUERY_RESPONSE => {
            flow.question_in_flight()
        }
        _ => false,
    }
}

/// Counts an error v2 raised on purpose (a behaviour change that shows as an error: a refused
/// cycle), in a session that had something served by v2.
fn behaviour_change_seen(body: &[u8], shared: &Shared) {
    let field = |kind: u8| {
        messages::error_field_list(body)
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v)
    };
    let (Some(code), Some(constraint)) = (field(b'C'), field(b'n')) else {
        return;
    };
    for kind in crate::routing::rules::changes::ChangeKind::ALL {
        if kind
            .error()
            .is_some_and(|(c, n)| c.as_bytes() == code && n.as_bytes() == constraint)
        {
            shared.control.behaviour_seen(kind);
        }
    }
}

/// Looks at one whole server frame of the kinds the relay inspects.
fn inspect_server_frame(
    tag: u8,
    body: &[u8],
    last_was_fatal: &mut bool,
    key_guard: &mut Option<KeyGuard>,
    shared: &Shared,
    id: u32,
    flow: &Flow,
) -> Action {
    *last_was_fatal = false;
    match tag {
        backend::ERROR_RESPONSE => {
            *last_was_fatal = messages::parse_error(body).is_fatal();
            if !flow.target_served() {
                return Action::Forward;
            }
            behaviour_change_seen(body, shared);
            // A statement served by the target fails with legacy's names (and a target
            // variant's name is the client's statement's).
            match shared
                .checks
                .as_ref()
                .and_then(|c| c.identities())
                .and_then(|map| map.error_as_legacy(body))
                .or_else(|| error_with_client_names(body))
            {
                Some(frame) => Action::Replace(frame),
                None => Action::Forward,
            }
        }
        // The dual-write trigger's report is the proxy's, not the client's.
        backend::NOTICE_RESPONSE => match messages::dual_write_report(body) {
            Some(report) => {
                shared.metrics.dual_write(&report);
                Action::Replace(Bytes::new())
            }
            None => Action::Forward,
        },
        backend::BACKEND_KEY_DATA => match messages::parse_backend_key(body) {
            Some((pid, secret)) => {
                let (ours, guard) = shared.cancel.register(id, pid, secret);
                *key_guard = Some(guard);
                Action::Replace(messages::backend_key_frame(id, &ours))
            }
            None => Action::Forward,
        },
        _ => Action::Forward,
    }
}
