//! `GET /health`: liveness, and readiness of the database. No token needed.

use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Answer of `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// `ok` when the database answers, `degraded` otherwise.
    pub status: String,
    /// `ok`, or `unavailable` when the database did not answer.
    pub database: String,
    /// Log lines dropped because stdout did not take them (a stuck journal, a full pipe).
    pub log_dropped_lines: u64,
}

/// The health router.
pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

/// 200 when the server and its database are ready; 503 when the database does not answer.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    match state.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(Health {
                status: "ok".into(),
                database: "ok".into(),
                log_dropped_lines: crate::logging::dropped_lines(),
            }),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: "degraded".into(),
                    database: "unavailable".into(),
                    log_dropped_lines: crate::logging::dropped_lines(),
                }),
            )
        }
    }
}
