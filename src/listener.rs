//! The listener: accepts client connections, answers the initial negotiation (SSLRequest,
//! GSSENCRequest, CancelRequest), takes a login slot for each StartupMessage (see
//! [`session::slots`]) and hands it to a [`session`](crate::session). Owns the proxy's lifecycle: start, SIGTERM-style
//! shutdown (stop accepting; let sessions finish for the grace period; then close them with
//! 57P01), and the admin endpoint beside it.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp},
};
use tokio_postgres::error::SqlState;
use tokio_rustls::server::TlsStream;
use tokio_util::{either::Either, sync::CancellationToken, task::TaskTracker};

use crate::{
    admin,
    classify::Classifier,
    config::ServeConfig,
    session::{self, Shared, relay::Duplex, slots::Full},
    tls,
    wire::{self, Initial},
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // The cause is the error's source: `{:#}` prints it once, after the colon.
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot serve the admin endpoint on {addr}")]
    Admin { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    AuthFile(#[from] crate::auth::AuthFileError),
    #[error("refusing to start")]
    Rules(#[from] crate::rules::RulesError),
}

/// A running proxy.
pub struct Running {
    /// The address applications connect to (the real port when configured with port 0).
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    reload: Arc<tokio::sync::Notify>,
    shared: Arc<Shared>,
}

impl Running {
    /// A handle that asks for the rules to be reloaded (SIGHUP).
    pub fn reload_handle(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.reload)
    }

    /// Where the configuration comes from, so that a reload (SIGHUP, the console's `RELOAD`)
    /// reads it again. Set once; later calls change nothing.
    pub fn set_config_source(&self, source: crate::reload::ConfigSource) {
        let _ = self.shared.config_source.set(source);
    }

    /// A handle that reloads the configuration and the rules (SIGHUP).
    pub fn reload_everything_handle(
        &self,
    ) -> impl Fn() -> crate::reload::Reloaded + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || crate::reload::everything(&shared)
    }

    /// Starts the shutdown (as SIGTERM does) and waits until every session is closed.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.done.await;
    }

    /// A handle that starts the shutdown from elsewhere (a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the proxy has stopped.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Binds the listener and the admin endpoint and starts serving.
pub async fn start(config: ServeConfig) -> Result<Running, StartError> {
    let client_tls = config.tls.as_ref().map(tls::client_tls).transpose()?;
    // Rules first: a proxy with broken rules does not start.
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let rules = crate::rules::RuleSet::load_dir(&config.rules)?;
    let upstream_tls = match config.upstream_config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => crate::upstream::UpstreamTls::Disable,
        tokio_postgres::config::SslMode::Require => {
            crate::upstream::UpstreamTls::Require(tls::upstream_connector(&config.upstream_verify)?)
        }
        _ => {
            crate::upstream::UpstreamTls::Prefer(tls::upstream_connector(&config.upstream_verify)?)
        }
    };
    let secrets = crate::auth::Secrets {
        file: arc_swap::ArcSwapOption::from(
            config
                .auth
                .file
                .as_deref()
                .map(crate::auth::AuthFile::load)
                .transpose()?
                .map(Arc::new),
        ),
        query: config
            .auth
            .query
            .clone()
            .map(|(database, query)| crate::auth::AuthQuery::new(database, query)),
    };
    if client_tls.is_some()
        && !secrets.is_configured()
        && !matches!(upstream_tls, crate::upstream::UpstreamTls::Disable)
    {
        tracing::warn!(
            "TLS on both legs and no auth_file or auth_url: SCRAM logins from clients that can bind their channel will be refused (docs/tls-and-authentication.md)"
        );
    }
    let rules = Arc::new(rules);
    crate::reload::metrics_at_zero(&rules);
    let control = Arc::new(crate::control::Control::new(
        config.control.clone(),
        Arc::clone(&rules),
    ));
    let shutdown = CancellationToken::new();
    let shadow = config.shadow.clone().map(|shadow_config| {
        let store_database = config
            .control
            .clone()
            .unwrap_or_else(|| shadow_config.database.clone());
        let shadow = Arc::new(crate::shadow::Shadow::new(shadow_config));
        shadow.start(store_database, shutdown.clone());
        shadow
    });
    let mut shared = Shared::new(
        config,
        Classifier::new(rules),
        upstream_tls,
        Arc::clone(&control),
    );
    shared.shadow = shadow;
    shared.secrets = secrets;
    shared.client_end_point = client_tls.as_ref().and_then(|t| t.end_point.clone());
    let tls = client_tls.map(|t| t.acceptor);
    // Statements are checked on the shadow's database (the control database by default).
    if let Some(database) = shared
        .config
        .shadow
        .as_ref()
        .map(|s| s.database.clone())
        .or_else(|| shared.config.control.clone())
    {
        tokio::spawn(crate::migrate::fold::run(
            database.clone(),
            shutdown.clone(),
        ));
        let checks = Arc::new(crate::route::check::Checks::new());
        checks.set_table(shared.classifier.load().rules().table.clone());
        tokio::spawn(Arc::clone(&checks).run(database, shutdown.clone()));
        shared.checks = Some(checks);
    }
    let shared = Arc::new(shared);
    control.set_rules(Arc::clone(shared.classifier.load().rules_arc()));
    tokio::spawn(Arc::clone(&control).run(shutdown.clone()));
    tokio::spawn(
        Arc::clone(&control).ramp_down_loop(crate::control::RampDown::default(), shutdown.clone()),
    );
    let reload = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(crate::reload::watch(
        Arc::clone(&shared),
        Arc::clone(&reload),
        shutdown.clone(),
    ));

    let admin_addr = match shared.config.admin {
        Some(admin_addr) => Some(
            admin::serve(admin_addr, Arc::clone(&shared), shutdown.clone())
                .await
                .map_err(|source| StartError::Admin {
                    addr: admin_addr,
                    source,
                })?,
        ),
        None => None,
    };

    let done = tokio::spawn(accept_loop(
        listener,
        tls,
        Arc::clone(&shared),
        shutdown.clone(),
    ));
    tracing::info!(%addr, ?admin_addr, "cutover is listening");
    Ok(Running {
        addr,
        admin_addr,
        shutdown,
        done,
        reload,
        shared,
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let tracker = shared.sessions.clone();
    let workers = match Workers::start(shared.config.worker_threads, &tracker) {
        Ok(workers) => workers,
        Err(error) => {
            tracing::error!(%error, "cannot start session threads");
            return;
        }
    };
    let mut next_worker = 0usize;
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
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let job = Job {
            stream,
            peer,
            tls: tls.clone(),
            shared: Arc::clone(&shared),
        };
        next_worker = (next_worker + 1) % workers.senders.len();
        let _ = workers.senders[next_worker].send(job);
    }
    drop(listener);
    drop(workers);
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

/// A connection handed to a session thread.
struct Job {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
}

/// Session threads, each with its own single-threaded runtime. Connections are dealt to
/// them in turn; a session then lives on one thread, so relaying a query never hands work
/// between threads (no cross-thread wake-ups, no work stealing), as in a thread-per-core
/// server. This is what keeps the proxy at pgbouncer's speed.
struct Workers {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
}

impl Workers {
    fn start(count: usize, tracker: &TaskTracker) -> io::Result<Self> {
        let mut senders = Vec::with_capacity(count);
        for n in 0..count.max(1) {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let tracker = tracker.clone();
            std::thread::Builder::new()
                .name(format!("cutover-sessions-{n}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(job) = rx.recv().await {
                            tracker.spawn(run_job(job));
                        }
                        // The listener is gone: drive this thread's sessions to their end.
                        tracker.wait().await;
                    })
                })?;
            senders.push(tx);
        }
        Ok(Self { senders })
    }
}

async fn run_job(job: Job) {
    let Job {
        stream,
        peer,
        tls,
        shared,
    } = job;
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot register a connection");
            return;
        }
    };
    if let Err(error) = handle(stream, tls, shared).await {
        tracing::debug!(%peer, %error, "connection ended during negotiation");
    }
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
