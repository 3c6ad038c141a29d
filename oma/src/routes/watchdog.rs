//! `POST /api/v1/watchdog/events`: process events from a VMA's watchdog.

use crate::AppState;
use crate::auth::Principal;
use crate::error::{ApiError, ApiJson};
use crate::job::on_event;
use api::{EventBatch, EventBatchAck, ProcessEvent};
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
    ApiJson(mut batch): ApiJson<EventBatch>,
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
    check_events(&vma_id, &mut batch.events)?;
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

/// Applies `api::bounds`, the rule the watchdog applies too. A process identity out of range
/// (a start time above `i64::MAX` would be stored as garbage) refuses the batch: 400 naming
/// the field, nothing applied; no real watchdog sends one. A `last_progress` out of range is
/// dropped instead, with a warning, and the death still applied: a watchdog older than the
/// rule may hold such an event in its outbox, and refusing it would jam every later death of
/// that VMA behind it. A long `error_message` is cut, as the watchdog cuts it.
fn check_events(vma_id: &str, events: &mut [ProcessEvent]) -> Result<(), ApiError> {
    for (i, event) in events.iter_mut().enumerate() {
        if let Err(error) = event.process.validate() {
            let error = error.within(&format!("events[{i}].process"));
            tracing::warn!(event = "field_refused", vma_id, job_id = %event.job_id,
                field = error.field(), reason = %error, "refused an event batch with a value out of range");
            return Err(ApiError::BadRequest(error.to_string()));
        }
        let Some(last) = event.last_progress.as_mut() else {
            continue;
        };
        last.update.truncate_error_message();
        if let Err(error) = last.validate() {
            let error = error.within(&format!("events[{i}].last_progress"));
            tracing::warn!(event = "last_progress_ignored", vma_id, job_id = %event.job_id,
                field = error.field(), reason = %error,
                "a death's last progress has a value out of range; the death is applied without it");
            event.last_progress = None;
        }
    }
    Ok(())
}
