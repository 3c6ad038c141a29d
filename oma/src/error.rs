//! The one HTTP error type: every failure becomes a status and a JSON [`ErrorBody`] whose
//! message says what failed and what to do, without internal detail or secrets.

use crate::recovery::RecoveryError;
use crate::store::StoreError;
use api::ErrorBody;
use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or unknown bearer token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A valid token of the wrong role or VMA.
    #[error("this token may not do that")]
    Forbidden,
    /// The body or query did not parse.
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than the limit.
    #[error("request body too large; send at most {0} bytes")]
    PayloadTooLarge(usize),
    /// An https:// VMA URL, but no CA to verify VMAs with: the request is well formed, the
    /// OMA's configuration cannot serve it.
    #[error(
        "field `base_url` is an https:// URL, but this OMA has no CA to verify VMAs with; \
         start it with --vma-ca (and --vma-client-cert/--vma-client-key if the VMA requires \
         a client certificate), or register the VMA's http:// URL"
    )]
    VmaTlsUnconfigured,
    /// A recovery run is in progress.
    #[error("a recovery run is already in progress; retry when it has finished")]
    RecoveryBusy,
    /// The VMA refused to start a job; the job is recorded as failed.
    #[error(
        "the VMA refused to start job {job_id} ({detail}); the job is failed (start_refused) and \
         its VM context released; fix the parameters or the VMA's configuration and create a new job"
    )]
    StartRefused {
        /// The job.
        job_id: String,
        /// The VMA's answer.
        detail: String,
    },
    /// Something inside the OMA failed; the message says where to look.
    #[error("{0}")]
    Internal(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RecoveryError> for ApiError {
    fn from(e: RecoveryError) -> Self {
        match e {
            RecoveryError::Busy => Self::RecoveryBusy,
            RecoveryError::Store(e) => Self::Store(e),
            e @ RecoveryError::LockLost(_) => Self::Internal(e.to_string()),
        }
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        use StoreError as S;
        let message = self.to_string();
        match self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", message),
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden", message),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_body", message),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message),
            Self::VmaTlsUnconfigured => (StatusCode::CONFLICT, "vma_tls_unconfigured", message),
            Self::RecoveryBusy => (StatusCode::CONFLICT, "recovery_in_progress", message),
            Self::StartRefused { .. } => (StatusCode::BAD_GATEWAY, "start_refused", message),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message),
            Self::Store(e) => match e {
                S::UnknownJob(_) => (StatusCode::NOT_FOUND, "unknown_job", message),
                S::UnknownContext(_) => (StatusCode::NOT_FOUND, "unknown_vm_context", message),
                S::UnknownVma(_) => (StatusCode::NOT_FOUND, "unknown_vma", message),
                S::TokenInUse => (StatusCode::CONFLICT, "token_in_use", message),
                S::JobExists(_) => (StatusCode::CONFLICT, "job_exists", message),
                S::IllegalTransition { .. } => {
                    (StatusCode::CONFLICT, "illegal_transition", message)
                }
                S::ContextBusy { .. } | S::ContextStopping { .. } => {
                    (StatusCode::CONFLICT, "vm_context_busy", message)
                }
                S::ForeignJob { .. } => (StatusCode::FORBIDDEN, "forbidden", message),
                S::Contention(_) => (StatusCode::SERVICE_UNAVAILABLE, "contention", message),
                S::Database(_) | S::Migrate(_) | S::UnsupportedUrl(_) | S::Corrupt { .. } => {
                    // The detail goes to the log; the caller learns only that storage failed.
                    tracing::error!(error = %e, "storage failure while serving a request");
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "storage_unavailable",
                        "the OMA's database failed; retry later and check the OMA's log".into(),
                    )
                }
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, message) = self.parts();
        let body = ErrorBody {
            error: error.into(),
            message,
        };
        (status, Json(body)).into_response()
    }
}

/// A JSON body extractor whose rejections are [`ApiError`]s: 413 over the size limit, 400
/// (naming the offending field, as serde does) for anything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|media| media.trim().to_ascii_lowercase())
            .is_some_and(|media| media == "application/json" || media.ends_with("+json"));
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(crate::BODY_LIMIT)
                } else {
                    ApiError::BadRequest(format!("the request body could not be read: {rejection}"))
                }
            })?;
        if !json_type {
            return Err(ApiError::BadRequest(
                "invalid JSON body: send it with `Content-Type: application/json`".into(),
            ));
        }
        if !api::is_json_object(&bytes) {
            return Err(ApiError::BadRequest(
                "invalid JSON body: the body must be a JSON object".into(),
            ));
        }
        match Json::<T>::from_bytes(&bytes) {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::PayloadTooLarge(crate::BODY_LIMIT);
    }
    ApiError::BadRequest(format!("invalid JSON body: {}", rejection.body_text()))
}

/// Maps a query-string rejection to a 400 that names the parameter.
pub fn query_rejection(rejection: &QueryRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid query: {}", rejection.body_text()))
}

/// A query-string extractor whose rejection is a 400 naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(&rejection)),
        }
    }
}
