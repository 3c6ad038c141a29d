//! The OMA's client of a VMA's watchdog API: job status for recovery, progress for the
//! poller, and starting a job's migratekit process.

use api::{
    ErrorBody, JobProcessState, ProgressFeed, StartJobRequest, StoredProgress, VmaJobStatus,
};
use reqwest::StatusCode;
use serde::Serialize;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use transport::{ClientTlsFiles, TlsError};

fn authorized(request: reqwest::RequestBuilder, token: Option<String>) -> reqwest::RequestBuilder {
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// What a VMA said about one job, as recovery needs it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum VmaAnswer {
    /// The VMA knows the job's process state.
    Known {
        /// Running or exited, with the process and exit evidence.
        state: JobProcessState,
    },
    /// 404 `unknown_job`: the VMA has never heard of the job.
    UnknownJob,
    /// No usable answer: connection refused, timeout, 5xx, unexpected body, or no VMA
    /// registered under the job's `vma_id`.
    Unreachable {
        /// What went wrong, for the audit trail.
        reason: String,
    },
}

/// Why a VMA call failed.
#[derive(Debug, thiserror::Error)]
pub enum VmaError {
    /// The request did not complete.
    #[error("request to the VMA failed ({0}); check that its watchdog runs and is reachable")]
    Request(#[from] reqwest::Error),
    /// The VMA answered with an unexpected status.
    #[error("the VMA answered HTTP {status}: {detail}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Its error code and message, when it sent an ErrorBody.
        detail: String,
    },
    /// The VMA's answer breaks the contract's rules (`api::bounds`), or is about another job:
    /// nothing of it is believed.
    #[error("the VMA's answer is not usable ({0}); check the VMA's watchdog version")]
    Contract(String),
}

/// HTTP client for VMA watchdogs. The bearer token for calls to VMAs is held in memory only.
/// Clones share one client, which [`VmaClient::reload`] replaces in place (SIGHUP: a new
/// token, CA or client certificate for every later call).
#[derive(Clone)]
pub struct VmaClient {
    timeout: Duration,
    current: Arc<RwLock<Current>>,
}

#[derive(Clone)]
struct Current {
    http: reqwest::Client,
    token: Option<String>,
    https: bool,
}

impl std::fmt::Debug for VmaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current();
        f.debug_struct("VmaClient")
            .field("token", &current.token.as_ref().map(|_| "<redacted>"))
            .field("https", &current.https)
            .finish()
    }
}

fn build(
    timeout: Duration,
    token: Option<String>,
    tls: &ClientTlsFiles,
) -> Result<Current, TlsError> {
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout);
    let http = tls
        .apply(builder)?
        .build()
        .map_err(|source| TlsError::Client {
            path: tls.ca.clone().unwrap_or_default(),
            source,
        })?;
    Ok(Current {
        http,
        token,
        https: tls.can_verify_servers(),
    })
}

impl VmaClient {
    /// A client with the given per-request timeout and optional bearer token, for `http://`
    /// VMAs only.
    pub fn new(timeout: Duration, token: Option<String>) -> Self {
        Self::with_tls(timeout, token, &ClientTlsFiles::default())
            .expect("a client without TLS files reads no file")
    }

