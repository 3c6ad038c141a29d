//! `/api/v1/jobs`: create, list, get, audit trail, cancel.

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::model::{Actor, AuditEntry, Job, JobStatus, from_ms};
use crate::store::{AuditDraft, JobChange, JobFilter, NewJob, StoreError};
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /api/v1/jobs/{id}/cancel`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// Why the operator cancels, for the audit trail.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The jobs router (operator endpoints).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", post(create_job).get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/audit", get(job_audit))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
}

/// Records a new job (status `pending`) holding its VM context.
#[utoipa::path(post, path = "/api/v1/jobs", request_body = NewJob, tag = "jobs",
    security(("bearer" = [])),
    responses((status = 201, body = Job), (status = 400, body = api::ErrorBody),
        (status = 409, description = "job id taken or VM context busy", body = api::ErrorBody)))]
pub async fn create_job(
    State(state): State<AppState>,
    ApiJson(new): ApiJson<NewJob>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    if new.vm_context_id.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "field `vm_context_id` must not be empty".into(),
        ));
    }
    if new
        .id
        .as_deref()
        .is_some_and(|id| id.trim().is_empty() || id.contains('/'))
    {
        return Err(ApiError::BadRequest(
            "field `id` must be non-empty and contain no '/'".into(),
        ));
    }
    let rec = state.store.create_job(&new).await?;
    tracing::info!(job_id = %rec.job.id, vma_id = %rec.job.vma_id, "job created");
    Ok((StatusCode::CREATED, Json(rec.job)))
}

/// Lists jobs, newest first, with optional filters.
#[utoipa::path(get, path = "/api/v1/jobs", params(JobFilter), tag = "jobs",
    security(("bearer" = [])),
    responses((status = 200, body = Vec<Job>), (status = 400, body = api::ErrorBody)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<JobFilter>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let jobs = state.store.list_jobs(&filter).await?;
    Ok(Json(jobs.into_iter().map(|r| r.job).collect()))
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = Job), (status = 404, body = api::ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(state.store.get_job(&id).await?.job))
}

/// The job's audit trail, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/audit", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = Vec<AuditEntry>), (status = 404, body = api::ErrorBody)))]
pub async fn job_audit(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    Ok(Json(state.store.audit(&id).await?))
}

/// Cancels an active job and releases its VM context; 409 with the current status when the
/// job is already final.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "Job id")), request_body = CancelRequest,
    responses((status = 200, body = Job), (status = 404, body = api::ErrorBody),
        (status = 409, description = "job already final", body = api::ErrorBody)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<CancelRequest>,
) -> Result<Json<Job>, ApiError> {
    let rec = state
        .store
        .mutate_job(&id, |cur, now| {
            if cur.job.status.is_final() {
                return Err(StoreError::IllegalTransition {
                    job_id: cur.job.id.clone(),
                    status: cur.job.status,
                    why: "a job in a final state cannot be cancelled",
                });
            }
            let mut after = cur.clone();
            after.job.status = JobStatus::Cancelled;
            after.job.completed_at = Some(from_ms(now));
            after.job.updated_at = from_ms(now);
            after.job.stalled_since = None;
            after.job.error_message = request
                .reason
                .clone()
                .or(Some("cancelled by an operator".into()));
            Ok(Some(JobChange {
                audit: vec![AuditDraft {
                    action: "transition",
                    from: Some(cur.job.status),
                    to: JobStatus::Cancelled,
                    actor: Actor::Operator,
                    failure_class: None,
                    evidence: serde_json::json!({ "reason": request.reason }),
                }],
                after,
            }))
        })
        .await?;
    tracing::info!(job_id = %id, "job cancelled by an operator");
    Ok(Json(rec.job))
}
