//! `GET /api/v1/openapi.json`: the OpenAPI document, generated from the handlers and types
//! themselves so it cannot drift from the code.

use crate::AppState;
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The OMA's API description.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "OMA", description = "Replication jobs, VM contexts and evidence-based recovery."),
    paths(
        super::health::health,
        super::jobs::create_job, super::jobs::list_jobs, super::jobs::get_job,
        super::jobs::job_audit, super::jobs::cancel_job,
        super::contexts::list_contexts, super::contexts::get_context,
        super::vmas::register_vma, super::vmas::list_vmas,
        super::watchdog::post_events,
        super::recovery::orphans, super::recovery::run, super::recovery::status,
    ),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme the paths refer to.
#[derive(Debug)]
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI router (operator endpoint).
pub fn router() -> Router<AppState> {
    Router::new().route(
        "/api/v1/openapi.json",
        get(|| async { Json(ApiDoc::openapi()) }),
    )
}

#[cfg(test)]
mod tests {
    use super::ApiDoc;
    use utoipa::OpenApi;

    #[test]
    fn the_document_covers_every_route_and_its_types() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), 13, "{:?}", paths.keys().collect::<Vec<_>>());
        for schema in [
            "Job",
            "AuditEntry",
            "VmContext",
            "EventBatch",
            "EventBatchAck",
            "Decision",
            "RunReport",
            "RecoveryStatus",
            "ErrorBody",
        ] {
            assert!(
                doc["components"]["schemas"].get(schema).is_some(),
                "schema {schema} missing"
            );
        }
        assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
    }
}
