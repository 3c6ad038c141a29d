//! `/api/v1/jobs`: create, list, get, audit trail, cancel.

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::job;
use crate::model::{AuditEntry, Job};
use crate::start::{self, StartOutcome};
use crate::store::{JobFilter, NewJob};
use api::{JobId, StartJobRequest, SyncType};
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::{ObjectBuilder, Type};

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

/// Body of `POST /api/v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJobRequest {
    /// Job id; generated (UUID v7) when absent. Also migratekit's `--job-id`, so it must be
    /// 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit
    /// (`api::JobId`, the rule of both appliances).
    #[serde(default)]
    #[schema(value_type = Option<JobId>)]
    pub id: Option<String>,
    /// The VM context to replicate; created when it does not exist yet. It must hold a
    /// character that is not white space.
    #[schema(schema_with = context_id_schema)]
    pub vm_context_id: String,
    /// VM name; required when the context is new.
    #[serde(default)]
    pub vm_name: Option<String>,
    /// The registered VMA that runs the job.
    pub vma_id: String,
    /// `full` or `incremental`.
    #[serde(default)]
    pub sync_type: Option<SyncType>,
    /// Ask the VMA to start migratekit now (default). `false` only records the job, for
    /// tests and for migrating jobs whose process already runs (adopt it on the VMA with its
    /// track endpoint; recovery then records the process).
    #[serde(default = "yes")]
    pub start: bool,
    /// Parameters for the VMA's migratekit command template.
    #[serde(default)]
    pub params: StartJobRequest,
}

fn yes() -> bool {
    true
}

/// The characters Rust's `char::is_whitespace` (Unicode's White_Space) calls white space, as
/// ranges: a `vm_context_id` made of them only is refused, so the document's pattern lists
/// them all (a test checks the list against `char::is_whitespace` for every character).
const WHITE_SPACE: &[(char, char)] = &[
    ('\t', '\r'),
    (' ', ' '),
    ('\u{85}', '\u{85}'),
    ('\u{a0}', '\u{a0}'),
    ('\u{1680}', '\u{1680}'),
    ('\u{2000}', '\u{200a}'),
    ('\u{2028}', '\u{2029}'),
    ('\u{202f}', '\u{202f}'),
    ('\u{205f}', '\u{205f}'),
    ('\u{3000}', '\u{3000}'),
];

/// A character that is not white space, as a regular expression (found anywhere in the text).
fn not_white_space_pattern() -> String {
    let escape = |c: char| format!("\\u{:04x}", u32::from(c));
    let ranges: String = WHITE_SPACE
        .iter()
        .map(|&(from, to)| {
            if from == to {
                escape(from)
            } else {
                format!("{}-{}", escape(from), escape(to))
            }
        })
        .collect();
    format!("[^{ranges}]")
}

/// True when `id` holds a character that is not white space: the rule of `vm_context_id`.
pub fn is_context_id(id: &str) -> bool {
    !id.trim().is_empty()
}

/// The schema of `vm_context_id`: [`is_context_id`] as a pattern (found anywhere in the text).
fn context_id_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .pattern(Some(not_white_space_pattern()))
}

impl CreateJobRequest {
    fn new_job(&self, id: String) -> NewJob {
        NewJob {
            id: Some(id),
            vm_context_id: self.vm_context_id.clone(),
            vm_name: self.vm_name.clone(),
            vma_id: self.vma_id.clone(),
            sync_type: self.sync_type.map(|s| s.as_str().to_owned()),
        }
    }
}

/// Records a new job (`pending`, holding its VM context) and, unless `start` is false, asks
/// its VMA to start migratekit and records the answer (see `oma::start` for the transaction
/// shape). 201: recorded (and started: `replicating` with the process identity); 202: the VMA
/// gave no answer, the job stays `pending` and recovery resolves it; 502: the VMA refused,
/// the job is `failed` (`start_refused`) and its VM context released.
#[utoipa::path(post, path = "/api/v1/jobs", request_body = CreateJobRequest, tag = "jobs",
    security(("bearer" = [])),
    responses((status = 201, body = Job), (status = 202, description = "VMA unreachable; job pending", body = Job),
        (status = 400, description = "The body breaks the schema: the message names the field (`invalid_body`).", body = api::ErrorBody),
        (status = 404, description = "The VMA is not registered (`unknown_vma`), or the VM context does not exist and no `vm_name` was given to create it (`unknown_vm_context`).", body = api::ErrorBody),
        (status = 409, description = "The job id is taken (`job_exists`), or the VM context is held by an active job or by a cancelled one whose stop is pending (`vm_context_busy`).", body = api::ErrorBody),
        (status = 500, description = "The start task failed (`internal_error`); the job's audit trail says how far it got.", body = api::ErrorBody),
        (status = 502, description = "The VMA refused to start the job; it is failed (`start_refused`).", body = api::ErrorBody)))]
