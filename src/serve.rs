//! `cutover serve`: the proxy ([`crate::proxy`]) started with everything that runs beside it
//! — the control plane following the live state ([`crate::control`]), the shadow pool, the
//! route checks, the network-size fold ([`crate::migrate::fold`]), the admin endpoint, hot
//! reload and the SQL console ([`crate::admin`]) — and stopped with them.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    admin::api,
    config::ServeConfig,
    net::tls,
    proxy::{listener::accept_loop, session::Shared},
    routing::classify::Classifier,
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
    AuthFile(#[from] crate::proxy::auth::AuthFileError),
    #[error("refusing to start")]
    Rules(#[from] crate::routing::rules::RulesError),
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
    pub fn set_config_source(&self, source: crate::config::ConfigSource) {
        let _ = self.shared.config_source.set(source);
    }

    /// A handle that reloads the configuration and the rules (SIGHUP).
    pub fn reload_everything_handle(
        &self,
    ) -> impl Fn() -> crate::admin::reload::Reloaded + Send + Sync + 'static {
        let shared = Arc::clone(&self.shared);
        move || crate::admin::reload::everything(&shared)
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
    let rules = crate::routing::rules::RuleSet::load_dir(&config.rules)?;
    let upstream_tls = match config.upstream_config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => crate::proxy::upstream::UpstreamTls::Disable,
        tokio_postgres::config::SslMode::Require => crate::proxy::upstream::UpstreamTls::Require(
            tls::upstream_connector(&config.upstream_verify)?,
        ),
        _ => crate::proxy::upstream::UpstreamTls::Prefer(tls::upstream_connector(
            &config.upstream_verify,
        )?),
    };
    let secrets = crate::proxy::auth::Secrets {
        file: arc_swap::ArcSwapOption::from(
            config
                .auth
                .file
                .as_deref()
                .map(crate::proxy::auth::AuthFile::load)
                .transpose()?
                .map(Arc::new),
        ),
        query: config
            .auth
            .query
            .clone()
            .map(|(database, query)| crate::proxy::auth::AuthQuery::new(database, query)),
    };
    if client_tls.is_some()
        && !secrets.is_configured()
        && !matches!(upstream_tls, crate::proxy::upstream::UpstreamTls::Disable)
    {
        tracing::warn!(
            "TLS on both legs and no auth_file or auth_url: SCRAM logins from clients that can bind their channel will be refused (docs/tls-and-authentication.md)"
        );
    }
    let rules = Arc::new(rules);
    crate::admin::reload::metrics_at_zero(&rules);
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
    shared.console = Some(Box::new(crate::admin::console::Endpoint));
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
        let checks = Arc::new(crate::routing::route::check::Checks::new());
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
    tokio::spawn(crate::admin::reload::watch(
        Arc::clone(&shared),
        Arc::clone(&reload),
        shutdown.clone(),
    ));

    let admin_addr = match shared.config.admin {
        Some(admin_addr) => Some(
            api::serve(admin_addr, Arc::clone(&shared), shutdown.clone())
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
