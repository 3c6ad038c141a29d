//! What can go wrong while driving the system; every message says what failed and what to do.

use std::path::PathBuf;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A binary the tests need has not been built.
    #[error(
        "binary {path} not found; build it first: cargo build -p oma -p vma-watchdog -p migratekit-standin"
    )]
    NotBuilt {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file or directory operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// An HTTP request did not complete.
    #[error("{what}: request failed: {source}")]
    Http {
        /// Which request.
        what: String,
        /// Why.
        source: reqwest::Error,
    },
    /// An HTTP request got an unexpected answer.
    #[error("{what}: unexpected HTTP {status}: {body}")]
    Status {
        /// Which request.
        what: String,
        /// The status code.
        status: u16,
        /// The body, for the reader.
        body: String,
    },
    /// A response body did not parse.
    #[error("{what}: response did not parse: {source}")]
    Parse {
        /// Which request.
        what: String,
        /// Why.
        source: serde_json::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: f64,
    },
    /// A helper command (`ip`, ...) failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// Which call.
        what: String,
        /// errno.
        source: std::io::Error,
    },
}

impl HarnessError {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// A timeout.
    pub fn timeout(what: impl Into<String>, secs: f64) -> Self {
        Self::Timeout {
            what: what.into(),
            secs,
        }
    }
}
