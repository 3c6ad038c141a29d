//! The watchdog's REST API: progress from migratekit, job status and job start for the OMA.
//!
//! `router(state)` builds the axum router; the daemon serves it through `transport::serve`
//! (connection cap, header and idle timeouts, optional TLS), which gives handlers both ends
//! of each connection: progress updates are accepted from loopback peers only, and only from
//! the job's own registered process (`progress_gate`). Every route but `/health` and progress
//! updates needs the bearer token; `/openapi.json` (the document, [`openapi`]) does not.
//! `progress_router(state)` is the progress route alone, for
//! the plain-HTTP loopback listener migratekit posts to when the API itself is HTTPS.

mod auth;
mod error;
mod handlers;
#[cfg(feature = "test-doubles")]
mod memory_jobs;
pub mod openapi;
mod progress_gate;

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use api::{ExitStatus, FoundBy, JobId, ProcessIdentity, VmaJobStatus};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use auth::{SharedToken, is_loopback_peer};
pub use error::{ApiError, JobPath, JsonBody, QueryParams};
#[cfg(feature = "test-doubles")]
pub use memory_jobs::MemoryJobs;
pub use progress_gate::{Refusal, refused_updates};

use crate::launcher::Launcher;
use crate::metrics::{self, Metrics};
use crate::outbox::Outbox;
use crate::progress::ProgressStore;

/// Largest request body accepted (progress updates and start requests are a few hundred
/// bytes; anything this large is a mistake or an attack).
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// What the API needs to know about jobs and their processes. The daemon's process registry
/// implements it; `MemoryJobs` (feature `test-doubles`) is an in-memory implementation for
/// tests.
///
/// `register_process` and `launched_child_exited` are called from blocking threads (never
/// from an async task), so an implementation over async code may use
/// `tokio::runtime::Handle::current().block_on(..)` there.
pub trait JobsView: Send + Sync + 'static {
    /// The latest state of a job's process, or `None` if the watchdog never heard of it.
    fn job(&self, job_id: &str) -> Option<VmaJobStatus>;
    /// Every job the watchdog knows.
    fn jobs(&self) -> Vec<VmaJobStatus>;
    /// Registers `process` as running `job_id` (started by the launcher, or adopted by the
    /// track endpoint). It must be durable and watched for its death when this returns:
    /// the launcher lets a started process run only after it returns `Ok`.
    fn register_process(
        &self,
        job_id: &JobId,
        process: ProcessIdentity,
        found_by: FoundBy,
    ) -> Result<VmaJobStatus, RegisterError>;
    /// A process started by the launcher has exited with `exit` (from `waitid`); it is still
    /// a zombie and is reaped right after this returns. The detectors report the death
    /// anyway; this is the exact status, for a registry that records it first.
    fn launched_child_exited(&self, job_id: &JobId, process: ProcessIdentity, exit: ExitStatus) {
        let _ = (job_id, process, exit);
    }
    /// What `/health` shows about processes. By default counted from [`JobsView::jobs`].
    fn health(&self) -> JobsHealth {
        let jobs = self.jobs();
        let running = jobs
            .iter()
            .filter(|j| matches!(j.state, api::JobProcessState::Running { .. }))
            .count();
        JobsHealth {
            detector: None,
            running,
            jobs: jobs.len(),
        }
    }
}

/// The jobs side of `/health`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobsHealth {
    /// The detector that watches processes, when there is one.
    pub detector: Option<api::Detector>,
    /// Processes registered and running.
    pub running: usize,
    /// Jobs known (running or exited).
    pub jobs: usize,
}

/// Why a process could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The job already has another live process.
    #[error("job {job_id} already runs as pid {} (start time {}); stop it or track that process instead", running.pid, running.start_time)]
    JobRunning {
        /// The job.
        job_id: JobId,
        /// Its live process.
        running: ProcessIdentity,
    },
    /// The registry could not be written to disk.
    #[error("the process registry could not be saved: {0}; check the state directory")]
    Persist(#[source] std::io::Error),
    /// The detector could not be told to watch the process.
    #[error("the detector could not watch the process: {0}")]
    Watch(#[source] std::io::Error),
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Latest progress per job.
    pub progress: Arc<ProgressStore>,
    /// The process registry.
    pub jobs: Arc<dyn JobsView>,
    /// Starts migratekit.
    pub launcher: Arc<Launcher>,
    /// Token required on every route but `/health` and progress updates; re-read on SIGHUP.
    pub token: SharedToken,
    /// The outbox, whose counters `/health` shows.
    pub outbox: Option<Arc<Outbox>>,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// Processes already sent SIGTERM at the OMA's request, as `(pid, start time)`: a stop
    /// asked again (the OMA's retry after a lost answer, or two OMAs) does not signal again,
    /// which could cut migratekit's own shutdown short. One entry per cancelled job.
    pub stopped: Arc<Mutex<HashSet<(u32, u64)>>>,
    /// Requests, launches and progress updates are counted here.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("body_limit", &self.body_limit)
            .finish_non_exhaustive()
    }
}

/// The API's router.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/api/v1/progress", get(handlers::progress_feed))
        .route("/api/v1/progress/{job_id}", get(handlers::get_progress))
        .route("/api/v1/jobs", get(handlers::list_jobs))
        .route("/api/v1/jobs/{job_id}", get(handlers::get_job))
        .route(
            "/api/v1/jobs/{job_id}/start",
            state.metrics.count_launches(post(handlers::start_job)),
        )
        .route("/api/v1/jobs/{job_id}/track", post(handlers::track_job))
        .route("/api/v1/jobs/{job_id}/stop", post(handlers::stop_job))
        // Inside the token check (the later layer wraps the earlier): only a call with the
        // token tells that the OMA is back.
        .route_layer(axum::middleware::from_fn_with_state(
            state.outbox.clone(),
            auth::note_oma_call,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.token.clone(),
            auth::require_token,
        ));
    let router = Router::new()
        .merge(protected)
        .merge(progress_routes(&state))
        .route("/health", get(handlers::health))
        .route(
            "/openapi.json",
            get(|| async { axum::Json(openapi::document()) }),
        )
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(state.body_limit));
    state.metrics.daemon().instrument(router).with_state(state)
}

/// The router of the plain-HTTP loopback listener kept for migratekit when the API is
/// served over HTTPS: migratekit's progress client cannot speak TLS, so its one route is
/// served here alone, with the same loopback and job-process checks; every other path is
/// 404, so no token-protected route is ever reachable without TLS.
pub fn progress_router(state: AppState) -> Router {
    let router = Router::new()
        .merge(progress_routes(&state))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(state.body_limit));
    state.metrics.daemon().instrument(router).with_state(state)
}

fn progress_routes(state: &AppState) -> Router<AppState> {
    // The checks wrap the POST alone, so another method is a 405 like anywhere else rather
    // than a refusal by the checks. Inside the loopback check: only the job's own process may
    // report its progress.
    let update = post(handlers::post_progress)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            progress_gate::require_job_process,
        ))
        .route_layer(axum::middleware::from_fn(auth::require_loopback))
        // Outside both checks, so that refused updates are counted too.
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            metrics::count_progress,
        ));
    Router::new().route("/api/v1/progress/{job_id}/update", update)
}

/// Serves the API on `listener` in plain HTTP with the transport's default limits until
/// `shutdown` resolves, then finishes the requests in flight (bounded) and returns. It never
/// fails; the result is kept for callers that treat a server as fallible.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    transport::serve(
        listener,
        router(state),
        None,
        transport::Limits::default(),
        Arc::default(),
        shutdown,
    )
    .await;
    Ok(())
}
