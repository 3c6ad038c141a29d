//! The route handlers.

use std::sync::Arc;

use api::{
    FoundBy, JobId, JobProcessState, ProgressFeed, ProgressFeedQuery, ProgressUpdate,
    StartJobRequest, StoredProgress, TrackJobRequest, VmaJobStatus,
};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::error::{ApiError, JobPath, JsonBody, QueryParams};
use super::{AppState, RegisterError};
use crate::launcher::{LaunchError, TemplateError, proc_comm, proc_identity};

/// `POST /api/v1/progress/{job_id}/update`: migratekit's own client (from this host only and
/// from the job's own registered process, which the route's `require_loopback` and
/// `require_job_process` layers have checked before the body is read).
#[utoipa::path(post, path = "/api/v1/progress/{job_id}/update", tag = "progress", params(("job_id" = JobId, Path, description = "The job (migratekit's `--job-id`).")),
    request_body = ProgressUpdate,
    responses((status = 200, description = "Stored; the update as kept, with its sequence number.", body = StoredProgress),
        (status = 400, description = "The body breaks the schema, or a value its range (`invalid_body`, `invalid_field`); `total_bytes` must be at least `bytes_transferred`. A longer `error_message` is cut, not refused.", body = api::ErrorBody),
        (status = 403, description = "Not from a process of this host (`forbidden`), or not from the job's own registered migratekit process (`not_job_process`).", body = api::ErrorBody)))]
pub async fn post_progress(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    JsonBody(mut update): JsonBody<ProgressUpdate>,
) -> Result<Json<StoredProgress>, ApiError> {
    // A long failure reason is cut rather than refused: it is migratekit's last word, and a
    // refused update would lose its `failed` status too.
    if let Some(len) = update.truncate_error_message() {
        tracing::warn!(event = "progress_error_message_cut", job_id = %job_id, len,
            max = api::bounds::MAX_ERROR_MESSAGE_CHARS,
            "migratekit's error message was longer than the limit; stored its beginning and end");
    }
    update
        .validate()
        .map_err(|e| field_refused(&job_id, "progress", &e))?;
    let store = Arc::clone(&state.progress);
    let stored = tokio::task::spawn_blocking(move || store.record(&job_id, update))
        .await
        .map_err(|e| ApiError::Internal(format!("storing the progress update failed: {e}")))?
        .map_err(|e| {
            tracing::error!(error = %e, "could not store a progress update");
            ApiError::Internal(e.to_string())
        })?;
    Ok(Json(stored))
}

/// A 400 `invalid_field` for a value that breaks its rule in `api::bounds`, logged
/// (`field_refused`) with the field and the rule, never the value.
fn field_refused(job_id: &JobId, route: &'static str, error: &api::FieldError) -> ApiError {
    tracing::warn!(event = "field_refused", job_id = %job_id, route, field = error.field(),
        reason = %error, "refused a request with a value out of range");
    ApiError::BadRequest("invalid_field", error.to_string())
}

/// `GET /api/v1/progress/{job_id}`: the latest update, for the OMA's poller.
#[utoipa::path(get, path = "/api/v1/progress/{job_id}", tag = "progress", params(("job_id" = JobId, Path, description = "The job (migratekit's `--job-id`).")),
    security(("bearer" = [])),
    responses((status = 200, body = StoredProgress),
        (status = 404, description = "No progress received for this job (`no_progress`).", body = api::ErrorBody)))]
pub async fn get_progress(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
) -> Result<Json<StoredProgress>, ApiError> {
    state.progress.get(&job_id).map(Json).ok_or_else(|| {
        ApiError::NotFound(
            "no_progress",
            format!("no progress has been received for job {job_id}"),
        )
    })
}

/// `GET /api/v1/progress?since=&epoch=&limit=`: the latest progress of every job whose
/// progress changed after the cursor, oldest change first, for the OMA's poller (one request
/// per VMA and interval instead of one per job).
#[utoipa::path(get, path = "/api/v1/progress", tag = "progress", params(ProgressFeedQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "The jobs that changed after `since` (every job when \
        `since` is absent or 0, or `epoch` is not this watchdog's), at most `limit` (default and \
        cap 5000; 0 means the default); `more` when cut, `cursor` to send as `since` next.", body = ProgressFeed)))]
pub async fn progress_feed(
    State(state): State<AppState>,
    QueryParams(query): QueryParams<ProgressFeedQuery>,
) -> Result<Json<ProgressFeed>, ApiError> {
    // The ranges the document gives (`since` int64, `limit` int32), not just the Rust types'.
    if query.since.is_some_and(|s| i64::try_from(s).is_err()) {
        let message = "invalid query: since must be from 0 to 2^63-1".to_owned();
        return Err(ApiError::BadRequest("invalid_query", message));
    }
    if query.limit.is_some_and(|l| i32::try_from(l).is_err()) {
        let message = "invalid query: limit must be from 0 to 2^31-1".to_owned();
        return Err(ApiError::BadRequest("invalid_query", message));
    }
    let feed = state.progress.feed(&query);
    state.metrics.progress_feed(feed.jobs.len());
    Ok(Json(feed))
}

