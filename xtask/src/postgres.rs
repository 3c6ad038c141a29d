//! A throwaway PostgreSQL server for the OMA's store tests.
//!
//! The work is done by `oma/scripts/start-test-postgres.sh` (installs Debian's package when
//! missing, creates a cluster under `target/`, starts it on loopback); this module runs it and
//! hands its URL to the tests.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::paths;

/// Port of the test cluster; far from PostgreSQL's default so a system server is left alone.
const PORT: &str = "55432";

/// Starts (or finds running) the test cluster and returns its URL.
pub fn start_test_server() -> Result<String> {
    let root = paths::workspace_root();
    let dir = root.join("target").join("postgres-test");
    let out = Command::new(root.join("oma/scripts/start-test-postgres.sh"))
        .arg(&dir)
        .arg(PORT)
        .output()
        .context("could not run oma/scripts/start-test-postgres.sh")?;
    if !out.status.success() {
        bail!(
            "starting the test PostgreSQL server failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !url.starts_with("postgres://") {
        bail!("start-test-postgres.sh printed {url:?} instead of a postgres:// URL");
    }
    Ok(url)
}
