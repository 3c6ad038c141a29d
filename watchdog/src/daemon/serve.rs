//! The whole daemon: detector, registry and outbox ([`Daemon`]), then the REST API and the
//! delivery of the outbox to the OMA, all stopped together on the shutdown signal.
//!
//! Start order: the detector is attached, `/proc` scanned and the registry reconciled before
//! anything is served or delivered, so the first answer the API gives already knows every
//! process. Shutdown follows mini-redis: one `watch` channel tells every task to stop, and
//! `run` waits (bounded) for all of them before it returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use transport::{ServeStats, ServerTls, TlsError};

use super::reload::Reloader;
use super::{Daemon, DaemonError, Tracker};
use crate::config::Config;
use crate::http::{self, AppState, DEFAULT_BODY_LIMIT, SharedToken};
use crate::launcher::Launcher;
use crate::metrics::{Metrics, Scraped};
use crate::outbox::{DeliveryConfig, OmaClient, deliver_with, spill};

/// How long the tasks get to finish (requests in flight, a delivery attempt) after the
/// shutdown signal before they are cut off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What stops the daemon, at start or while it runs.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Detector, registry or outbox could not start.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// An API address could not be bound.
    #[error(
        "cannot listen on {addr}: {source}; another watchdog (or another program) may use it: stop it or give --listen another address"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics address given could not be bound.
    #[error(transparent)]
    MetricsBind(#[from] daemon_support::metrics::BindError),
    /// A TLS file (the API's certificate, key or client CA, or the OMA's CA or this
    /// watchdog's client certificate) could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The SIGHUP handler could not be installed.
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
    /// A task ended before the shutdown signal (the detector stopped delivering events).
    #[error(
        "the {0} stopped on its own; exiting so that a supervisor restarts the watchdog (the registry and outbox on disk carry over)"
    )]
    TaskEnded(&'static str),
}

/// The tasks of a running daemon, each named for the log when it ends.
type Tasks = JoinSet<(&'static str, Result<(), ServeError>)>;

/// Which router a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The whole API (HTTPS when configured).
    Api,
    /// Progress updates only, plain HTTP on loopback, for migratekit when the API is HTTPS.
    Progress,
}

/// Runs the daemon until `shutdown` completes (SIGTERM/SIGINT in `main`).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    // Every file is read before anything starts, so a bad one stops the start with its name.
    let tls = config.net.tls.clone().map(ServerTls::load).transpose()?;
    let oma_client = oma_client(&config)?;
    let hup = signal(SignalKind::hangup()).map_err(ServeError::Signal)?;
    // Bound before the daemon starts, so that once it says `watchdog_ready` its API takes
    // connections (they wait in the backlog until the listeners are served, a moment later),
    // and a port already taken stops the start before the detector is loaded.
    let listeners = bind(&config).await?;
    let metrics_listener = daemon_support::metrics::bind(
        config.metrics_listen,
        crate::metrics::DEFAULT_LISTEN
            .parse()
            .expect("a valid address"),
    )
    .await?;
    let daemon = Daemon::start_with(config.clone(), Metrics::new()).await?;
    let tracker = daemon.tracker();
    let state = app_state(&config, &tracker);
    let (stop, stopped) = watch::channel(false);
    let stopped = move || daemon_support::stopped(stopped.clone());
    let mut tasks: Tasks = JoinSet::new();
    let limits = config.net.limits.fit_fd_limit(listeners.len());
    let stats = Arc::new(ServeStats::default());
    for (kind, listener) in listeners {
        let (router, tls) = match kind {
            Kind::Api => (http::router(state.clone()), tls.clone()),
            Kind::Progress => (http::progress_router(state.clone()), None),
        };
        let serving = transport::serve(listener, router, tls, limits, stats.clone(), stopped());
        tasks.spawn(async move {
            serving.await;
            ("REST API", Ok(()))
        });
    }
    if let Some(listener) = metrics_listener {
        let scraped = Arc::new(Scraped {
            metrics: Arc::clone(tracker.metrics()),
            tracker: tracker.clone(),
        });
        let serving = daemon_support::metrics::serve(listener, scraped, stopped());
        tasks.spawn(async move {
            serving.await;
            ("metrics endpoint", Ok(()))
        });
    }
    start_spill(&mut tasks, &config, &tracker, oma_client.clone(), stopped());
    if let Some(client) = &oma_client {
        start_delivery(&mut tasks, &config, &tracker, client.clone(), stopped());
    } else {
        tracing::warn!(
            event = "delivery_disabled",
            queued = tracker.outbox().stats().queued,
            "no --oma-url: deaths are recorded in the outbox on disk but not delivered; start with --oma-url and --oma-token-file to deliver them"
        );
    }
    let reloader = Reloader::new(&config, state.token.clone(), oma_client, tls);
    let reload_stopped = stopped();
    tasks.spawn(async move {
        reloader.reload_on_sighup(hup, reload_stopped).await;
        ("SIGHUP handler", Ok(()))
    });
    let detector_stopped = stopped();
    tasks.spawn(async move {
        daemon.follow_events(detector_stopped).await;
        ("detector", Ok(()))
    });
    super::systemd::ready(&tracker, stopped());
    let result = wait(&mut tasks, shutdown).await;
    daemon_support::notify::stopping();
    let _ = stop.send(true);
    drain(tasks).await;
    result
}

