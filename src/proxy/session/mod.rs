//! One client session: from a StartupMessage to the last byte.
//!
//! Session mode: each client gets its own upstream connection, opened with the client's own
//! startup packet, so the server authenticates the client itself (trust, cleartext, md5,
//! SCRAM) and the proxy never sees a password. After that the session relays frames both
//! ways ([`relay`]); the stages that classify, route and rewrite plug into the relay's
//! client-side inspection, where the cheap pre-check already runs.
//!
//! What the client gets when something fails (never a hang, never a panic):
//! - the upstream cannot be reached: FATAL 08001, then close;
//! - the upstream goes away mid-session: FATAL 08006 (unless the server said why), close;
//! - a malformed or oversized message: FATAL 08P01, close;
//! - the proxy shuts down and the grace period ends: FATAL 57P01, close.

mod by_name;
pub mod clients;
mod login;
mod pending;
mod prepared;
pub mod relay;
pub mod slots;
mod statements;

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tracing::Instrument;

use crate::{
    config::ServeConfig,
    metrics::ProxyMetrics,
    proxy::upstream,
    proxy::{
        cancel::CancelKeys,
        io::{
            Duplex,
            event_loop::{Job, Start},
        },
    },
    routing::classify::Classifier,
    wire::{
        Startup,
        messages::{Severity, error_response},
    },
};

/// A socket handed to an [`Endpoint`], its type erased (only such connections pay for it).
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Socket for T {}

/// A service other than the relay on the proxy's own port, chosen by the startup packet: the
/// admin console ([`crate::admin::console`]), which [`crate::serve`] plugs in.
pub trait Endpoint: Send + Sync {
    /// Whether this connection is for it.
    fn wants(&self, shared: &Shared, startup: &Startup) -> bool;

    /// Serves the connection to its end, on the socket the listener negotiated (`tls`), with
    /// the startup packet already read.
    #[allow(clippy::too_many_arguments)]
    fn serve<'a>(
        &'a self,
        socket: Box<dyn Socket>,
        tls: bool,
        peer: Option<std::net::SocketAddr>,
        startup: Startup,
        shared: &'a Shared,
        slot: &'a slots::Slot,
        me: &'a clients::Client,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// What every session shares.
pub struct Shared {
    pub config: ServeConfig,
    pub cancel: Arc<CancelKeys>,
    pub metrics: ProxyMetrics,
    /// Statement classification with the rules loaded last (at start, or by a reload: a
    /// statement in flight keeps the classification it started with).
    pub classifier: arc_swap::ArcSwap<Classifier>,
    /// TLS to the upstream, from the upstream URL's sslmode.
    pub upstream_tls: upstream::UpstreamTls,
    /// Fired when the shutdown grace period ends: sessions close with 57P01.
    pub terminate: crate::proxy::shutdown::Terminate,
    /// The live state of the query types, shared with the other replicas.
    pub control: Arc<crate::control::Control>,
    /// The shadow pool, when one is configured.
    pub shadow: Option<Arc<crate::shadow::Shadow>>,
    /// Route checks (none without a database for them: nothing is served by the target).
    pub checks: Option<Arc<crate::routing::route::check::Checks>>,
    /// Where users' password secrets come from (none configured: logins are relayed).
    pub secrets: crate::proxy::auth::Secrets,
    /// The channel-binding data of the proxy's own certificate, for SCRAM `-PLUS`.
    pub client_end_point: Option<Vec<u8>>,
    /// Login and session slots.
    pub slots: Arc<slots::Slots>,
    /// Wrong admin tokens (API and console), counted and slowed.
    pub throttle: crate::proxy::auth::Throttle,
    /// The admin and read tokens (the configuration's, reloaded on SIGHUP).
    pub tokens: arc_swap::ArcSwap<crate::proxy::auth::Tokens>,
    /// Every open session, and the console's pause.
    pub clients: Arc<clients::Clients>,
    /// Every connection's tasks (its negotiation and login, then its relay), which a
    /// shutdown waits for.
    pub sessions: tokio_util::task::TaskTracker,
    /// Reads the configuration again as at start (file, flags, environment), for the
    /// console's `RELOAD`; unset when the proxy was started from a config value alone.
    pub config_source: std::sync::OnceLock<crate::config::ConfigSource>,
    /// The other service on the proxy's port (the admin console), if one is plugged in.
    pub console: Option<Box<dyn Endpoint>>,
    /// The session threads that relay plain sockets, once the listener has started them
    /// (unset: every relay runs on tokio).
    pub loops: std::sync::OnceLock<crate::proxy::io::event_loop::Loops>,
    next_id: AtomicU32,
}

impl Shared {
    pub fn new(
        config: ServeConfig,
        classifier: Classifier,
        upstream_tls: upstream::UpstreamTls,
        control: Arc<crate::control::Control>,
    ) -> Self {
        let mut metrics = ProxyMetrics::new();
        let names: Vec<&str> = classifier
            .rules()
            .query_types
            .iter()
            .map(|q| q.name.as_str())
            .collect();
        metrics.queries = crate::metrics::QueryCounters::new(&names);
        Self {
            slots: slots::Slots::new(config.max_client_connections, config.max_logins_in_progress),
            tokens: arc_swap::ArcSwap::from_pointee(crate::proxy::auth::Tokens {
                admin: config.admin_tokens.clone(),
                read: config.read_tokens.clone(),
            }),
            config,
            cancel: Arc::default(),
            metrics,
            classifier: arc_swap::ArcSwap::from_pointee(classifier),
            upstream_tls,
            terminate: crate::proxy::shutdown::Terminate::new(),
            control,
            shadow: None,
            checks: None,
            secrets: crate::proxy::auth::Secrets::default(),
            client_end_point: None,
            throttle: crate::proxy::auth::Throttle::default(),
            clients: Arc::default(),
            sessions: tokio_util::task::TaskTracker::new(),
            config_source: std::sync::OnceLock::new(),
            console: None,
            loops: std::sync::OnceLock::new(),
            // Session ids double as the process ids handed to clients for cancelling;
            // start at a random point so they do not look like the server's.
            next_id: AtomicU32::new(rand::random::<u32>() >> 1),
        }
    }

