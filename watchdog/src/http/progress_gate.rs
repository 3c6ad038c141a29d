//! Whose progress counts: a progress update is accepted only from the job's own registered
//! process (or one of its threads), found through the loopback connection it came on.
//!
//! migratekit's client sends no credentials and cannot be changed, and any local user can
//! reach the loopback port; without this check a `"status":"failed"` from anyone would make
//! the OMA fail a job whose migratekit still runs. The body is never read for a refused call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use api::{JobProcessState, ProcessIdentity};
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use super::error::{ApiError, JobPath};
use crate::peer::{self, Connection, PeerError};

/// Progress updates refused because they did not come from the job's process.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// When the last refusal searched the whole host for the caller (seconds since the epoch).
static LAST_WIDE_SCAN: AtomicU64 = AtomicU64::new(0);

/// Progress updates refused so far because they did not come from the job's own process
/// (`/health`, `progress.refused_updates`).
pub fn refused_updates() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Why a progress update was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The watchdog has never registered a process for the job.
    #[error(
        "job {job_id} has no registered process on this VMA; progress is accepted only from the job's own migratekit, started with POST /api/v1/jobs/{job_id}/start or adopted with POST /api/v1/jobs/{job_id}/track"
    )]
    UnknownJob {
        /// The job.
        job_id: api::JobId,
    },
    /// The job's registered process has exited.
    #[error(
        "job {job_id}'s registered process (pid {pid}) has exited; progress is accepted only from the job's running migratekit"
    )]
    NotRunning {
        /// The job.
        job_id: api::JobId,
        /// The process that ran it.
        pid: u32,
    },
    /// The connection does not come from the job's process.
    #[error(
        "this connection does not come from job {job_id}'s migratekit (pid {pid}): {source}; progress is accepted only from that process"
    )]
    NotJobProcess {
        /// The job.
        job_id: api::JobId,
        /// The job's process.
        pid: u32,
        /// The process that holds the caller's socket, when it was looked for and found.
        holder: Option<u32>,
        /// What the lookup found.
        #[source]
        source: PeerError,
    },
    /// The lookup could not run.
    #[error("the caller of job {job_id}'s progress update could not be checked: {reason}")]
    Unchecked {
        /// The job.
        job_id: api::JobId,
        /// Why.
        reason: tokio::task::JoinError,
    },
}

/// Middleware of the progress update route (inside `require_loopback`): 403
/// `not_job_process` unless the connection comes from the job's registered process.
pub async fn require_job_process(
    State(state): State<AppState>,
    ConnectInfo(ends): ConnectInfo<transport::Ends>,
    JobPath(job_id): JobPath,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let conn = Connection::from(ends);
    match check(&state, &job_id, conn).await {
        Ok(()) => Ok(next.run(request).await),
        Err(refusal) => Err(refuse(&job_id, conn, &refusal)),
    }
}

async fn check(state: &AppState, job_id: &api::JobId, conn: Connection) -> Result<(), Refusal> {
    let process = registered(state, job_id)?;
    // Blocking reads of /proc (a few hundred microseconds at most): off the runtime's
    // workers, like the store's write that follows.
    let verdict = tokio::task::spawn_blocking(move || {
        peer::verify(process, conn).map_err(|source| {
            let holder = source
                .row()
                .filter(|_| wide_scan_allowed())
                .and_then(|row| peer::find_any_holder(row.inode));
            (source, holder)
        })
    })
    .await
    .map_err(|reason| Refusal::Unchecked {
        job_id: job_id.to_owned(),
        reason,
    })?;
    verdict
        .map(|_| ())
        .map_err(|(source, holder)| Refusal::NotJobProcess {
            job_id: job_id.to_owned(),
            pid: process.pid,
            holder,
            source,
        })
}

fn registered(state: &AppState, job_id: &api::JobId) -> Result<ProcessIdentity, Refusal> {
    match state.jobs.job(job_id).map(|status| status.state) {
        Some(JobProcessState::Running { process, .. }) => Ok(process),
        Some(JobProcessState::Exited { process, .. }) => Err(Refusal::NotRunning {
            job_id: job_id.to_owned(),
            pid: process.pid,
        }),
        None => Err(Refusal::UnknownJob {
            job_id: job_id.to_owned(),
        }),
    }
}

/// Counts and logs a refusal and turns it into the 403 answer. The log line names who
/// called when that is known: the socket's uid whenever its row was found, the pid when the
/// search of every process's fds ran (see [`wide_scan_allowed`]). Never the body: it is not
/// read.
fn refuse(job_id: &str, conn: Connection, refusal: &Refusal) -> ApiError {
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let (peer_uid, peer_pid) = match refusal {
        Refusal::NotJobProcess { source, holder, .. } => (source.row().map(|r| r.uid), *holder),
        _ => (None, None),
    };
    tracing::warn!(event = "progress_refused", job_id, peer = %conn.peer, peer_uid, peer_pid,
        reason = %refusal, "refused a progress update that does not come from the job's own process");
    ApiError::Forbidden("not_job_process", refusal.to_string())
}

/// At most one search of the whole host per second, so that a flood of forged calls cannot
/// make the watchdog read every process's fds for each of them.
fn wide_scan_allowed() -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_WIDE_SCAN.load(Ordering::Relaxed);
    now != last
        && LAST_WIDE_SCAN
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}
