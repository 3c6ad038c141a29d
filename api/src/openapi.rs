//! Helpers both appliances use to complete their OpenAPI documents: the answers of the layers
//! in front of the handlers (token checks, body extractors) are added to the operations they
//! guard by one rule each, and links join the route that creates something to the routes
//! that read it. Each daemon's document module says which apply.

use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, Response, ResponseBuilder};

/// Every operation of a path item.
pub fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// An error answer with an [`crate::ErrorBody`], unless the route's annotation already
/// describes that status (its description is more precise).
pub fn add_error(operation: &mut Operation, status: &str, description: &str) {
    let body = ContentBuilder::new()
        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
            "ErrorBody",
        ))))
        .build();
    let response: Response = ResponseBuilder::new()
        .description(description)
        .content("application/json", body)
        .build();
    operation
        .responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| RefOr::T(response));
}

/// Adds `links` to the answers `statuses` of every operation of `path`.
pub fn add_links(
    openapi: &mut OpenApi,
    path: &str,
    statuses: &[&str],
    links: &[(&str, utoipa::openapi::link::Link)],
) {
    let Some(item) = openapi.paths.paths.get_mut(path) else {
        return;
    };
    // Only the operation that creates: the POST of a collection, the PUT of an item.
    let Some(op) = item.post.as_mut().or(item.put.as_mut()) else {
        return;
    };
    for status in statuses {
        if let Some(RefOr::T(response)) = op.responses.responses.get_mut(*status) {
            for (name, link) in links {
                response
                    .links
                    .insert((*name).to_owned(), RefOr::T(link.clone()));
            }
        }
    }
}

/// True when the operation declares a security requirement (it needs a token).
pub fn needs_token(operation: &Operation) -> bool {
    operation.security.as_ref().is_some_and(|s| !s.is_empty())
}

/// True when the operation takes a query parameter.
pub fn has_query(operation: &Operation) -> bool {
    operation
        .parameters
        .iter()
        .flatten()
        .any(|p| matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query))
}

/// The document as the committed copies hold it: pretty JSON with a final newline.
pub fn to_committed_json(doc: &OpenApi) -> String {
    let mut text =
        serde_json::to_string_pretty(&to_json(doc)).expect("a JSON value always serializes");
    text.push('\n');
    text
}

/// Makes sure the `ErrorBody` schema the added answers refer to is in the components.
pub fn ensure_error_body(doc: &mut OpenApi) {
    use utoipa::PartialSchema;
    doc.components
        .get_or_insert_with(Default::default)
        .schemas
        .entry("ErrorBody".to_owned())
        .or_insert_with(crate::ErrorBody::schema);
}

/// The document as JSON, with its links' fields under their OpenAPI names: utoipa 5
/// serializes a link's `operationId`, `operationRef` and `requestBody` in snake case, which
/// no OpenAPI tool reads. Every served and committed document goes through here.
pub fn to_json(doc: &OpenApi) -> serde_json::Value {
    let mut value = serde_json::to_value(doc).expect("an OpenAPI document always serializes");
    let responses = value["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else {
            continue;
        };
        for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
            for (snake, camel) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(v) = link.remove(snake) {
                    link.insert(camel.to_owned(), v);
                }
            }
        }
    }
    value
}

/// A link to the operation `target`, filling `parameter` from the runtime expression
/// `expression` (`$response.body#/id`, `$request.path.job_id`).
pub fn link(
    target: &str,
    parameter: &str,
    expression: &str,
    description: &str,
) -> utoipa::openapi::link::Link {
    utoipa::openapi::link::LinkBuilder::new()
        .operation_id(target)
        .parameter(parameter, expression)
        .description(description)
        .build()
}

/// Declares the `bearer` security scheme the token routes of both daemons refer to.
#[derive(Debug)]
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}
