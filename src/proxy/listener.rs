//! The listener: accepts client connections, answers the initial negotiation (SSLRequest,
//! GSSENCRequest, CancelRequest), takes a login slot for each StartupMessage (see
//! [`session::slots`]) and hands it to a [`session`], on the runtime it accepts on; it starts
//! the session threads ([`crate::proxy::io::event_loop`]) that relay logged-in sessions over
//! plain sockets. A shutdown stops accepting, lets sessions finish for the grace period,
//! then closes them with 57P01. [`crate::serve`] starts it with everything beside it.

use std::{io, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp},
};
use tokio_postgres::error::SqlState;
use tokio_rustls::server::TlsStream;
use tokio_util::{either::Either, sync::CancellationToken};

use crate::{
    proxy::{
        io::{
            Duplex,
            event_loop::{Loops, Plain},
        },
        session::{self, Shared, slots::Full},
    },
    wire::{self, Initial},
};

/// Accepts connections until `shutdown`, each negotiated and served on one of the session
/// threads; then waits for the sessions (the grace period, then 57P01).
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let tracker = shared.sessions.clone();
    match Loops::start(
        shared.config.worker_threads,
        tokio::runtime::Handle::current(),
    ) {
        Ok(loops) => {
            let _ = shared.loops.set(loops);
        }
        Err(error) => {
            tracing::error!(%error, "cannot start session threads");
            return;
        }
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tls, shared) = (tls.clone(), Arc::clone(&shared));
        tracker.spawn(async move {
            if let Err(error) = handle(stream, tls, shared).await {
                tracing::debug!(%peer, %error, "connection ended during negotiation");
            }
        });
    }
    drop(listener);
    tracing::info!(
        sessions = tracker.len(),
        grace_s = shared.config.shutdown_grace.as_secs(),
        "shutting down: no new connections; waiting for sessions"
    );
    tracker.close();
    if tokio::time::timeout(shared.config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::info!(
            sessions = tracker.len(),
            "grace period over: closing sessions"
        );
        shared.terminate.cancel();
        // Sessions close at their next frame boundary; do not wait forever for one that
        // is stuck mid-frame.
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    if let Some(loops) = shared.loops.get() {
        loops.close();
    }
}

