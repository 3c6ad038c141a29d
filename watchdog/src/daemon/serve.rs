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
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Daemon, DaemonError};
use crate::config::Config;
use crate::http::{self, AppState, DEFAULT_BODY_LIMIT};
use crate::launcher::Launcher;
use crate::outbox::{DeliveryConfig, run_delivery};
use crate::progress::ProgressError;

/// How long the tasks get to finish (requests in flight, a delivery attempt) after the
/// shutdown signal before they are cut off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What stops the daemon, at start or while it runs.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Detector, registry or outbox could not start.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The progress store could not be opened.
    #[error(transparent)]
    Progress(#[from] ProgressError),
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
    /// The HTTP server stopped on its own.
    #[error("the REST API on {addr} stopped: {source}; restart the watchdog")]
    Serve {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A task ended before the shutdown signal (the detector stopped delivering events).
    #[error(
        "the {0} stopped on its own; exiting so that a supervisor restarts the watchdog (the registry and outbox on disk carry over)"
    )]
    TaskEnded(&'static str),
}

/// Runs the daemon until `shutdown` completes (SIGTERM/SIGINT in `main`).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let daemon = Daemon::start(config.clone()).await?;
    let tracker = daemon.tracker();
    let listeners = bind(&config).await?;
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
    let state = AppState {
        progress: Arc::clone(tracker.progress()),
        jobs: Arc::new(tracker.clone()),
        launcher: Arc::new(Launcher::new(config.launcher.clone())),
        token,
        outbox: Some(Arc::clone(tracker.outbox())),
        body_limit: DEFAULT_BODY_LIMIT,
        stopped: Arc::default(),
    };

    let (stop, stopped) = watch::channel(false);
    let stopped = move || {
        let mut rx = stopped.clone();
        async move {
            // An error means the sender is gone: stop as well.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks: JoinSet<(&'static str, Result<(), ServeError>)> = JoinSet::new();
    for (addr, listener) in listeners {
        let (state, stopped) = (state.clone(), stopped());
        tasks.spawn(async move {
            let result = http::serve(listener, state, stopped).await;
            (
                "REST API",
                result.map_err(|source| ServeError::Serve { addr, source }),
            )
        });
    }
    match &config.oma {
        Some(oma) => {
            let mut delivery = DeliveryConfig::new(&oma.url, &config.vma_id, oma.token.clone());
            delivery.max_backoff = oma.max_backoff;
            tracing::info!(event = "delivery_started", oma_url = %oma.url, vma_id = %config.vma_id,
                queued = tracker.outbox().stats().queued, "delivering events to the OMA");
            let outbox = Arc::clone(tracker.outbox());
            let stopped = stopped();
            tasks.spawn(async move {
                run_delivery(outbox, delivery, stopped).await;
                ("delivery to the OMA", Ok(()))
            });
        }
        None => tracing::warn!(
            event = "delivery_disabled",
            queued = tracker.outbox().stats().queued,
            "no --oma-url: deaths are recorded in the outbox on disk but not delivered; start with --oma-url and --oma-token-file to deliver them"
        ),
    }
    let detector_stopped = stopped();
    tasks.spawn(async move {
        daemon.run(detector_stopped).await;
        ("detector", Ok(()))
    });

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
    let _ = stop.send(true);
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
    result
}

/// Binds every configured address; the optional ones (`[::1]` with the default) are
/// skipped with a log line when the host cannot have them.
async fn bind(config: &Config) -> Result<Vec<(SocketAddr, TcpListener)>, ServeError> {
    let mut out = Vec::new();
    for &addr in &config.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        out.push(listening(listener, addr)?);
    }
    for &addr in &config.listen_if_available {
        match TcpListener::bind(addr).await {
            Ok(listener) => out.push(listening(listener, addr)?),
            Err(error) => {
                tracing::info!(%addr, %error, "not listening on this address (no IPv6 loopback here, or it is taken); migratekit reaches the API over 127.0.0.1")
            }
        }
    }
    Ok(out)
}

fn listening(
    listener: TcpListener,
    addr: SocketAddr,
) -> Result<(SocketAddr, TcpListener), ServeError> {
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    tracing::info!(event = "api_listening", addr = %local, "REST API listening");
    Ok((local, listener))
}
