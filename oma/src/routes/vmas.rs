//! `/api/v1/vmas`: the VMAs this OMA knows, and their watchdog tokens (stored hashed).

use crate::AppState;
use crate::auth::hash_token;
use crate::error::{ApiError, ApiJson};
use crate::store::Vma;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `PUT /api/v1/vmas/{id}`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterVma {
    /// Base URL of the VMA's watchdog API.
    pub base_url: String,
    /// The bearer token the VMA's watchdog presents when it posts events. Stored hashed.
    pub token: String,
}

impl std::fmt::Debug for RegisterVma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterVma")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// The VMAs router (operator endpoints).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/vmas", get(list_vmas))
        .route("/api/v1/vmas/{id}", put(register_vma))
}

/// Registers a VMA or replaces its URL and token.
#[utoipa::path(put, path = "/api/v1/vmas/{id}", tag = "vmas", security(("bearer" = [])),
    params(("id" = String, Path, description = "VMA id")), request_body = RegisterVma,
    responses((status = 200, body = Vma), (status = 400, body = api::ErrorBody)))]
pub async fn register_vma(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RegisterVma>,
) -> Result<Json<Vma>, ApiError> {
    if !(body.base_url.starts_with("http://") || body.base_url.starts_with("https://")) {
        return Err(ApiError::BadRequest(
            "field `base_url` must be an http(s) URL".into(),
        ));
    }
    if body.base_url.starts_with("https://") && !state.vma_client.speaks_https() {
        return Err(ApiError::BadRequest(
            "field `base_url` is an https:// URL, but this OMA has no CA to verify VMAs with; \
             start it with --vma-ca (and --vma-client-cert/--vma-client-key if the VMA requires \
             a client certificate), or register the VMA's http:// URL"
                .into(),
        ));
    }
    if body.token.len() < 16 {
        return Err(ApiError::BadRequest(
            "field `token` must be at least 16 characters".into(),
        ));
    }
    state
        .store
        .upsert_vma(&id, &body.base_url, &hash_token(&body.token))
        .await?;
    tracing::info!(vma_id = %id, base_url = %body.base_url, "VMA registered");
    Ok(Json(Vma {
        id,
        base_url: body.base_url,
    }))
}

/// Every registered VMA.
#[utoipa::path(get, path = "/api/v1/vmas", tag = "vmas", security(("bearer" = [])),
    responses((status = 200, body = Vec<Vma>)))]
pub async fn list_vmas(State(state): State<AppState>) -> Result<Json<Vec<Vma>>, ApiError> {
    Ok(Json(state.store.list_vmas().await?))
}