/// `GET /api/v1/jobs`: every job this VMA knows, with its process's latest state.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", security(("bearer" = [])),
    responses((status = 200, body = Vec<VmaJobStatus>)))]
pub async fn list_jobs(State(state): State<AppState>) -> Json<Vec<VmaJobStatus>> {
    Json(state.jobs.jobs())
}

/// `GET /api/v1/jobs/{job_id}`: 200 with the state, or 404 `unknown_job`.
#[utoipa::path(get, path = "/api/v1/jobs/{job_id}", tag = "jobs", params(("job_id" = JobId, Path, description = "The job (migratekit's `--job-id`).")),
    security(("bearer" = [])),
    responses((status = 200, body = VmaJobStatus),
        (status = 404, description = "This VMA never ran or tracked the job (`unknown_job`).", body = api::ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
) -> Result<Json<VmaJobStatus>, ApiError> {
    state
        .jobs
        .job(&job_id)
        .map(Json)
        .ok_or_else(|| unknown_job(&job_id))
}

/// `POST /api/v1/jobs/{job_id}/stop`: SIGTERM to the job's running migratekit (the OMA asks
/// when an operator cancels the job), once per process however often it is asked. 202 with
/// the job as it stands: the death follows as any other, through the detector and the outbox.
/// 404 `unknown_job`, 409 `not_running`.
#[utoipa::path(post, path = "/api/v1/jobs/{job_id}/stop", tag = "jobs", params(("job_id" = JobId, Path, description = "The job (migratekit's `--job-id`).")),
    security(("bearer" = [])),
    responses((status = 202, description = "SIGTERM sent (or sent already); the job as it stands. The death follows as an event.", body = VmaJobStatus),
        (status = 404, description = "This VMA never ran or tracked the job (`unknown_job`).", body = api::ErrorBody),
        (status = 409, description = "The job has no running process (`not_running`).", body = api::ErrorBody),
        (status = 500, description = "The signal could not be sent (`internal_error`).", body = api::ErrorBody)))]
pub async fn stop_job(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
) -> Result<(StatusCode, Json<VmaJobStatus>), ApiError> {
    let status = state
        .jobs
        .job(&job_id)
        .ok_or_else(|| unknown_job(&job_id))?;
    let api::JobProcessState::Running { process, .. } = status.state else {
        return Err(not_running(&job_id));
    };
    let key = (process.pid, process.start_time);
    let stopped = || state.stopped.lock().unwrap_or_else(|e| e.into_inner());
    let first = stopped().insert(key);
    if !first {
        tracing::info!(event = "stop_repeated", job_id = %job_id, pid = process.pid,
            "stop asked again; this process was sent SIGTERM already, not sending it again");
        return Ok((StatusCode::ACCEPTED, Json(status)));
    }
    let sent = crate::signal::send(process, libc::SIGTERM);
    if sent.is_err() {
        // Not signalled: a later request may try again.
        stopped().remove(&key);
    }
    match sent {
        Ok(()) => {}
        Err(crate::signal::SignalError::Gone { .. }) => return Err(not_running(&job_id)),
        Err(e) => return Err(ApiError::Internal(e.to_string())),
    }
    tracing::info!(event = "stop_requested", job_id = %job_id, pid = process.pid,
        start_time = process.start_time, "SIGTERM sent to migratekit at the OMA's request");
    Ok((StatusCode::ACCEPTED, Json(status)))
}

fn not_running(job_id: &str) -> ApiError {
    ApiError::Conflict(
        "not_running",
        format!("job {job_id} has no running process on this VMA; nothing to stop"),
    )
}

fn unknown_job(job_id: &str) -> ApiError {
    ApiError::NotFound(
        "unknown_job",
        format!("this VMA has never run or tracked job {job_id}"),
    )
}

/// `POST /api/v1/jobs/{job_id}/start`: launch migratekit from the VMA's template.
#[utoipa::path(post, path = "/api/v1/jobs/{job_id}/start", tag = "jobs", params(("job_id" = JobId, Path, description = "The job (migratekit's `--job-id`).")),
    security(("bearer" = [])), request_body = StartJobRequest,
    responses((status = 201, description = "Started, registered and watched.", body = VmaJobStatus),
        (status = 400, description = "The body breaks the schema (`invalid_body`, `invalid_parameters`): a value too long or with a control character, a reserved name in `parameters`.", body = api::ErrorBody),
        (status = 409, description = "The job already runs (`job_running`), or the request does not fit this VMA's configuration: its template needs a parameter the request lacks, or no credentials have that name (`invalid_parameters`).", body = api::ErrorBody),
        (status = 500, description = "migratekit could not be started or registered, or the template is broken (`internal_error`); the message says what to check.", body = api::ErrorBody)))]
