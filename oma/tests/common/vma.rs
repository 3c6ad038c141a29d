//! A minimal stand-in for a VMA's watchdog API, following the contract in `api/`:
//! `GET /api/v1/jobs/{id}` (200 running/exited, 404 `unknown_job`) and
//! `GET /api/v1/progress/{id}` (200 StoredProgress, 404 when none) and
//! `POST /api/v1/jobs/{id}/start` (201 running with the process identity, 409 `job_running`,
//! 400 `invalid_parameters`), which records the parameters it was sent.

use api::{
    Detector, ErrorBody, ExitStatus, FoundBy, JobProcessState, ProcessIdentity, ProgressUpdate,
    StartJobRequest, StoredProgress, VmaJobStatus,
};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the stand-in says about a job.
#[derive(Debug, Clone)]
pub enum Answer {
    Running(ProcessIdentity),
    Exited(ProcessIdentity, ExitStatus),
    /// HTTP 500.
    Broken,
}

/// How the stand-in answers a start request.
#[derive(Debug, Clone)]
pub enum StartMode {
    /// 201 running as this process (and the job is known as running from then on).
    Run(ProcessIdentity),
    /// 400 `invalid_parameters`.
    Refuse,
}

#[derive(Debug)]
pub struct Inner {
    pub jobs: HashMap<String, Answer>,
    pub progress: HashMap<String, StoredProgress>,
    pub progress_broken: bool,
    pub progress_calls: HashMap<String, u64>,
    pub delay_ms: u64,
    /// Job status requests received (before their delay).
    pub job_calls: u64,
    pub start_mode: StartMode,
    /// Every start request received: (job id, bearer token, body).
    pub starts: Vec<(String, Option<String>, StartJobRequest)>,
    /// Job ids the OMA asked to stop.
    pub stops: Vec<String>,
    /// Fixed "since"/"exited_at" time, so repeated answers are identical.
    pub epoch: chrono::DateTime<Utc>,
}

/// A running stand-in VMA.
#[derive(Debug, Clone)]
pub struct StandInVma {
    pub url: String,
    pub inner: Arc<Mutex<Inner>>,
}

impl StandInVma {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// The stand-in over HTTPS (its URL is `https://127.0.0.1:port`).
    #[allow(dead_code)]
    pub async fn start_tls(tls: transport::ServerTls) -> Self {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<transport::ServerTls>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            jobs: HashMap::new(),
            progress: HashMap::new(),
            progress_broken: false,
            progress_calls: HashMap::new(),
            delay_ms: 0,
            job_calls: 0,
            start_mode: StartMode::Refuse,
            starts: Vec::new(),
            stops: Vec::new(),
            epoch: Utc::now(),
        }));
        let router = Router::new()
            .route("/api/v1/jobs/{id}", get(job))
            .route("/api/v1/progress/{id}", get(progress))
            .route("/api/v1/jobs/{id}/start", post(start))
            .route("/api/v1/jobs/{id}/stop", post(stop))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let stats = std::sync::Arc::new(transport::ServeStats::default());
        let limits = transport::Limits::default();
        let forever = std::future::pending::<()>();
        tokio::spawn(transport::serve(
            listener, router, tls, limits, stats, forever,
        ));
        Self { url, inner }
    }

    /// Waits until `calls` job status requests have arrived; panics after 30 s.
    #[allow(dead_code)]
    pub async fn wait_job_calls(&self, calls: u64) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.inner.lock().unwrap().job_calls < calls {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the VMA was not asked about a job within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub fn set(&self, job: &str, answer: Answer) {
        self.inner.lock().unwrap().jobs.insert(job.into(), answer);
    }

    pub fn set_progress(
        &self,
        job: &str,
        sequence: u64,
        bytes: u64,
        status: Option<api::ProgressStatus>,
    ) {
        let update = ProgressUpdate {
            stage: "Transfer".into(),
            status,
            bytes_transferred: bytes,
            // Never below the bytes copied: a VMA answer that says so breaks `api::bounds`.
            total_bytes: Some(bytes.max(1000)),
            throughput_bps: 10,
            percent: None,
            disk_id: Some("disk-2000".into()),
            sync_type: Some(api::SyncType::Full),
            error_message: status
                .filter(|s| *s == api::ProgressStatus::Failed)
                .map(|_| "disk read error".into()),
        };
        let stored = StoredProgress {
            job_id: api::JobId::parse(job).expect("the tests' job ids follow the job-id rule"),
            update,
            received_at: Utc::now(),
            sequence,
        };
        self.inner
            .lock()
            .unwrap()
            .progress
            .insert(job.into(), stored);
    }

    pub fn set_start(&self, mode: StartMode) {
        self.inner.lock().unwrap().start_mode = mode;
    }

    pub fn starts(&self) -> Vec<(String, Option<String>, StartJobRequest)> {
        self.inner.lock().unwrap().starts.clone()
    }

    pub fn stops(&self) -> Vec<String> {
        self.inner.lock().unwrap().stops.clone()
    }

    pub fn progress_calls(&self, job: &str) -> u64 {
        self.inner
            .lock()
            .unwrap()
            .progress_calls
            .get(job)
            .copied()
            .unwrap_or(0)
    }
}