/// The client for the OMA, when deaths are delivered; its TLS files are read here.
fn oma_client(config: &Config) -> Result<Option<Arc<OmaClient>>, ServeError> {
    let Some(oma) = &config.oma else {
        return Ok(None);
    };
    let timeout = DeliveryConfig::new(&oma.url, &config.vma_id, oma.token.clone()).request_timeout;
    let client = OmaClient::new(timeout, oma.token.clone(), &config.net.oma_tls)?;
    Ok(Some(Arc::new(client)))
}

fn app_state(config: &Config, tracker: &Tracker) -> AppState {
    let token = config.api_token.clone().unwrap_or_else(|| {
        tracing::warn!(event = "api_token_missing", "no API token configured (--api-token-file, --api-token or VMA_WATCHDOG_API_TOKEN): the job API refuses every call; only /health and progress updates from this host are served");
        crate::config::unguessable_token()
    });
    // The template's arguments are not logged: an administrator may have written a secret
    // into one of them instead of using a credentials entry.
    tracing::info!(event = "launcher_configured", program = %config.launcher.program.display(),
        template_args = config.launcher.args.len(),
        credentials = ?config.launcher.credentials.keys().collect::<Vec<_>>(),
        "migratekit is started from the configured template");
    AppState {
        progress: Arc::clone(tracker.progress()),
        jobs: Arc::new(tracker.clone()),
        launcher: Arc::new(Launcher::new(config.launcher.clone())),
        token: SharedToken::new(token),
        outbox: Some(Arc::clone(tracker.outbox())),
        body_limit: DEFAULT_BODY_LIMIT,
        stopped: Arc::default(),
        metrics: Arc::clone(tracker.metrics()),
    }
}

fn start_delivery(
    tasks: &mut Tasks,
    config: &Config,
    tracker: &Tracker,
    client: Arc<OmaClient>,
    stopped: impl Future<Output = ()> + Send + 'static,
) {
    let Some(oma) = &config.oma else { return };
    let mut delivery = DeliveryConfig::new(&oma.url, &config.vma_id, oma.token.clone());
    delivery.max_backoff = oma.max_backoff;
    delivery.tls = config.net.oma_tls.clone();
    delivery.metrics = Arc::clone(tracker.metrics());
    tracing::info!(event = "delivery_started", oma_url = %oma.url, vma_id = %config.vma_id,
        https = oma.url.starts_with("https://"), client_certificate = config.net.oma_tls.cert.is_some(),
        queued = tracker.outbox().stats().queued, flush_order = tracker.outbox().flush_order().as_str(),
        "delivering events to the OMA");
    let outbox = Arc::clone(tracker.outbox());
    tasks.spawn(async move {
        deliver_with(outbox, delivery, client, stopped).await;
        ("delivery to the OMA", Ok(()))
    });
}

