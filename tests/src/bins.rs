//! Finding the binaries under test: `oma`, `vma-watchdog`, `migratekit` (stand-in).
//!
//! They are looked for in `$SYSTEM_TESTS_BIN_DIR` when set, else in the profile directory of
//! the cargo target directory this executable was built into (`target/debug/deps/x` for a test,
//! `target/debug/kill-test` for the runner), which is where `cargo build -p ...` puts them.

use std::path::{Path, PathBuf};

use crate::{HarnessError, Result};

/// The profile directory that holds the binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SYSTEM_TESTS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Path of the binary `name`, checked to exist.
pub fn binary(name: &str) -> Result<PathBuf> {
    // Absolute: daemons run in their own temporary directory.
    let path = bin_dir().join(name);
    let path = std::path::absolute(&path).unwrap_or(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::NotBuilt { path })
    }
}

/// The `oma` server.
pub fn oma() -> Result<PathBuf> {
    binary("oma")
}

/// The `vma-watchdog` daemon.
pub fn watchdog() -> Result<PathBuf> {
    binary("vma-watchdog")
}

/// The stand-in `migratekit`.
pub fn migratekit() -> Result<PathBuf> {
    binary("migratekit")
}