pub fn pid(pid: u32, start_time: u64) -> ProcessIdentity {
    ProcessIdentity { pid, start_time }
}

async fn job(State(inner): State<Arc<Mutex<Inner>>>, Path(id): Path<String>) -> Response {
    let (answer, delay, epoch) = {
        let mut inner = inner.lock().unwrap();
        inner.job_calls += 1;
        (inner.jobs.get(&id).cloned(), inner.delay_ms, inner.epoch)
    };
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    let state = match answer {
        None => {
            let body = ErrorBody {
                error: "unknown_job".into(),
                message: format!("no job {id}"),
            };
            return (StatusCode::NOT_FOUND, Json(body)).into_response();
        }
        Some(Answer::Broken) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Some(Answer::Running(process)) => JobProcessState::Running {
            process,
            since: epoch,
            found_by: FoundBy::Started,
        },
        Some(Answer::Exited(process, exit)) => JobProcessState::Exited {
            process,
            exit,
            exited_at: epoch,
            detector: Detector::Ebpf,
        },
    };
    match api::JobId::parse(&id) {
        Ok(job_id) => Json(VmaJobStatus { job_id, state }).into_response(),
        Err(e) => invalid_job_id(&e),
    }
}

/// The real watchdog's answer to a job id that breaks the rule.
fn invalid_job_id(e: &api::JobIdError) -> Response {
    let body = ErrorBody {
        error: "invalid_job_id".into(),
        message: e.to_string(),
    };
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

async fn progress(State(inner): State<Arc<Mutex<Inner>>>, Path(id): Path<String>) -> Response {
    let mut inner = inner.lock().unwrap();
    *inner.progress_calls.entry(id.clone()).or_default() += 1;
    if inner.progress_broken {
        return StatusCode::BAD_GATEWAY.into_response();
    }
    match inner.progress.get(&id) {
        Some(p) => Json(p.clone()).into_response(),
        None => {
            let body = ErrorBody {
                error: "unknown_job".into(),
                message: format!("no progress for {id}"),
            };
            (StatusCode::NOT_FOUND, Json(body)).into_response()
        }
    }
}

/// Like the watchdog: 202 for a running job (its process then dies of SIGTERM), 409
/// `not_running` for an exited one, 404 `unknown_job` otherwise.
async fn stop(State(inner): State<Arc<Mutex<Inner>>>, Path(id): Path<String>) -> Response {
    let mut inner = inner.lock().unwrap();
    inner.stops.push(id.clone());
    let refuse = |status, error: &str| {
        let body = ErrorBody {
            error: error.into(),
            message: format!("job {id}: {error}"),
        };
        (status, Json(body)).into_response()
    };
    match inner.jobs.get(&id).cloned() {
        Some(Answer::Running(process)) => {
            let exit = ExitStatus::from_wait_status(SIGTERM_WAIT_STATUS, false);
            inner.jobs.insert(id, Answer::Exited(process, exit));
            StatusCode::ACCEPTED.into_response()
        }
        Some(_) => refuse(StatusCode::CONFLICT, "not_running"),
        None => refuse(StatusCode::NOT_FOUND, "unknown_job"),
    }
}

/// The wait status of a death by SIGTERM (15 on Linux), without a libc dependency in the
/// OMA's tests.
const SIGTERM_WAIT_STATUS: u32 = 15;

async fn start(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(request): Json<StartJobRequest>,
) -> Response {
    let mut inner = inner.lock().unwrap();
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    inner.starts.push((id.clone(), token, request));
    let error = |status, error: &str, message: String| {
        let body = ErrorBody {
            error: error.into(),
            message,
        };
        (status, Json(body)).into_response()
    };
    if let Some(Answer::Running(running)) = inner.jobs.get(&id) {
        let message = format!("job {id} already runs as pid {}", running.pid);
        return error(StatusCode::CONFLICT, "job_running", message);
    }
    match inner.start_mode.clone() {
        StartMode::Refuse => error(
            StatusCode::BAD_REQUEST,
            "invalid_parameters",
            "the template needs {vm_path}, which the request does not give".into(),
        ),
        StartMode::Run(process) => {
            let job_id = match api::JobId::parse(&id) {
                Ok(job_id) => job_id,
                Err(e) => return invalid_job_id(&e),
            };
            inner.jobs.insert(id, Answer::Running(process));
            let state = JobProcessState::Running {
                process,
                since: inner.epoch,
                found_by: FoundBy::Started,
            };
            (StatusCode::CREATED, Json(VmaJobStatus { job_id, state })).into_response()
        }
    }
}