/// Retries writing the events held in memory and delivers them from there meanwhile.
fn start_spill(
    tasks: &mut Tasks,
    config: &Config,
    tracker: &Tracker,
    client: Option<Arc<OmaClient>>,
    stopped: impl Future<Output = ()> + Send + 'static,
) {
    let delivery = config
        .oma
        .as_ref()
        .zip(client)
        .map(|(oma, client)| spill::MemoryDelivery {
            client,
            omas: Arc::new(crate::outbox::omas::OmaUrls::parse(&oma.url)),
            vma_id: config.vma_id.clone(),
            metrics: Arc::clone(tracker.metrics()),
        });
    let (held, outbox) = (Arc::clone(tracker.spill()), Arc::clone(tracker.outbox()));
    tasks.spawn(async move {
        spill::run(held, outbox, delivery, stopped).await;
        ("delivery of events held in memory", Ok(()))
    });
}

/// Waits for `shutdown`, or for a task that ends before it (a failure).
async fn wait(tasks: &mut Tasks, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    tokio::pin!(shutdown);
    let result = tokio::select! {
        () = &mut shutdown => Ok(()),
        // Every task runs until told to stop, so one that ends first is a failure: its own
        // error, or the detector that stopped delivering events.
        Some(ended) = tasks.join_next() => Err(match ended {
            Ok((_, Err(error))) => error,
            Ok((name, Ok(()))) => ServeError::TaskEnded(name),
            Err(_) => ServeError::TaskEnded("a task (panicked)"),
        }),
    };
    if let Err(error) = &result {
        tracing::error!(event = "watchdog_stopping", %error, "a part of the watchdog stopped; stopping the rest");
    }
    result
}

/// Waits (bounded) for every task to stop after the stop signal.
async fn drain(mut tasks: Tasks) {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(ended) = tasks.join_next().await {
            if let Ok((name, Err(error))) = ended {
                tracing::warn!(task = name, %error, "a task failed while stopping");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout_s = DRAIN_TIMEOUT.as_secs(),
            "tasks still busy after the shutdown timeout; cutting them off"
        );
        tasks.shutdown().await;
    }
}

/// Binds every configured address: the API's, then the progress listeners'. The optional
/// ones (`[::1]` with the defaults) are skipped with a log line when the host cannot have
/// them.
async fn bind(config: &Config) -> Result<Vec<(Kind, TcpListener)>, ServeError> {
    let tls = config.net.tls.is_some();
    let mut out = Vec::new();
    let groups = [
        (Kind::Api, &config.listen, &config.listen_if_available),
        (
            Kind::Progress,
            &config.net.progress_listen,
            &config.net.progress_listen_if_available,
        ),
    ];
    for (kind, required, optional) in groups {
        for &addr in required {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            out.push((kind, listening(listener, addr, kind, tls)?));
        }
        for &addr in optional {
            match TcpListener::bind(addr).await {
                Ok(listener) => out.push((kind, listening(listener, addr, kind, tls)?)),
                Err(error) => {
                    tracing::info!(%addr, %error, "not listening on this address (no IPv6 loopback here, or it is taken); migratekit reaches the API over 127.0.0.1")
                }
            }
        }
    }
    Ok(out)
}

fn listening(
    listener: TcpListener,
    addr: SocketAddr,
    kind: Kind,
    tls: bool,
) -> Result<TcpListener, ServeError> {
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    match kind {
        Kind::Api => {
            let scheme = if tls { "https" } else { "http" };
            tracing::info!(event = "api_listening", addr = %local, scheme, "REST API listening");
        }
        Kind::Progress => {
            tracing::info!(event = "progress_listening", addr = %local, scheme = "http",
            "plain-HTTP loopback listener for migratekit's progress updates (only that route)")
        }
    }
    Ok(listener)
}