    pub fn next_session_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Sends a proxy-made error to the client and flushes; errors writing it are moot (the
/// connection is being closed anyway).
pub async fn refuse<C: AsyncWrite + Unpin>(client: &mut C, code: &SqlState, message: &str) {
    let _ = client
        .write_all(&error_response(Severity::Fatal, code, message))
        .await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// What a logged-in session's relay owns beside its two sockets: what lives as long as the
/// session, its place in the registry and its session slot among them.
struct Owned {
    id: u32,
    shared: Arc<Shared>,
    serves_shadow: bool,
    registered: clients::Registered,
    _slot: slots::Slot,
}

/// A logged-in session's relay, to its end.
async fn relay<C: Duplex, U: Duplex>(mut client: C, mut upstream: U, owned: Owned) {
    let shared = &owned.shared;
    let shadow = shared.shadow.as_deref().filter(|_| owned.serves_shadow);
    let end = relay::Relay::new(
        &mut client,
        &mut upstream,
        owned.id,
        shared,
        shadow,
        &owned.registered.client,
    )
    .run()
    .await;
    tracing::debug!(?end, "session ended");
}

/// A session's relay in its span, unless no subscriber wants the span (the default level):
/// then it is not entered and left at every wake-up (~120 instructions a transaction).
fn in_span<F: std::future::Future>(
    relay: F,
    span: tracing::Span,
) -> futures_util::future::Either<F, tracing::instrument::Instrumented<F>> {
    use futures_util::future::Either;
    if span.is_disabled() {
        Either::Left(relay)
    } else {
        Either::Right(relay.instrument(span))
    }
}

/// Runs a session whose StartupMessage has been read, in the login slot it was given.
pub async fn run(
    mut client: crate::proxy::listener::ClientStream,
    client_tls: bool,
    peer: Option<std::net::SocketAddr>,
    startup: Startup,
    id: u32,
    shared: Arc<Shared>,
    slot: slots::Slot,
) {
    let (user, database) = startup.user_and_database();
    let span = tracing::info_span!(
        "session",
        session_id = id,
        user,
        database,
        application_name = startup.param("application_name").unwrap_or("")
    );
    async move {
        let console = shared
            .console
            .as_deref()
            .filter(|c| c.wants(&shared, &startup));
        let registered = shared.clients.register(clients::Who {
            id,
            user: startup.user_and_database().0,
            database: startup.user_and_database().1,
            application_name: startup.param("application_name").unwrap_or(""),
            peer,
            tls: client_tls,
            console: console.is_some(),
        });
        // The console's and the login's states are boxed: inline, the largest of them would
        // size every session's future for its whole life (2.9 KiB for the login's alone).
        if let Some(console) = console {
            let socket = Box::new(client);
            let me = &registered.client;
            console
                .serve(socket, client_tls, peer, startup, &shared, &slot, me)
                .await;
            return;
        }
        let Ok(upstream) = Box::pin(login::login(
            &mut client,
            client_tls,
            &startup,
            &shared,
            &slot,
        ))
        .await
        else {
            return;
        };
        // The relay gets a task of its own, holding only what it needs: everything the
        // negotiation and the login kept (the startup packet, their states, this
        // function's own) would otherwise stay in the session's memory for its whole life.
        // Over plain sockets it runs on a session thread's own loop; with TLS, on tokio.
        let serves_shadow = shared
            .shadow
            .as_deref()
            .is_some_and(|s| s.serves(startup.user_and_database().1));
        let sessions = shared.sessions.clone();
        let span = tracing::Span::current();
        let loops = shared
            .loops
            .get()
            .filter(|_| client.is_plain() && upstream.is_plain());
        let owned = Owned {
            id,
            shared: Arc::clone(&shared),
            serves_shadow,
            registered,
            _slot: slot,
        };
        let Some(loops) = loops else {
            sessions.spawn(in_span(relay(client, upstream, owned), span));
            return;
        };
        let (Ok(Ok(client)), Ok(Ok(upstream))) = (client.into_plain(), upstream.into_plain())
        else {
            tracing::warn!("cannot take a session's sockets out of tokio: closing it");
            return;
        };
        // Counted until the relay ends, wherever it runs: a shutdown waits for it.
        let token = sessions.token();
        let start: Start = Box::new(move |client, upstream| {
            Box::pin(in_span(
                async move {
                    let _token = token;
                    relay(client, upstream, owned).await;
                },
                span,
            ))
        });
        let job = Job {
            client,
            upstream,
            start,
        };
        if loops.hand(job).is_err() {
            tracing::debug!("the session threads are closed: session dropped");
        }
    }
    .instrument(span)
    .await
}