pub async fn create_job(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateJobRequest>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    if !is_context_id(&request.vm_context_id) {
        return Err(ApiError::BadRequest(
            "field `vm_context_id` must hold a character that is not white space".into(),
        ));
    }
    // One rule for every job, started or not: the id may be started later (`track`, a new
    // attempt) and it reaches the VMA's file and unit names and the logs either way.
    let id = match &request.id {
        Some(id) => JobId::parse(id)
            .map_err(|e| ApiError::BadRequest(format!("field `id`: {e}")))?
            .into_string(),
        None => uuid::Uuid::now_v7().to_string(),
    };
    // Taken before the job exists, so no recovery run can see it before the guard.
    let guard = if request.start {
        Some(state.recovery.start_guard(&id).await?)
    } else {
        None
    };
    let rec = state.store.create_job(&request.new_job(id.clone())).await?;
    tracing::info!(job_id = %rec.job.id, vma_id = %rec.job.vma_id, start = request.start, "job created");
    let Some(guard) = guard else {
        return Ok((StatusCode::CREATED, Json(rec.job)));
    };
    // Its own task: a client hanging up must not cancel the start between the VMA's answer
    // and the transaction that records it.
    let task_state = state.clone();
    let outcome = tokio::spawn(async move {
        let outcome =
            start::start_and_record(&task_state, &id, &request.vma_id, &request.params).await;
        guard.release().await;
        outcome
    })
    .await
    .map_err(|e| {
        ApiError::Internal(format!(
            "the start task failed ({e}); see the job's audit trail"
        ))
    })??;
    Ok(match outcome {
        StartOutcome::Recorded(rec) => {
            tracing::info!(job_id = %rec.job.id, status = %rec.job.status, pid = ?rec.job.pid, "job started on its VMA");
            (StatusCode::CREATED, Json(rec.job))
        }
        StartOutcome::NoAnswer(rec) => {
            tracing::warn!(job_id = %rec.job.id, "the VMA gave no answer to the start request; the job stays pending for recovery");
            (StatusCode::ACCEPTED, Json(rec.job))
        }
        StartOutcome::Refused { job, detail } => {
            tracing::warn!(job_id = %job.job.id, %detail, "the VMA refused to start the job");
            return Err(ApiError::StartRefused {
                job_id: job.job.id,
                detail,
            });
        }
    })
}

/// Lists jobs, newest first, with optional filters.
#[utoipa::path(get, path = "/api/v1/jobs", params(JobFilter), tag = "jobs",
    security(("bearer" = [])),
    responses((status = 200, body = Vec<Job>), (status = 400, body = api::ErrorBody)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<JobFilter>,
) -> Result<Json<Vec<Job>>, ApiError> {
    filter.validate().map_err(ApiError::BadRequest)?;
    let jobs = state.store.list_jobs(&filter).await?;
    Ok(Json(jobs.into_iter().map(|r| r.job).collect()))
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = JobId, Path, description = "Job id")),
    responses((status = 200, body = Job),
        (status = 404, description = "No such job (`unknown_job`).", body = api::ErrorBody)))]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(state.store.get_job(&id).await?.job))
}

/// The job's audit trail, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/audit", tag = "jobs", security(("bearer" = [])),
    params(("id" = JobId, Path, description = "Job id")),
    responses((status = 200, body = Vec<AuditEntry>),
        (status = 404, description = "No such job (`unknown_job`).", body = api::ErrorBody)))]
pub async fn job_audit(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    Ok(Json(state.store.audit(&id).await?))
}

/// Cancels an active job and releases its VM context; 409 with the current status when the
/// job is already final.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = JobId, Path, description = "Job id")), request_body = CancelRequest,
    responses((status = 200, body = Job),
        (status = 404, description = "No such job (`unknown_job`).", body = api::ErrorBody),
        (status = 409, description = "The job is already final (`illegal_transition`); the message gives its status.", body = api::ErrorBody)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<CancelRequest>,
) -> Result<Json<Job>, ApiError> {
    let reason = request.reason.as_deref();
    let rec = state
        .store
        .mutate_job(&id, |cur, now| job::cancel(cur, reason, now).map(Some))
        .await?;
    tracing::info!(job_id = %id, "job cancelled by an operator");
    crate::stop::after_cancel(&state, &rec).await;
    Ok(Json(rec.job))
}

#[cfg(test)]
mod tests {
    use super::{WHITE_SPACE, not_white_space_pattern};

    #[test]
    fn the_white_space_of_the_pattern_is_rusts() {
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let listed = WHITE_SPACE
                .iter()
                .any(|&(from, to)| (from..=to).contains(&c));
            assert_eq!(listed, c.is_whitespace(), "{c:?}");
        }
        assert!(not_white_space_pattern().starts_with("[^\\u0009-\\u000d\\u0020"));
    }
}