    /// A client that also calls `https://` VMAs, trusting `tls.ca` only and presenting the
    /// client certificate when one is given.
    pub fn with_tls(
        timeout: Duration,
        token: Option<String>,
        tls: &ClientTlsFiles,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            timeout,
            current: Arc::new(RwLock::new(build(timeout, token, tls)?)),
        })
    }

    /// Replaces the token and TLS settings for every later call. On error nothing changes.
    pub fn reload(&self, token: Option<String>, tls: &ClientTlsFiles) -> Result<(), TlsError> {
        let next = build(self.timeout, token, tls)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// Whether `https://` VMAs can be called (a CA to verify them is configured).
    pub fn speaks_https(&self) -> bool {
        self.current().https
    }

    fn current(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn get(&self, url: String) -> reqwest::RequestBuilder {
        let current = self.current();
        authorized(current.http.get(url), current.token)
    }

    fn post(&self, url: String) -> reqwest::RequestBuilder {
        let current = self.current();
        authorized(current.http.post(url), current.token)
    }

    async fn error_detail(response: reqwest::Response) -> VmaError {
        let status = response.status().as_u16();
        let detail = match response.json::<ErrorBody>().await {
            Ok(body) => format!("{}: {}", body.error, body.message),
            Err(_) => "no error body".into(),
        };
        VmaError::Status { status, detail }
    }

    /// `GET {vma}/api/v1/jobs/{job_id}`, reduced to what recovery decides on.
    pub async fn job_status(&self, base_url: &str, job_id: &str) -> VmaAnswer {
        let url = format!("{}/api/v1/jobs/{job_id}", base_url.trim_end_matches('/'));
        let response = match self.get(url).send().await {
            Ok(r) => r,
            Err(e) => {
                return VmaAnswer::Unreachable {
                    reason: VmaError::Request(e.without_url()).to_string(),
                };
            }
        };
        match response.status() {
            StatusCode::OK => match response.json::<VmaJobStatus>().await {
                Ok(status) if status.job_id == job_id => VmaAnswer::Known {
                    state: status.state,
                },
                Ok(status) => VmaAnswer::Unreachable {
                    reason: format!("the VMA answered about job {} instead", status.job_id),
                },
                Err(e) => VmaAnswer::Unreachable {
                    reason: format!("the VMA's job status did not parse: {}", e.without_url()),
                },
            },
            // Only the contract's own "unknown_job" body means "never heard of it": a 404 from
            // a proxy or a wrong base URL must not fail a job as lost.
            StatusCode::NOT_FOUND => match response.json::<ErrorBody>().await {
                Ok(body) if body.error == "unknown_job" => VmaAnswer::UnknownJob,
                _ => VmaAnswer::Unreachable {
                    reason: "HTTP 404 without an unknown_job body; check the VMA's base URL".into(),
                },
            },
            _ => VmaAnswer::Unreachable {
                reason: Self::error_detail(response).await.to_string(),
            },
        }
    }

    /// `GET {vma}/api/v1/progress/{job_id}`: `Ok(None)` when the VMA has no progress yet.
    pub async fn progress(
        &self,
        base_url: &str,
        job_id: &str,
    ) -> Result<Option<StoredProgress>, VmaError> {
        let url = format!(
            "{}/api/v1/progress/{job_id}",
            base_url.trim_end_matches('/')
        );
        let response = self.get(url).send().await.map_err(|e| e.without_url())?;
        match response.status() {
            StatusCode::OK => {
                let stored: StoredProgress =
                    response.json().await.map_err(reqwest::Error::without_url)?;
                if stored.job_id.as_str() != job_id {
                    let other = format!("progress of job {} instead", stored.job_id);
                    return Err(VmaError::Contract(other));
                }
                stored
                    .validate()
                    .map_err(|e| VmaError::Contract(e.to_string()))?;
                Ok(Some(stored))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Self::error_detail(response).await),
        }
    }

    /// `GET {vma}/api/v1/progress?since=&epoch=&limit=`: every job whose progress changed
    /// after the cursor. `Ok(None)` when the VMA answers 404 or 405: a watchdog older than the
    /// feed, to be polled job by job. Each job's progress is checked by the caller.
    pub async fn progress_feed(
        &self,
        base_url: &str,
        cursor: Option<(uuid::Uuid, u64)>,
        limit: u32,
    ) -> Result<Option<ProgressFeed>, VmaError> {
        let mut url = format!(
            "{}/api/v1/progress?limit={limit}",
            base_url.trim_end_matches('/')
        );
        if let Some((epoch, since)) = cursor {
            url.push_str(&format!("&since={since}&epoch={epoch}"));
        }
        let response = self.get(url).send().await.map_err(|e| e.without_url())?;
        match response.status() {
            StatusCode::OK => {
                let feed = response.json().await.map_err(reqwest::Error::without_url)?;
                Ok(Some(feed))
            }
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => Ok(None),
            _ => Err(Self::error_detail(response).await),
        }
    }

    /// `POST {vma}/api/v1/jobs/{job_id}/stop`: SIGTERM to the job's running migratekit.
    pub async fn stop_job(&self, base_url: &str, job_id: &str) -> StopAnswer {
        let url = format!(
            "{}/api/v1/jobs/{job_id}/stop",
            base_url.trim_end_matches('/')
        );
        let response = match self.post(url).send().await {
            Ok(r) => r,
            Err(e) => {
                return StopAnswer::Failed {
                    reason: VmaError::Request(e.without_url()).to_string(),
                };
            }
        };
        match response.status() {
            StatusCode::ACCEPTED => StopAnswer::Stopping,
            StatusCode::CONFLICT | StatusCode::NOT_FOUND => {
                match response.json::<ErrorBody>().await {
                    Ok(b) if b.error == "not_running" || b.error == "unknown_job" => {
                        StopAnswer::NotRunning { message: b.message }
                    }
                    Ok(b) => StopAnswer::Failed {
                        reason: format!("{}: {}", b.error, b.message),
                    },
                    Err(_) => StopAnswer::Failed {
                        reason: "no error body; check the VMA's base URL".into(),
                    },
                }
            }
            _ => StopAnswer::Failed {
                reason: Self::error_detail(response).await.to_string(),
            },
        }
    }

    /// `POST {vma}/api/v1/jobs/{job_id}/start` with the job's parameters (never a command
    /// line: the VMA fills its own template with them).
    pub async fn start_job(
        &self,
        base_url: &str,
        job_id: &str,
        params: &StartJobRequest,
    ) -> StartAnswer {
        let url = format!(
            "{}/api/v1/jobs/{job_id}/start",
            base_url.trim_end_matches('/')
        );
        let response = match self.post(url).json(params).send().await {
            Ok(r) => r,
            Err(e) => {
                return StartAnswer::Unreachable {
                    reason: VmaError::Request(e.without_url()).to_string(),
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return match response.json::<VmaJobStatus>().await {
                Ok(answer) if answer.job_id == job_id => StartAnswer::Started {
                    state: answer.state,
                },
                Ok(answer) => StartAnswer::Unreachable {
                    reason: format!("the VMA answered about job {} instead", answer.job_id),
                },
                Err(e) => StartAnswer::Unreachable {
                    reason: format!("the VMA's start answer did not parse: {}", e.without_url()),
                },
            };
        }
        let body = response.json::<ErrorBody>().await.ok();
        let (error, message) = body
            .map(|b| (b.error, b.message))
            .unwrap_or_else(|| ("no_error_body".into(), "no error body".into()));
        match status {
            StatusCode::CONFLICT if error == "job_running" => {
                StartAnswer::AlreadyRunning { message }
            }
            // A 4xx is the VMA's considered refusal: nothing was started. A 5xx (or a proxy's
            // error page) leaves it open whether the process runs, so it counts as no answer.
            s if s.is_client_error() => StartAnswer::Refused {
                status: s.as_u16(),
                error,
                message,
            },
            s => StartAnswer::Unreachable {
                reason: format!("the VMA answered HTTP {}: {error}: {message}", s.as_u16()),
            },
        }
    }
}

/// What a VMA answered to a stop request (for the audit trail of a cancelled job).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum StopAnswer {
    /// 202: SIGTERM was sent to the job's running process.
    Stopping,
    /// 409 `not_running` or 404 `unknown_job`: no process of the job runs there.
    NotRunning {
        /// The VMA's message.
        message: String,
    },
    /// Anything else: the process may still run.
    Failed {
        /// What went wrong.
        reason: String,
    },
}

/// What a VMA answered to a start request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum StartAnswer {
    /// 201: the process was launched and registered (it may already have exited).
    Started {
        /// Its state, with the process identity.
        state: JobProcessState,
    },
    /// 409 `job_running`: a process already runs this job on the VMA.
    AlreadyRunning {
        /// The VMA's message (names the pid).
        message: String,
    },
    /// Any other 4xx: the VMA refused and started nothing.
    Refused {
        /// HTTP status.
        status: u16,
        /// The VMA's error code (`invalid_parameters`, `invalid_job_id`, `unauthorized`, ...).
        error: String,
        /// The VMA's message.
        message: String,
    },
    /// No usable answer (connection refused, timeout, 5xx): the process may or may not run.
    Unreachable {
        /// What went wrong.
        reason: String,
    },
}
