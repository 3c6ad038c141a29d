//! `GET /api/v1/openapi.json`: the OpenAPI document, generated from the handlers and types
//! themselves so it cannot drift from the code. A copy is committed as `docs/openapi/oma.json`
//! (`oma/tests/openapi_doc.rs` fails when it is stale; `UPDATE_OPENAPI=1` rewrites it).
//!
//! Each route's own annotation lists what its handler answers (404, 409, 502, ...). The
//! answers of the layers in front of every handler are added here, once, from the same facts
//! the router is built on (`Contract`): a token route answers 401, 403 and 503; a route with
//! a body or a query answers 400 (and 413 for a body). The links from a created job (and a
//! registered VMA) to the routes that read it are added here too.

use crate::AppState;
use api::openapi::{
    BearerAuth, add_error, add_links, has_query, link, needs_token, operations_mut,
};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::link::LinkBuilder;
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
    modifiers(&BearerAuth, &Contract, &Links),
)]
pub struct ApiDoc;

/// The document as the committed copy holds it: pretty JSON with a final newline.
pub fn document_json() -> String {
    api::openapi::to_committed_json(&ApiDoc::openapi())
}

/// The answers of the layers in front of the handlers (`crate::app`, `crate::auth`,
/// `crate::error`), added to every operation they guard.
#[derive(Debug)]
struct Contract;

impl Modify for Contract {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in operations_mut(item) {
                if needs_token(op) {
                    add_error(
                        op,
                        "401",
                        "No bearer token, or an unknown one (`unauthorized`).",
                    );
                    add_error(
                        op,
                        "403",
                        "A token of the other role: a VMA's token on an operator route, or an \
                         operator's on the watchdog route (`forbidden`).",
                    );
                    add_error(
                        op,
                        "503",
                        "The database failed (`storage_unavailable`) or stayed contended \
                         (`contention`); retry later and check the OMA's log.",
                    );
                }
                if op.request_body.is_some() {
                    add_error(
                        op,
                        "400",
                        "The body is not JSON or breaks the schema; the message names the \
                         field (`invalid_body`).",
                    );
                    add_error(
                        op,
                        "413",
                        &format!(
                            "The body is larger than {} bytes (`body_too_large`).",
                            crate::BODY_LIMIT
                        ),
                    );
                }
                if has_query(op) {
                    add_error(
                        op,
                        "400",
                        "A query parameter breaks its schema, or is unknown; the message names \
                         it (`invalid_body`).",
                    );
                }
            }
        }
        api::openapi::ensure_error_body(openapi);
    }
}

/// The links a stateful client (or a fuzzer) follows from what it created to the routes that
/// read or end it.
#[derive(Debug)]
struct Links;

impl Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let job =
            |target: &str, description: &str| link(target, "id", "$response.body#/id", description);
        let by_context = |target: &str, parameter: &str, description: &str| {
            link(
                target,
                parameter,
                "$response.body#/vm_context_id",
                description,
            )
        };
        let created = [
            ("GetJob", job("get_job", "The job just created.")),
            ("GetJobAudit", job("job_audit", "Its audit trail.")),
            ("CancelJob", job("cancel_job", "Cancel it.")),
            (
                "GetVmContext",
                by_context("get_context", "id", "The VM context the job holds."),
            ),
            (
                "ListJobsOfVmContext",
                by_context(
                    "list_jobs",
                    "vm_context_id",
                    "Every job of that VM context.",
                ),
            ),
        ];
        add_links(openapi, "/api/v1/jobs", &["201", "202"], &created);
        let registered = [
            (
                "CreateJobOnVma",
                LinkBuilder::new()
                    .operation_id("create_job")
                    .request_body(Some(serde_json::json!({
                        "vma_id": "$response.body#/id",
                        "start": false,
                    })))
                    .description(
                        "Record a job on the VMA just registered, without starting it: \
                         following the link never makes the OMA call the URL registered.",
                    )
                    .build(),
            ),
            (
                "ListJobsOfVma",
                link(
                    "list_jobs",
                    "vma_id",
                    "$response.body#/id",
                    "Every job of the VMA.",
                ),
            ),
        ];
        add_links(openapi, "/api/v1/vmas/{id}", &["200"], &registered);
    }
}

/// The OpenAPI router (operator endpoint).
pub fn router() -> Router<AppState> {
    Router::new().route(
        "/api/v1/openapi.json",
        get(|| async { Json(api::openapi::to_json(&ApiDoc::openapi())) }),
    )
}

#[cfg(test)]
mod tests {
    use super::ApiDoc;
    use utoipa::OpenApi;

    #[test]
    fn the_document_covers_every_route_and_its_types() {
        let doc = api::openapi::to_json(&ApiDoc::openapi());
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

    #[test]
    fn every_token_route_documents_401_403_and_503_and_every_body_400_and_413() {
        let doc = api::openapi::to_json(&ApiDoc::openapi());
        let mut token_routes = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = &op["responses"];
                if op.get("security").is_some() {
                    token_routes += 1;
                    for status in ["401", "403", "503"] {
                        assert!(
                            responses.get(status).is_some(),
                            "{method} {path} lacks {status}"
                        );
                    }
                }
                if op.get("requestBody").is_some() {
                    for status in ["400", "413"] {
                        assert!(
                            responses.get(status).is_some(),
                            "{method} {path} lacks {status}"
                        );
                    }
                }
            }
        }
        assert_eq!(token_routes, 13, "every route but /health needs a token");
    }

    #[test]
    fn a_created_job_links_to_its_reads_and_its_cancel() {
        let doc = api::openapi::to_json(&ApiDoc::openapi());
        let created = &doc["paths"]["/api/v1/jobs"]["post"]["responses"]["201"]["links"];
        for (link, target) in [
            ("GetJob", "get_job"),
            ("GetJobAudit", "job_audit"),
            ("CancelJob", "cancel_job"),
        ] {
            assert_eq!(created[link]["operationId"], target, "{created}");
            assert_eq!(created[link]["parameters"]["id"], "$response.body#/id");
        }
        // Every link names an operation that exists.
        let ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        for link in created.as_object().unwrap().values() {
            assert!(ids.contains(&link["operationId"].as_str().unwrap()));
        }
    }

    /// The filters were documented as path parameters (utoipa cannot see through `ApiQuery`),
    /// so a client sent them nowhere and a fuzzer found the server accepting what the
    /// document forbade.
    #[test]
    fn list_filters_are_query_parameters_with_the_servers_ranges() {
        let doc = api::openapi::to_json(&ApiDoc::openapi());
        for (path, names) in [
            (
                "/api/v1/jobs",
                &["status", "vma_id", "vm_context_id", "limit", "offset"][..],
            ),
            ("/api/v1/vm-contexts", &["status"][..]),
        ] {
            let params = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
            let found: Vec<&str> = params.iter().map(|p| p["name"].as_str().unwrap()).collect();
            assert_eq!(found, names, "{path}");
            for p in params {
                assert_eq!(p["in"], "query", "{path}: {p}");
            }
        }
        let limit = &doc["paths"]["/api/v1/jobs"]["get"]["parameters"][3]["schema"];
        assert_eq!(limit["minimum"], 1);
        assert_eq!(limit["maximum"], crate::store::JobFilter::MAX_LIMIT);
    }
}
