//! `GET /openapi.json`: the watchdog's OpenAPI document, generated from its handlers and the
//! shared `api` types. A copy is committed as `docs/openapi/vma-watchdog.json`
//! (`watchdog/tests/openapi_doc.rs` fails when it is stale; `UPDATE_OPENAPI=1` rewrites it).
//!
//! It is served without a token: it says nothing the public copy does not, and a gateway or a
//! probe can fetch it before it holds a token. Only on the API's listener, not on the plain
//! progress listener.
//!
//! Each route's annotation lists what its handler answers; the answers of the layers in front
//! of the handlers are added here by one rule each (`Contract`): a token route answers 401,
//! a route with a `{job_id}` answers 400 `invalid_job_id`, a route with a query 400
//! `invalid_query`, a route with a body 400 and 413.

use api::openapi::{
    BearerAuth, add_error, add_links, has_query, link, needs_token, operations_mut,
};
use utoipa::openapi::path::ParameterIn;
use utoipa::{Modify, OpenApi};

use super::handlers;

/// The watchdog's API description.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "VMA watchdog", description = "Starts, adopts, watches and stops migratekit \
        processes on a VMA; takes migratekit's progress and serves it to the OMA."),
    paths(
        handlers::health,
        handlers::post_progress, handlers::progress_feed, handlers::get_progress,
        handlers::list_jobs, handlers::get_job,
        handlers::start_job, handlers::track_job, handlers::stop_job,
    ),
    modifiers(&BearerAuth, &Contract, &Links),
)]
pub struct ApiDoc;

/// The document as served and as the committed copy holds it.
pub fn document_json() -> String {
    api::openapi::to_committed_json(&ApiDoc::openapi())
}

/// The document as served.
pub fn document() -> serde_json::Value {
    api::openapi::to_json(&ApiDoc::openapi())
}

/// The answers of `auth::require_token`, `error::JobPath` and `error::JsonBody`.
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
                        "No bearer token, or not this VMA's (`unauthorized`).",
                    );
                }
                let job_path = op
                    .parameters
                    .iter()
                    .flatten()
                    .any(|p| p.name == "job_id" && matches!(p.parameter_in, ParameterIn::Path));
                if job_path {
                    add_error(
                        op,
                        "400",
                        "The job id in the path breaks the rule of job ids (`invalid_job_id`).",
                    );
                }
                if has_query(op) {
                    add_error(
                        op,
                        "400",
                        "A query parameter is not of its type, or unknown (`invalid_query`).",
                    );
                }
                if op.request_body.is_some() {
                    add_error(
                        op,
                        "400",
                        "The body is not a JSON object of this schema; the message names the \
                         field (`invalid_body`).",
                    );
                    add_error(
                        op,
                        "413",
                        "The body is larger than the watchdog accepts (`body_too_large`).",
                    );
                }
            }
        }
        api::openapi::ensure_error_body(openapi);
    }
}

/// From a started or adopted job to the routes that read and stop it.
#[derive(Debug)]
struct Links;

impl Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let to = |target: &str, description: &str| {
            link(target, "job_id", "$request.path.job_id", description)
        };
        let links = [
            ("GetJob", to("get_job", "The job's process state.")),
            ("GetProgress", to("get_progress", "Its latest progress.")),
            ("StopJob", to("stop_job", "Stop its process (SIGTERM).")),
        ];
        add_links(openapi, "/api/v1/jobs/{job_id}/start", &["201"], &links);
        add_links(openapi, "/api/v1/jobs/{job_id}/track", &["200"], &links);
    }
}

#[cfg(test)]
mod tests {
    use super::document;

    #[test]
    fn every_route_is_described_with_the_layers_answers() {
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), 9, "{:?}", paths.keys().collect::<Vec<_>>());
        let mut token_routes = 0;
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let has = |status: &str| op["responses"].get(status).is_some();
                if op.get("security").is_some() {
                    token_routes += 1;
                    assert!(has("401"), "{method} {path}");
                }
                if path.contains("{job_id}") || op.get("requestBody").is_some() {
                    assert!(has("400"), "{method} {path}");
                }
            }
        }
        // All but /health and progress updates (loopback and the job's own process).
        assert_eq!(token_routes, 7);
        let feed = &doc["paths"]["/api/v1/progress"]["get"];
        assert!(feed["responses"].get("400").is_some(), "{feed}");
        let update = &doc["paths"]["/api/v1/progress/{job_id}/update"]["post"];
        assert!(update.get("security").is_none());
        assert!(update["responses"].get("403").is_some());
    }

    #[test]
    fn a_started_job_links_to_its_state_its_progress_and_its_stop() {
        let doc = document();
        let links =
            &doc["paths"]["/api/v1/jobs/{job_id}/start"]["post"]["responses"]["201"]["links"];
        for (name, target) in [
            ("GetJob", "get_job"),
            ("GetProgress", "get_progress"),
            ("StopJob", "stop_job"),
        ] {
            assert_eq!(links[name]["operationId"], target, "{links}");
            assert_eq!(links[name]["parameters"]["job_id"], "$request.path.job_id");
        }
    }
}
