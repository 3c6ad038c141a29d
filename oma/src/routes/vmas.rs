//! `/api/v1/vmas`: the VMAs this OMA knows, and their watchdog tokens (stored hashed).

use crate::AppState;
use crate::auth::{MIN_TOKEN_LEN, hash_token};
use crate::error::{ApiError, ApiJson};
use crate::store::Vma;
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::{ObjectBuilder, Type};

/// The rule of `base_url`, as the document's pattern: an http:// or https:// URL.
const BASE_URL_PATTERN: &str = "^https?://";

/// True when `url` is an http:// or https:// URL: [`BASE_URL_PATTERN`]'s rule.
fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

fn base_url_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(BASE_URL_PATTERN))
        .examples([serde_json::json!("http://vma-1.example:8081")])
}

fn token_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(MIN_TOKEN_LEN))
}

/// Body of `PUT /api/v1/vmas/{id}`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterVma {
    /// Base URL of the VMA's watchdog API: an http:// or https:// URL (https:// needs the
    /// OMA to have a CA for VMAs, `--vma-ca`; 409 otherwise).
    #[schema(schema_with = base_url_schema)]
    pub base_url: String,
    /// The bearer token the VMA's watchdog presents when it posts events, at least 16
    /// characters. Stored hashed.
    #[schema(schema_with = token_schema)]
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
    responses((status = 200, body = Vma),
        (status = 400, description = "The body breaks the schema: `base_url` is not an http(s) URL, `token` is shorter than 16 characters (`invalid_body`).", body = api::ErrorBody),
        (status = 409, description = "`base_url` is an https:// URL but this OMA has no CA to verify VMAs with (`vma_tls_unconfigured`): start it with `--vma-ca`; or another VMA has this token (`token_in_use`).", body = api::ErrorBody)))]
pub async fn register_vma(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RegisterVma>,
) -> Result<Json<Vma>, ApiError> {
    if !is_http_url(&body.base_url) {
        return Err(ApiError::BadRequest(
            "field `base_url` must be an http(s) URL".into(),
        ));
    }
    if body.base_url.starts_with("https://") && !state.vma_client.speaks_https() {
        return Err(ApiError::VmaTlsUnconfigured);
    }
    // Characters, as the document's `minLength` counts them (not bytes).
    if body.token.chars().count() < MIN_TOKEN_LEN {
        return Err(ApiError::BadRequest(format!(
            "field `token` must be at least {MIN_TOKEN_LEN} characters"
        )));
    }
    let stored = state
        .store
        .upsert_vma(&id, &body.base_url, &hash_token(&body.token))
        .await;
    if let Err(crate::store::StoreError::TokenInUse) = &stored {
        tracing::warn!(event = "vma_token_in_use", vma_id = %id,
            "refused to register a VMA with a token another VMA holds");
    }
    stored?;
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
