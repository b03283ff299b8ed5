//! The relay: frames from the client to the upstream and back, as the peers sent them.
//!
//! Both directions run concurrently in the session's task (a client may pipeline more than
//! the sockets' buffers hold while the server answers, so a relay that only moves one way
//! at a time can deadlock). Each direction reads what is available, walks the frame
//! headers, looks at the few frames it must (whole), streams the rest — a 50 MB DataRow is
//! forwarded as it arrives, never buffered whole — and writes everything it read in one
//! write. Frames are forwarded byte for byte, except during startup: the server's
//! BackendKeyData (replaced by the proxy's key) and SASL mechanism list (no `-PLUS`).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::error::SqlState;

use metrics::Counter;

use super::Shared;
use crate::{
    cancel::KeyGuard,
    classify::Classification,
    rewrite::Rewrite,
    rules::{RuleSet, Stage},
    shadow::{self, Shadow},
    wire::{
        self, WireError,
        messages::{self, AUTH_SASL, backend, frontend},
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

/// Bytes asked of the socket per read when the buffer runs low.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes of a Bind that hold its portal's and statement's names (each at most 64 bytes
/// from any real driver); the rest of the message streams through.
const BIND_PREFIX: usize = 256;
/// A buffer grown past this (a large message inspected whole) is released once empty.
const KEEP_BUFFER: usize = 1 << 20;
/// No server message is refused for size: PostgreSQL itself bounds them.
const MAX_SERVER_MESSAGE: usize = usize::MAX;

/// A socket that can be read and written at the same time from one task.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin {
    type Read<'a>: AsyncRead + Unpin
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin
    where
        Self: 'a;

    /// Borrowed halves; for plain sockets these are free (no lock, unlike
    /// `tokio::io::split`), which matters on a path crossed twice per query.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

pub struct Relay<'a, C, U> {
    client: &'a mut C,
    upstream: &'a mut U,
    id: u32,
    shared: &'a Shared,
    /// The shadow, when this session's database is the one it reads.
    shadow: Option<&'a Shadow>,
}

impl<'a, C: Duplex, U: Duplex> Relay<'a, C, U> {
    pub fn new(
        client: &'a mut C,
        upstream: &'a mut U,
        id: u32,
        shared: &'a Shared,
        shadow: Option<&'a Shadow>,
    ) -> Self {
        Self {
            client,
            upstream,
            id,
            shared,
            shadow,
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
        let mut to_upstream = ClientToServer {
            shared,
            buf: BytesMut::with_capacity(READ_CHUNK),
            streaming: 0,
            statements: Statements {
                shared,
                shadow: self.shadow,
                statements: HashMap::new(),
                portals: HashMap::new(),
            },
        };
        let mut to_client = ServerToClient {
            shared,
            id: self.id,
            buf: BytesMut::with_capacity(READ_CHUNK),
            streaming: 0,
            last_was_fatal: false,
            key_guard: None,
            at_boundary: &client_at_boundary,
        };

        let end = tokio::select! {
            end = to_upstream.run(&mut client_rd, &mut upstream_wr) => end,
            end = to_client.run(&mut upstream_rd, &mut client_wr) => end,
        };
        shared.metrics.clients.decrement(1.0);
        drop((client_rd, client_wr, upstream_rd, upstream_wr));

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
    buf: BytesMut,
    /// Bytes of a frame still to stream through without looking.
    streaming: usize,
    statements: Statements<'s>,
}

/// What the session knows of its statements: the query type counter of each prepared
/// statement and portal (the unnamed ones under the empty name), so that an Execute counts
/// as what was parsed; and, for reads the shadow may compare, what it needs to run them.
struct Statements<'s> {
    shared: &'s Shared,
    shadow: Option<&'s Shadow>,
    statements: HashMap<Box<[u8]>, Prepared>,
    portals: HashMap<Box<[u8]>, Portal>,
}

struct Prepared {
    counter: Counter,
    /// A read with a target route: what the shadow needs besides the parameters.
    read: Option<Arc<ShadowSource>>,
}

struct ShadowSource {
    classification: Arc<Classification>,
    sql: Arc<str>,
    param_types: Arc<[u32]>,
    rules: Arc<RuleSet>,
}

struct Portal {
    counter: Counter,
    /// A comparison to hand to the shadow at the portal's first Execute.
    job: Option<shadow::Job>,
}

/// Bind messages up to this size are read whole when their statement is shadowed (to copy
/// the parameters); larger ones stream through and are not compared.
const MAX_SHADOWED_BIND: usize = 64 * 1024;

impl ClientToServer<'_> {
    async fn run<R, W>(&mut self, client: &mut R, upstream: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.shared.config.max_message_bytes;
        loop {
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_CHUNK);
            }
            match client.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return End::ClientClosed,
                Ok(_) => {}
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
                    Err(e) => return End::ProtocolViolation(e),
                };
                let available = self.buf.len() - ready;
                match header.tag {
                    frontend::QUERY
                    | frontend::PARSE
                    | frontend::EXECUTE
                    | frontend::CLOSE
                    | frontend::TERMINATE => {
                        if available < header.total {
                            self.buf.reserve(header.total - available);
                            break;
                        }
                        let replacement = self
                            .statements
                            .inspect(header.tag, &self.buf[ready + 5..ready + header.total]);
                        terminate |= header.tag == frontend::TERMINATE;
                        match replacement {
                            None => ready += header.total,
                            Some(frame) => {
                                // What came before, then the tagged message in its place.
                                let written = upstream.write_all(&self.buf[..ready]).await.is_ok()
                                    && upstream.write_all(&frame).await.is_ok();
                                if !written {
                                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                                    return End::UpstreamClosed;
                                }
                                self.buf.advance(ready + header.total);
                                ready = 0;
                            }
                        }
                    }
                    tag => {
                        if tag == frontend::BIND {
                            // Bind starts with the portal's and the statement's names; its
                            // parameters (possibly large) stream through unread — unless
                            // the shadow is to compare this execution and needs them.
                            let prefix = header.total.min(BIND_PREFIX);
                            if available < prefix {
                                self.buf.reserve(prefix - available);
                                break;
                            }
                            let names = &self.buf[ready + 5..ready + prefix];
                            if let Some((portal, statement)) = messages::bind_names(names) {
                                let whole = header.total <= MAX_SHADOWED_BIND
                                    && self.statements.compares(statement);
                                if whole && available < header.total {
                                    self.buf.reserve(header.total - available);
                                    break;
                                }
                                let body =
                                    &self.buf[ready + 5..ready + header.total.min(available)];
                                self.statements
                                    .bind(portal, statement, whole.then_some(body));
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
            if ready > 0 {
                if upstream.write_all(&self.buf[..ready]).await.is_err() {
                    // The upstream is gone. Give the other direction a moment to relay
                    // what the server said before closing (a FATAL error, usually).
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    return End::UpstreamClosed;
                }
                self.buf.advance(ready);
            }
            release_if_large(&mut self.buf);
            if terminate {
                let _ = upstream.flush().await;
                return End::ClientTerminated;
            }
        }
    }
}

impl Statements<'_> {
    /// Whether executions of prepared statement `name` are compared now (its query type's
    /// live stage compares, and the shadow serves this session).
    fn compares(&self, name: &[u8]) -> bool {
        self.statements
            .get(name)
            .and_then(|p| p.read.as_ref())
            .is_some_and(|r| self.compared(&r.classification))
    }

    /// Whether a statement of this classification is compared now, before sampling.
    fn compared(&self, classification: &Classification) -> bool {
        let Classification::Typed(t) = classification else {
            return false;
        };
        if self.shadow.is_none() || t.read.is_none() || !matches!(t.route, Rewrite::Target(_)) {
            return false;
        }
        let live = self.shared.control.live();
        let stage = live.by_type.get(&t.query_type).map(|s| s.stage.as_str());
        match stage {
            Some(stage) => matches!(stage, "shadow" | "cutover" | "target"),
            None => matches!(t.stage, Stage::Shadow | Stage::Cutover(_) | Stage::Target),
        }
    }

    fn sampled(classification: &Classification) -> bool {
        match classification {
            Classification::Typed(t) => {
                t.sample_rate >= 1.0 || rand::random::<f64>() < t.sample_rate
            }
            _ => false,
        }
    }

    /// A Bind: its portal executes what `statement` was parsed as. `body` is the whole
    /// message when the statement is compared now (see [`Self::compares`]).
    fn bind(&mut self, portal: &[u8], statement: &[u8], body: Option<&[u8]>) {
        let Some(prepared) = self.statements.get(statement) else {
            self.portals.insert(
                portal.into(),
                Portal {
                    counter: self.shared.metrics.queries.passthrough.clone(),
                    job: None,
                },
            );
            return;
        };
        let job = body
            .zip(prepared.read.as_ref())
            .filter(|(_, r)| Self::sampled(&r.classification))
            .and_then(|(body, r)| {
                let params = messages::bind_params(body)?;
                Some(shadow::Job {
                    classification: Arc::clone(&r.classification),
                    sql: Arc::clone(&r.sql),
                    param_types: Arc::clone(&r.param_types),
                    params: params
                        .into_iter()
                        .map(|(binary, value)| shadow::Param {
                            binary,
                            value: value.map(Bytes::copy_from_slice),
                        })
                        .collect(),
                    inline: false,
                    rules: Arc::clone(&r.rules),
                })
            });
        self.portals.insert(
            portal.into(),
            Portal {
                counter: prepared.counter.clone(),
                job,
            },
        );
    }

    /// The place where classification (and later routing and rewriting) plugs in. Today:
    /// each statement is classified (the pre-check first, so statements that do not name
    /// the legacy table are never parsed) and counted under its query type; a write on the
    /// legacy table is given back tagged with its query type (for the dual-write trigger),
    /// as the message to send instead.
    fn inspect(&mut self, tag: u8, body: &[u8]) -> Option<Bytes> {
        match tag {
            frontend::QUERY => {
                let sql = messages::query_text(body)?;
                let (counter, classification) = self.classify(sql);
                counter.increment(1);
                let classification = classification?;
                if let Some(shadow) = self.shadow
                    && self.compared(&classification)
                    && Self::sampled(&classification)
                    && let Ok(sql) = std::str::from_utf8(sql)
                {
                    shadow.offer(shadow::Job {
                        classification: Arc::clone(&classification),
                        sql: sql.into(),
                        param_types: Arc::new([]),
                        params: Vec::new(),
                        inline: true,
                        rules: Arc::clone(self.shared.classifier.load().rules_arc()),
                    });
                }
                return write_tag(&classification).and_then(|t| messages::tagged_query(body, t));
            }
            frontend::PARSE => {
                let (name, sql) = messages::parse_text(body)?;
                let (counter, classification) = self.classify(sql);
                let read = classification.as_ref().filter(|c| {
                    self.shadow.is_some()
                        && matches!(&***c, Classification::Typed(t) if t.read.is_some() && matches!(t.route, Rewrite::Target(_)))
                });
                let read = read.and_then(|c| {
                    Some(Arc::new(ShadowSource {
                        classification: Arc::clone(c),
                        sql: std::str::from_utf8(sql).ok()?.into(),
                        param_types: messages::parse_param_types(body)?.into(),
                        rules: Arc::clone(self.shared.classifier.load().rules_arc()),
                    }))
                });
                self.statements
                    .insert(name.into(), Prepared { counter, read });
                let classification = classification?;
                return write_tag(&classification).and_then(|t| messages::tagged_parse(body, t));
            }
            frontend::EXECUTE => {
                let portal = messages::execute_portal(body).unwrap_or_default();
                match self.portals.get_mut(portal) {
                    Some(p) => {
                        p.counter.increment(1);
                        if let (Some(job), Some(shadow)) = (p.job.take(), self.shadow) {
                            shadow.offer(job);
                        }
                    }
                    None => self.shared.metrics.queries.passthrough.increment(1),
                }
            }
            frontend::CLOSE => {
                if let Some((kind, name)) = messages::close_target(body) {
                    if kind == b'S' {
                        self.statements.remove(name);
                    } else {
                        self.portals.remove(name);
                    }
                }
            }
            _ => {}
        }
        None
    }

    /// The `cutover_queries_total` counter of a statement's query type, and its
    /// classification when it is on the legacy table.
    fn classify(&self, sql: &[u8]) -> (Counter, Option<Arc<Classification>>) {
        let queries = &self.shared.metrics.queries;
        let Ok(sql) = std::str::from_utf8(sql) else {
            // Not UTF-8 (another client_encoding): never parsed, relayed as it is.
            return (queries.passthrough.clone(), None);
        };
        let classification = self.shared.classifier.load().classify(sql);
        let counter = match &*classification {
            Classification::Passthrough => return (queries.passthrough.clone(), None),
            Classification::Unparsable { .. } => return (queries.unparsable.clone(), None),
            Classification::Typed(t) if t.named => queries.named(&t.query_type),
            Classification::Typed(_) => queries.automatic.clone(),
        };
        (counter, Some(classification))
    }
}

/// The tag to append to a write on the legacy table.
fn write_tag(classification: &Classification) -> Option<&str> {
    match classification {
        Classification::Typed(t) => t.write_tag.as_deref(),
        _ => None,
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
}

/// What to do with an inspected server frame.
enum Action {
    Forward,
    Replace(Bytes),
}

impl ServerToClient<'_> {
    async fn run<R, W>(&mut self, upstream: &mut R, client: &mut W) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // One future for the whole session: creating it per read would take a lock.
        let terminate = self.shared.terminate.clone();
        let terminated = terminate.cancelled();
        tokio::pin!(terminated);
        loop {
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                biased;
                _ = &mut terminated, if self.streaming == 0 => return End::Shutdown,
                read = upstream.read_buf(&mut self.buf) => read,
            };
            match read {
                Ok(0) | Err(_) => return End::UpstreamClosed,
                Ok(_) => {}
            }
            let mut ready = 0;
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
                    backend::AUTHENTICATION
                    | backend::BACKEND_KEY_DATA
                    | backend::ERROR_RESPONSE
                    | backend::NOTICE_RESPONSE
                    | backend::READY_FOR_QUERY => {
                        if available < header.total {
                            self.buf.reserve(header.total - available);
                            break;
                        }
                        let body = &self.buf[ready + 5..ready + header.total];
                        let action = inspect_server_frame(
                            header.tag,
                            body,
                            &mut self.last_was_fatal,
                            &mut self.key_guard,
                            self.shared,
                            self.id,
                        );
                        match action {
                            Action::Forward => ready += header.total,
                            Action::Replace(frame) => {
                                if !self.write(client, ready, &frame).await {
                                    return End::ClientClosed;
                                }
                                self.buf.advance(header.total);
                                ready = 0;
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
            if ready > 0 && !self.write(client, ready, &[]).await {
                return End::ClientClosed;
            }
            release_if_large(&mut self.buf);
            self.at_boundary.store(self.streaming == 0, Relaxed);
        }
    }

    /// Writes the first `ready` buffered bytes, then `extra`, and drops the former.
    async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        client: &mut W,
        ready: usize,
        extra: &[u8],
    ) -> bool {
        if ready > 0 {
            if client.write_all(&self.buf[..ready]).await.is_err() {
                return false;
            }
            self.buf.advance(ready);
        }
        extra.is_empty() || client.write_all(extra).await.is_ok()
    }
}

/// Gives back the memory of a buffer that grew for one large message.
fn release_if_large(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEEP_BUFFER {
        *buf = BytesMut::new();
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
) -> Action {
    *last_was_fatal = false;
    match tag {
        backend::ERROR_RESPONSE => {
            *last_was_fatal = messages::parse_error(body).is_fatal();
            Action::Forward
        }
        // The dual-write trigger's report is the proxy's, not the client's.
        backend::NOTICE_RESPONSE => match messages::dual_write_report(body) {
            Some(report) => {
                shared.metrics.dual_write(&report);
                Action::Replace(Bytes::new())
            }
            None => Action::Forward,
        },
        backend::AUTHENTICATION if messages::auth_code(body) == Some(AUTH_SASL) => {
            match messages::sasl_without_channel_binding(body) {
                Some(frame) => Action::Replace(frame),
                None => Action::Forward,
            }
        }
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
