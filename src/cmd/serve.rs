//! `cape-static-ip serve`: wires the caches, the webhook (TLS), the admin endpoint and the
//! background loops together, and shuts them down in order on SIGTERM: not ready first, then
//! stop accepting, then drain in-flight reviews.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use kube::Client;
use tokio::task::JoinSet;

use crate::assign::Assigner;
use crate::assign::pending::{Caps, PendingClaims};
use crate::cli::{LogFormat, ServeArgs};
use crate::cluster::cache::Caches;
use crate::events::Events;
use crate::lifecycle::{Lifecycle, LifecycleOptions};
use crate::metrics::{Metrics, PoolUsage};
use crate::webhook::auth::{AuthOptions, Authenticator};
use crate::webhook::listener::{Limits, Server};
use crate::webhook::server::{AppState, ReviewLimits, admin_router, webhook_router};
use crate::webhook::tls::ReloadingCert;

/// The shortest `--claim-grace` accepted whatever the apiserver's request timeout.
pub const MIN_CLAIM_GRACE: Duration = Duration::from_secs(30);
/// How much longer than the apiserver's request timeout `--claim-grace` must be: a write
/// already sent to etcd when the request times out may still land.
pub const GRACE_MARGIN: Duration = Duration::from_secs(10);

/// Everything [`start`] needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub default_pool_namespace: String,
    pub resync: Duration,
    pub claim_grace: Duration,
    /// Released addresses are kept (cooling) this long; see `--reuse-delay`.
    pub reuse_delay: Duration,
    pub cert_reload: Duration,
    pub drain: Duration,
    /// How long to keep serving (not ready) after a shutdown signal, so that the apiserver
    /// stops sending reviews before the listener closes.
    pub shutdown_delay: Duration,
    /// Run the release loop and the reconciler (tests of admission alone turn it off).
    pub background: bool,
    /// Deadlines and caps of both endpoints.
    pub limits: Limits,
    /// Who may send reviews.
    pub auth: AuthOptions,
    /// The cap on claims whose machine has not appeared yet.
    pub caps: Caps,
}

/// A running server.
pub struct Running {
    pub webhook_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: AppState,
    webhook: Server,
    admin: Server,
    drain: Duration,
    shutdown_delay: Duration,
    servers: JoinSet<()>,
    tasks: JoinSet<()>,
}

/// Starts everything and returns once both endpoints listen (caches keep syncing). (Long:
/// the wiring of every part in start-up order, read top to bottom.)
pub async fn start(client: Client, options: Options) -> anyhow::Result<Running> {
    let Options {
        listen,
        admin_listen,
        tls_cert_file,
        tls_key_file,
        default_pool_namespace,
        resync,
        claim_grace,
        reuse_delay,
        cert_reload,
        drain,
        shutdown_delay,
        background,
        limits,
        auth,
        caps,
    } = options;
    let cert = ReloadingCert::new(tls_cert_file, tls_key_file)
        .context("loading the serving certificate")?;
    let metrics = Arc::new(Metrics::default());
    let auth = Arc::new(
        Authenticator::new(auth, client.clone(), metrics.clone())
            .map_err(anyhow::Error::msg)
            .context("setting up caller authentication")?,
    );
    let mut tasks = JoinSet::new();
    let caches = Caches::start(&client, &mut tasks);
    {
        let index = caches.index.clone();
        metrics.pools_from(move || {
            let cooling = index.cooling();
            index
                .usage()
                .into_iter()
                .map(|(pool, used, free)| PoolUsage {
                    cooling: cooling.get(&pool).copied().unwrap_or(0),
                    pool: pool.to_string(),
                    used,
                    free,
                })
                .collect()
        });
    }
    let events = Events::start(client.clone(), &mut tasks);
    let pending = Arc::new(PendingClaims::new(
        caps,
        claim_grace,
        metrics.clone(),
        events.clone(),
    ));
    let assigner = Assigner {
        client: client.clone(),
        caches,
        default_namespace: default_pool_namespace,
        metrics: metrics.clone(),
        events,
        activity: Default::default(),
        claim_grace,
        pending,
    };
    let state = AppState {
        assigner: assigner.clone(),
        metrics: metrics.clone(),
        stopping: Arc::new(AtomicBool::new(false)),
        reviews: ReviewLimits::new(&limits),
        auth: auth.clone(),
    };
    tasks.spawn(auth.clone().watch_ca(cert_reload));
    tasks.spawn(
        assigner
            .pending
            .clone()
            .prune_every(Duration::from_secs(2), assigner.caches.clone()),
    );
    {
        let cert = cert.clone();
        let metrics = metrics.clone();
        tasks.spawn(async move {
            if let Some(t) = cert.not_after() {
                metrics.certificate_expiry.set(t);
            }
            let watch = cert.clone().watch(cert_reload);
            let gauge = async {
                loop {
                    tokio::time::sleep(cert_reload).await;
                    if let Some(t) = cert.not_after() {
                        metrics.certificate_expiry.set(t);
                    }
                }
            };
            tokio::join!(watch, gauge);
        });
    }
    if background {
        let lifecycle = Lifecycle::new(
            assigner.clone(),
            metrics.clone(),
            LifecycleOptions {
                resync,
                claim_grace,
                reuse_delay,
            },
        );
        tasks.spawn(lifecycle.run());
    }

    let mut servers = JoinSet::new();
    let tls = Arc::new(cert.server_config_with_client_auth(limits.http2, auth.tls_verifier()));
    let (webhook, webhook_addr, serving) = Server::bind(
        listen,
        Some(tls),
        webhook_router(state.clone()),
        limits.clone(),
    )
    .with_context(|| format!("binding the webhook to {listen}"))?;
    servers.spawn(serving);
    let (admin, admin_addr, serving) =
        Server::bind(admin_listen, None, admin_router(state.clone()), limits)
            .with_context(|| format!("binding the admin endpoint to {admin_listen}"))?;
    servers.spawn(serving);

    tracing::info!(%webhook_addr, %admin_addr, "listening");
    Ok(Running {
        webhook_addr,
        admin_addr,
        state,
        webhook,
        admin,
        drain,
        shutdown_delay,
        servers,
        tasks,
    })
}