/// Negotiates the initial packets of one connection, then runs its session.
async fn handle(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) -> io::Result<()> {
    // The startup packet, then the login, each within authentication_timeout (as PostgreSQL).
    let startup_timeout = shared.config.authentication_timeout;
    let peer = stream.peer_addr().ok();
    let mut client: ClientStream = Either::Left(stream);
    let mut buf = BytesMut::with_capacity(512);
    let mut negotiated_ssl = false;
    let startup = loop {
        let initial = match tokio::time::timeout(
            startup_timeout,
            read_initial(&mut client, &mut buf),
        )
        .await
        {
            Ok(Ok(Some(initial))) => initial,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(Violation(message))) => {
                shared.metrics.protocol_violations.increment(1);
                session::refuse(&mut client, &SqlState::PROTOCOL_VIOLATION, &message).await;
                return Ok(());
            }
            Err(_) => return Ok(()), // PostgreSQL closes silently on a startup timeout too.
        };
        match initial {
            Initial::SslRequest if !negotiated_ssl => {
                negotiated_ssl = true;
                // Bytes sent after an SSLRequest but before our answer would be read as
                // if they had been encrypted: refuse them (CVE-2021-23214).
                if !buf.is_empty() {
                    session::refuse(
                        &mut client,
                        &SqlState::PROTOCOL_VIOLATION,
                        "unencrypted data after SSL request",
                    )
                    .await;
                    return Ok(());
                }
                match (&tls, client) {
                    (Some(acceptor), Either::Left(mut tcp)) => {
                        tcp.write_all(b"S").await?;
                        let handshake = tokio::time::timeout(startup_timeout, acceptor.accept(tcp))
                            .await
                            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                        client = Either::Right(Box::new(handshake));
                    }
                    (_, mut other) => {
                        other.write_all(b"N").await?;
                        client = other;
                    }
                }
            }
            Initial::GssEncRequest => {
                // Flushed: after an SSLRequest this may be a TLS stream.
                client.write_all(b"N").await?;
                client.flush().await?;
            }
            Initial::SslRequest => {
                session::refuse(
                    &mut client,
                    &SqlState::PROTOCOL_VIOLATION,
                    "duplicate SSL request",
                )
                .await;
                return Ok(());
            }
            Initial::CancelRequest { pid, secret } => {
                let known = shared
                    .cancel
                    .forward(&shared.config.upstream, pid, &secret)
                    .await;
                let counter = if known {
                    &shared.metrics.cancel_forwarded
                } else {
                    &shared.metrics.cancel_unknown
                };
                counter.increment(1);
                return Ok(());
            }
            Initial::Startup(startup) => break startup,
        }
    };
    if !buf.is_empty() {
        session::refuse(
            &mut client,
            &SqlState::PROTOCOL_VIOLATION,
            "unexpected data after the startup packet",
        )
        .await;
        return Ok(());
    }

    if shared.config.client_tls_required && matches!(client, Either::Left(_)) {
        session::refuse(
            &mut client,
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "cutover accepts TLS connections only (client_tls_required): connect with sslmode=require or stricter",
        )
        .await;
        return Ok(());
    }
    if shared.terminate.is_cancelled() {
        shared.metrics.rejected_shutdown.increment(1);
        session::refuse(
            &mut client,
            &SqlState::CANNOT_CONNECT_NOW,
            "the cutover proxy is shutting down",
        )
        .await;
        return Ok(());
    }
    let slot = match shared.slots.login() {
        Ok(slot) => slot,
        Err(full) => {
            shared.metrics.rejected_limit.increment(1);
            let message = match full {
                Full::Sessions => {
                    "sorry, too many clients already (cutover max_client_connections)"
                }
                Full::Logins => {
                    "sorry, too many logins in progress (cutover max_logins_in_progress)"
                }
            };
            session::refuse(&mut client, &SqlState::TOO_MANY_CONNECTIONS, message).await;
            return Ok(());
        }
    };
    shared.metrics.accepted.increment(1);
    let id = shared.next_session_id();
    let client_tls = matches!(client, Either::Right(_));
    // The startup packet's buffer is not the session's to keep.
    drop(buf);
    session::run(client, client_tls, peer, startup, id, shared, slot).await;
    Ok(())
}

struct Violation(String);

/// Reads until one initial packet is complete. `None`: the client closed.
async fn read_initial(
    client: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<Option<Initial>, Violation> {
    loop {
        match wire::take_initial(buf) {
            Ok(Some(initial)) => return Ok(Some(initial)),
            Ok(None) => {}
            Err(error) => return Err(Violation(format!("invalid startup packet: {error}"))),
        }
        match client.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// A client connection: plain TCP, or TLS over it.
pub type ClientStream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

impl Duplex for ClientStream {
    type Read<'a> = Either<tcp::ReadHalf<'a>, tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>>;
    type Write<'a> = Either<tcp::WriteHalf<'a>, tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>>;

    fn is_plain(&self) -> bool {
        matches!(self, Either::Left(_))
    }

    fn into_plain(self) -> Result<io::Result<Plain>, Self> {
        match self {
            Either::Left(tcp) => Ok(tcp.into_std().map(Plain::Tcp)),
            tls => Err(tls),
        }
    }

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        match self {
            Either::Left(s) => {
                let (r, w) = s.split();
                (Either::Left(r), Either::Left(w))
            }
            Either::Right(s) => {
                // TLS state is shared by both directions: these halves take a lock.
                let (r, w) = tokio::io::split(s.as_mut());
                (Either::Right(r), Either::Right(w))
            }
        }
    }
}