pub async fn start_job(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    JsonBody(request): JsonBody<StartJobRequest>,
) -> Result<(StatusCode, Json<VmaJobStatus>), ApiError> {
    if let Some(running) = running_process(&state, &job_id) {
        return Err(job_running(&job_id, running));
    }
    // A task of its own: a client that hangs up mid-launch must not cancel the launch half
    // way (process registered and released, but nobody left to reap it).
    tokio::spawn(launch_and_reap(state, job_id, request))
        .await
        .map_err(|e| ApiError::Internal(format!("the launch task failed: {e}")))?
}

async fn launch_and_reap(
    state: AppState,
    job_id: JobId,
    request: StartJobRequest,
) -> Result<(StatusCode, Json<VmaJobStatus>), ApiError> {
    let jobs = Arc::clone(&state.jobs);
    let id = job_id.clone();
    let register = move |process| jobs.register_process(&id, process, FoundBy::Started);
    let (launched, status) = state
        .launcher
        .launch(&job_id, &request, register)
        .await
        .map_err(|e| launch_error(&job_id, e))?;
    // In a systemd unit, systemd is its parent and reaps it; the detector reports its death.
    if launched.child.is_none() {
        return Ok((StatusCode::CREATED, Json(status)));
    }
    // When the child ends, hand its exact status to the registry first and reap it only
    // then, so a detector that saw the death can still read the zombie's status. A plain
    // thread: it blocks for as long as the job runs.
    let jobs = Arc::clone(&state.jobs);
    let process = launched.process;
    let reaper = std::thread::Builder::new()
        .name(format!("reap-{}", process.pid))
        .spawn(move || {
            match launched.wait_for_exit() {
                Ok(exit) => jobs.launched_child_exited(&job_id, process, exit),
                Err(error) => tracing::warn!(%error, pid = process.pid, "could not wait for a migratekit process; the detector still reports its death"),
            }
            let _ = launched.reap();
        });
    if let Err(error) = reaper {
        tracing::warn!(%error, pid = process.pid, "could not start a thread to reap migratekit; it stays a zombie after it exits until the watchdog restarts");
    }
    Ok((StatusCode::CREATED, Json(status)))
}

fn launch_error(job_id: &JobId, error: LaunchError<RegisterError>) -> ApiError {
    match error {
        LaunchError::Template(e @ TemplateError::Unclosed(_)) => ApiError::Internal(e.to_string()),
        // Well-formed requests this VMA's configuration cannot serve: the document's schema
        // cannot know the template or the credentials, so these are not a malformed body.
        LaunchError::Template(
            e @ (TemplateError::Missing(_) | TemplateError::UnknownCredentials(_)),
        ) => ApiError::Conflict("invalid_parameters", e.to_string()),
        LaunchError::Template(e) => ApiError::BadRequest("invalid_parameters", e.to_string()),
        LaunchError::Registration(RegisterError::JobRunning { running, .. }) => {
            job_running(job_id, running)
        }
        other => {
            tracing::error!(job_id = %job_id, error = %other, "could not start migratekit");
            ApiError::Internal(other.to_string())
        }
    }
}

fn job_running(job_id: &str, running: api::ProcessIdentity) -> ApiError {
    ApiError::Conflict(
        "job_running",
        format!(
            "job {job_id} already runs as pid {} (start time {})",
            running.pid, running.start_time
        ),
    )
}

fn running_process(state: &AppState, job_id: &str) -> Option<api::ProcessIdentity> {
    match state.jobs.job(job_id)?.state {
        JobProcessState::Running { process, .. } => Some(process),
        JobProcessState::Exited { .. } => None,
    }
}

/// `POST /api/v1/jobs/{job_id}/track`: adopt a running process after checking its name, its
/// executable and its user (403 `not_migratekit` when it is not the configured migratekit,
/// 409 `job_running` when the job already runs as another process).
#[utoipa::path(post, path = "/api/v1/jobs/{job_id}/track", tag = "jobs", params(("job_id" = JobId, Path, description = "The job (migratekit's `--job-id`).")),
    security(("bearer" = [])), request_body = TrackJobRequest,
    responses((status = 200, description = "Adopted and watched.", body = VmaJobStatus),
        (status = 400, description = "The body breaks the schema (`invalid_body`, `invalid_field`).", body = api::ErrorBody),
        (status = 403, description = "The process is not this VMA's migratekit: another name (`process_name_mismatch`), executable or user (`not_migratekit`).", body = api::ErrorBody),
        (status = 404, description = "No process with that pid (`no_such_process`).", body = api::ErrorBody),
        (status = 409, description = "The job already runs as another process (`job_running`).", body = api::ErrorBody),
        (status = 500, description = "The process could not be registered (`internal_error`).", body = api::ErrorBody)))]
