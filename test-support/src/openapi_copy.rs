//! The committed copies of the OpenAPI documents (`docs/openapi/*.json`): a test of each
//! daemon compares its generated document with its copy, so an API change shows in review as
//! a change of the copy. `UPDATE_OPENAPI=1` rewrites the copy instead.

use std::path::{Path, PathBuf};

/// The environment variable that rewrites the copies.
pub const UPDATE_VAR: &str = "UPDATE_OPENAPI";

/// Where the copy `name` (`oma.json`) lives, from any crate of the workspace.
pub fn copy_path(name: &str) -> PathBuf {
    // test-support sits at the workspace's root, like every crate.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join("openapi")
        .join(name)
}

/// Compares `generated` with the copy `name`: `Ok` when equal (or rewritten, with
/// `UPDATE_OPENAPI=1`), otherwise an error that says how to bring the copy up to date.
pub fn check(name: &str, generated: &str, regenerate: &str) -> Result<(), String> {
    let path = copy_path(name);
    if std::env::var_os(UPDATE_VAR).is_some_and(|v| v == "1") {
        std::fs::write(&path, generated).map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
        return Ok(());
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed == generated {
        return Ok(());
    }
    let first_difference = committed
        .lines()
        .zip(generated.lines())
        .position(|(a, b)| a != b)
        .map_or_else(
            || "one is a prefix of the other".to_owned(),
            |i| format!("first difference at line {}", i + 1),
        );
    Err(format!(
        "docs/openapi/{name} is not the document the code generates ({first_difference}); \
         if the API change is intended, run `{UPDATE_VAR}=1 {regenerate}` and commit the copy"
    ))
}
