//! `/api/v1/recovery`: orphans, runs (real or dry) and status.

use crate::AppState;
use crate::error::{ApiError, ApiJson};
use crate::model::JobStatus;
use crate::poller::PollerHealth;
use crate::recovery::{Action, Decision, RunReport, Trigger};
use crate::store::RecoveryRunRecord;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// Body of `POST /api/v1/recovery/run`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Decide and report, but change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Answer of `GET /api/v1/recovery/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryStatus {
    /// Number of jobs per status.
    pub jobs_by_status: BTreeMap<String, i64>,
    /// Jobs in an active status.
    pub active_jobs: i64,
    /// The latest runs, newest first.
    pub last_runs: Vec<RecoveryRunRecord>,
    /// The poller's health.
    pub poller: PollerHealth,
}

/// The recovery router (operator endpoints).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/recovery/orphans", get(orphans))
        .route("/api/v1/recovery/run", post(run))
        .route("/api/v1/recovery/status", get(status))
}

/// What recovery would change now: every active job whose decision is not `keep`, with its
/// evidence. Changes nothing.
#[utoipa::path(get, path = "/api/v1/recovery/orphans", tag = "recovery",
    security(("bearer" = [])), responses((status = 200, body = Vec<Decision>)))]
pub async fn orphans(State(state): State<AppState>) -> Result<Json<Vec<Decision>>, ApiError> {
    let plan = state.recovery.plan().await?;
    Ok(Json(
        plan.into_iter()
            .map(|(_, d)| d)
            .filter(|d| d.action != Action::Keep)
            .collect(),
    ))
}

/// Runs recovery now; with `dry_run` the same decisions are reported and nothing changes.
/// 409 when a run is already in progress.
#[utoipa::path(post, path = "/api/v1/recovery/run", tag = "recovery", request_body = RunRequest,
    security(("bearer" = [])),
    responses((status = 200, body = RunReport), (status = 409, body = api::ErrorBody)))]
pub async fn run(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RunRequest>,
) -> Result<Json<RunReport>, ApiError> {
    Ok(Json(
        state
            .recovery
            .run(Trigger::Operator, request.dry_run)
            .await?,
    ))
}

/// Counts by status, the latest runs and the poller's health.
#[utoipa::path(get, path = "/api/v1/recovery/status", tag = "recovery",
    security(("bearer" = [])), responses((status = 200, body = RecoveryStatus)))]
pub async fn status(State(state): State<AppState>) -> Result<Json<RecoveryStatus>, ApiError> {
    let counts = state.store.count_by_status().await?;
    let active_jobs = counts
        .iter()
        .filter(|(s, _)| s.is_active())
        .map(|(_, n)| n)
        .sum();
    let jobs_by_status = counts
        .into_iter()
        .map(|(s, n): (JobStatus, i64)| (s.as_str().to_owned(), n))
        .collect();
    Ok(Json(RecoveryStatus {
        jobs_by_status,
        active_jobs,
        last_runs: state.store.recent_runs(10).await?,
        poller: state.poller.health(),
    }))
}