pub async fn track_job(
    State(state): State<AppState>,
    JobPath(job_id): JobPath,
    JsonBody(request): JsonBody<TrackJobRequest>,
) -> Result<Json<VmaJobStatus>, ApiError> {
    request
        .validate()
        .map_err(|e| field_refused(&job_id, "track", &e))?;
    let pid = request.pid;
    let no_such = || {
        ApiError::NotFound(
            "no_such_process",
            format!("no process with pid {pid} runs on this VMA"),
        )
    };
    // Identity before and after reading the name: if the pid was reused in between, the
    // two start times differ and we refuse rather than adopt the wrong process.
    let before = proc_identity(pid).map_err(|_| no_such())?;
    let comm = proc_comm(pid).map_err(|_| no_such())?;
    let names = &state.launcher.config().match_names;
    if !names.contains(&comm) {
        return Err(ApiError::Forbidden(
            "process_name_mismatch",
            format!("pid {pid} is named {comm:?}, not one of the watched names {names:?}"),
        ));
    }
    // The name is not enough: any user can run a binary called migratekit.
    let trusted = state.launcher.config().migratekit.check(pid);
    let after = proc_identity(pid).map_err(|_| no_such())?;
    if before != after {
        return Err(no_such());
    }
    if let Err(refusal) = trusted {
        tracing::warn!(event = "impostor_ignored", pid, start_time = after.start_time,
            uid = crate::trust::process_uids(pid).ok().map(|(real, _)| real),
            exe = crate::trust::exe_path(pid).map(|p| p.display().to_string()).as_deref(),
            job_id = %job_id, reason = refusal.reason(), detail = %refusal, found_by = "tracked",
            "refused to track a process that is not this VMA's migratekit");
        return Err(ApiError::Forbidden(
            "not_migratekit",
            format!("pid {pid} is not this VMA's migratekit: {refusal}"),
        ));
    }
    let jobs = Arc::clone(&state.jobs);
    let id = job_id.clone();
    let registered =
        tokio::task::spawn_blocking(move || jobs.register_process(&id, after, FoundBy::Tracked))
            .await
            .map_err(|e| ApiError::Internal(format!("registering the process failed: {e}")))?;
    match registered {
        Ok(status) => Ok(Json(status)),
        Err(RegisterError::JobRunning { running, .. }) => Err(job_running(&job_id, running)),
        Err(other) => Err(ApiError::Internal(other.to_string())),
    }
}

/// Answer of `GET /health`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`: the API answers.
    pub status: &'static str,
    /// The detector that watches processes, when there is one.
    pub detector: Option<api::Detector>,
    /// The process registry's size.
    pub registry: RegistryHealth,
    /// The outbox's counters (absent without an OMA to deliver to).
    pub outbox: Option<crate::outbox::OutboxStats>,
    /// Whether the outbox can be written: `degraded` (with the error and the events held in
    /// memory meanwhile) when its file system is full or failing. Absent before the daemon runs.
    pub storage: Option<crate::outbox::spill::StorageHealth>,
    /// Progress updates refused.
    pub progress: ProgressHealth,
    /// The log.
    pub log: LogHealth,
}

/// The registry's side of `/health`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RegistryHealth {
    /// Processes registered and running.
    pub running: usize,
    /// Jobs known (running or exited).
    pub jobs: usize,
}

/// The progress side of `/health`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ProgressHealth {
    /// Updates refused since start (not from loopback, not from the job's process).
    pub refused_updates: u64,
}

/// The log side of `/health`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct LogHealth {
    /// Log lines dropped because stderr did not take them.
    pub dropped_lines: u64,
}

/// `GET /health`: liveness, the detector, the registry's size, the outbox's counters and the
/// log lines dropped because stderr did not take them.
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let jobs = state.jobs.health();
    Json(Health {
        status: "ok",
        detector: jobs.detector,
        registry: RegistryHealth {
            running: jobs.running,
            jobs: jobs.jobs,
        },
        outbox: state.outbox.as_ref().map(|o| o.stats()),
        storage: crate::outbox::spill::current_health(),
        progress: ProgressHealth {
            refused_updates: super::refused_updates(),
        },
        log: LogHealth {
            dropped_lines: crate::logging::dropped_lines(),
        },
    })
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::NotFound("not_found", "no such endpoint on the VMA watchdog".into())
}
