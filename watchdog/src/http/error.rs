//! Error responses (always an [`api::ErrorBody`]) and the JSON body extractor that turns bad
//! input into 400 naming the field and oversized bodies into 413.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

/// Everything the API answers besides success. Messages never carry secrets: they are built
/// from our own error types, which name parameters and files, never values.
#[derive(Debug)]
pub enum ApiError {
    /// 401: missing or wrong token. No detail on purpose.
    Unauthorized,
    /// 403: a progress update from another host.
    NotLoopback,
    /// 403 with a code: a caller on this host that may not make this call.
    Forbidden(&'static str, String),
    /// 400 with a code and a message (which names the offending field).
    BadRequest(&'static str, String),
    /// 404 with a code.
    NotFound(&'static str, String),
    /// 409 with a code.
    Conflict(&'static str, String),
    /// 413.
    TooLarge,
    /// 500: something on the VMA failed; the message says what to check.
    Internal(String),
}

impl ApiError {
    fn parts(self) -> (StatusCode, &'static str, String) {
        match self {
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required".into(),
            ),
            Self::NotLoopback => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "progress updates are accepted only from processes on this VMA".into(),
            ),
            Self::Forbidden(code, message) => (StatusCode::FORBIDDEN, code, message),
            Self::BadRequest(code, message) => (StatusCode::BAD_REQUEST, code, message),
            Self::NotFound(code, message) => (StatusCode::NOT_FOUND, code, message),
            Self::Conflict(code, message) => (StatusCode::CONFLICT, code, message),
            Self::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is larger than this endpoint accepts".into(),
            ),
            Self::Internal(message) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthorized = matches!(self, Self::Unauthorized);
        let (status, error, message) = self.parts();
        let body = api::ErrorBody {
            error: error.to_owned(),
            message,
        };
        let mut response = (status, Json(body)).into_response();
        if unauthorized {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// A JSON body: like `axum::Json`, but any content type is accepted (migratekit's client is
/// not ours to fix), a body over the limit is a 413 and bad JSON a 400 whose message names
/// the field (serde's "missing field `stage`", "unknown field `x`").
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge
                } else {
                    ApiError::BadRequest(
                        "invalid_body",
                        format!("the request body could not be read: {rejection}"),
                    )
                }
            })?;
        if !api::is_json_object(&bytes) {
            return Err(ApiError::BadRequest(
                "invalid_body",
                "invalid JSON body: the body must be a JSON object".into(),
            ));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest("invalid_body", format!("invalid JSON body: {e}")))
    }
}

/// A job id taken from the request path (`{job_id}`), checked by [`api::JobId`]'s one rule:
/// an id that breaks it is a 400 `invalid_job_id` whose message states the rule (never the
/// text sent), before any handler sees it.
#[derive(Debug)]
pub struct JobPath(pub api::JobId);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| {
                ApiError::BadRequest(
                    "invalid_job_id",
                    format!("the job id in the path could not be read: {rejection}"),
                )
            })?;
        api::JobId::parse(&raw)
            .map(JobPath)
            .map_err(|e| ApiError::BadRequest("invalid_job_id", e.to_string()))
    }
}

/// A query string (`?since=1&limit=10`) of type `T`: a parameter that is not a number, out of
/// its type's range or unknown is a 400 `invalid_query` whose message names it.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| QueryParams(value))
            .map_err(|rejection| {
                ApiError::BadRequest(
                    "invalid_query",
                    format!("invalid query: {}", rejection.body_text()),
                )
            })
    }
}
