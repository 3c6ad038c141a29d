//! `docs/openapi/vma-watchdog.json` is the document the watchdog serves at `/openapi.json`.

#[test]
fn the_committed_document_is_the_one_the_watchdog_serves() {
    let generated = vma_watchdog::http::openapi::document_json();
    if let Err(stale) = test_support::openapi_copy::check(
        "vma-watchdog.json",
        &generated,
        "cargo test -p vma-watchdog --test openapi_doc",
    ) {
        panic!("{stale}");
    }
}
