//! `/api/v1/vm-contexts`: get and list VM replication contexts.

use crate::AppState;
use crate::error::{ApiError, ApiQuery};
use crate::model::{ContextStatus, VmContext};
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use serde::Deserialize;
use utoipa::IntoParams;

/// Filters of `GET /api/v1/vm-contexts`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
// `ApiQuery` is not axum's `Query`, so utoipa cannot tell where these go: say it.
#[into_params(parameter_in = Query)]
pub struct ContextFilter {
    /// Only contexts in this status.
    pub status: Option<ContextStatus>,
}

/// The VM contexts router (operator endpoints).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/vm-contexts", get(list_contexts))
        .route("/api/v1/vm-contexts/{id}", get(get_context))
}

/// Lists VM contexts by id (at most 1000).
#[utoipa::path(get, path = "/api/v1/vm-contexts", params(ContextFilter), tag = "vm-contexts",
    security(("bearer" = [])), responses((status = 200, body = Vec<VmContext>)))]
pub async fn list_contexts(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<ContextFilter>,
) -> Result<Json<Vec<VmContext>>, ApiError> {
    Ok(Json(state.store.list_contexts(filter.status).await?))
}

/// One VM context.
#[utoipa::path(get, path = "/api/v1/vm-contexts/{id}", tag = "vm-contexts",
    security(("bearer" = [])), params(("id" = String, Path, description = "Context id")),
    responses((status = 200, body = VmContext),
        (status = 404, description = "No such VM context (`unknown_vm_context`).", body = api::ErrorBody)))]
pub async fn get_context(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<VmContext>, ApiError> {
    Ok(Json(state.store.get_context(&id).await?))
}
