//! `POST /api/v1/watchdog/events`: process events from a VMA's watchdog.

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson};
use crate::job::on_event;
use api::{EventBatch, EventBatchAck};
use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Json, Router};

/// The watchdog router (VMA endpoints).
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/watchdog/events", post(post_events))
}

/// Applies a batch of process events, each at most once (by `event_id`), in one transaction.
/// Events about another attempt than the job's current one, or about a job already final,
/// only reach the audit trail. Events about unknown jobs are acknowledged (and logged) so a
/// watchdog's outbox never jams on them. The batch's `vma_id` must be the token's VMA, and
/// every job must belong to it (403 otherwise, nothing applied).
#[utoipa::path(post, path = "/api/v1/watchdog/events", tag = "watchdog",
    security(("bearer" = [])), request_body = EventBatch,
    responses((status = 200, body = EventBatchAck), (status = 400, body = api::ErrorBody),
        (status = 401, body = api::ErrorBody), (status = 403, body = api::ErrorBody),
        (status = 413, body = api::ErrorBody)))]
pub async fn post_events(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(batch): ApiJson<EventBatch>,
) -> Result<Json<EventBatchAck>, ApiError> {
    // Wall clock in microseconds, for the kill-to-commit benchmark's split (its log lines'
    // own timestamps are taken after the fact).
    let entered_us = chrono::Utc::now().timestamp_micros();
    let Principal::Vma(vma_id) = principal else {
        return Err(ApiError::Forbidden);
    };
    if batch.vma_id != vma_id {
        return Err(ApiError::Forbidden);
    }
    let (acknowledged, applied) = state
        .store
        .apply_events(&vma_id, &batch.events, on_event)
        .await?;
    tracing::debug!(target: crate::LATENCY_TARGET, event = "intake_timing",
        first_event_id = batch.events.first().map(|e| e.event_id.to_string()),
        entered_us, "event batch handled");
    tracing::info!(vma_id = %vma_id, events = batch.events.len(), applied, "watchdog events recorded");
    Ok(Json(EventBatchAck {
        acknowledged,
        applied,
    }))
}