impl Running {
    /// Waits until the caches have synced.
    pub async fn ready(&self) {
        self.state.assigner.caches.wait_ready().await;
    }

    /// Not ready, stop accepting, drain in-flight reviews, stop the loops.
    pub async fn shutdown(mut self) {
        self.state.stopping.store(true, Ordering::Relaxed);
        self.webhook.shutdown(self.drain);
        self.admin.shutdown(Duration::from_secs(1));
        while let Some(r) = self.servers.join_next().await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "server task failed");
            }
        }
        self.tasks.shutdown().await;
    }

    /// Runs until one of the servers fails or `signal` resolves, then shuts down.
    pub async fn run_until(mut self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            _ = signal => {
                tracing::info!(delay = ?self.shutdown_delay, "shutting down: not ready, then draining in-flight reviews");
                self.state.stopping.store(true, Ordering::Relaxed);
                tokio::time::sleep(self.shutdown_delay).await;
                self.shutdown().await;
                Ok(())
            }
            Some(r) = self.servers.join_next() => {
                let err = match r {
                    Ok(()) => anyhow::anyhow!("a server stopped unexpectedly"),
                    Err(e) => anyhow::Error::from(e).context("server task failed"),
                };
                self.shutdown().await;
                Err(err)
            }
        }
    }
}

/// Sets up logging once (later calls are ignored).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,hyper=warn,rustls=warn")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// `cape-static-ip serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        listen,
        tls_cert_file,
        tls_key_file,
        admin_listen,
        default_pool_namespace,
        resync,
        claim_grace,
        reuse_delay,
        apiserver_request_timeout,
        cert_reload,
        drain,
        shutdown_delay,
        log_format,
        limits,
        auth,
        caps,
    } = args;
    init_logging(log_format);
    let floor = MIN_CLAIM_GRACE.max(apiserver_request_timeout + GRACE_MARGIN);
    if claim_grace < floor {
        anyhow::bail!(
            "--claim-grace {} is too short: it must exceed the longest time a create can stay in admission (--apiserver-request-timeout {} plus {} of margin); use at least {}",
            humantime::format_duration(claim_grace),
            humantime::format_duration(apiserver_request_timeout),
            humantime::format_duration(GRACE_MARGIN),
            humantime::format_duration(floor)
        );
    }
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let running = start(
        client,
        Options {
            listen,
            admin_listen,
            tls_cert_file,
            tls_key_file,
            default_pool_namespace,
            resync,
            claim_grace,
            reuse_delay,
            cert_reload,
            drain,
            shutdown_delay,
            background: true,
            limits,
            auth,
            caps,
        },
    )
    .await?;
    running.run_until(shutdown_signal()).await
}
