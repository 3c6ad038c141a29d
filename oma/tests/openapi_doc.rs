//! `docs/openapi/oma.json` is the document the OMA serves at `/api/v1/openapi.json`.

#[test]
fn the_committed_document_is_the_one_the_oma_serves() {
    let generated = oma::routes::openapi::document_json();
    if let Err(stale) = test_support::openapi_copy::check(
        "oma.json",
        &generated,
        "cargo test -p oma --test openapi_doc",
    ) {
        panic!("{stale}");
    }
}
