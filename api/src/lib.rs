//! The REST contract between the VMA (`vma-watchdog`) and the OMA (`oma`, `job-recovery`).
//!
//! Both sides serialize exactly these types, so a field renamed here is renamed on both ends
//! at once. Every struct rejects unknown fields: a peer that sends something we do not
//! understand gets a 400 that names the field instead of having it silently dropped.

pub mod bounds;
pub mod job_id;
pub mod launch;
pub mod openapi;
pub mod process;
pub mod progress;

pub use bounds::FieldError;
pub use job_id::{JobId, JobIdError};
pub use launch::{StartJobRequest, TrackJobRequest};
pub use process::{
    DeathClass, Detector, EventBatch, EventBatchAck, ExitStatus, FoundBy, JobProcessState,
    ProcessEvent, ProcessEventKind, ProcessIdentity, VmaJobStatus,
};
pub use progress::{
    ProgressFeed, ProgressFeedQuery, ProgressStatus, ProgressUpdate, StoredProgress, SyncType,
};

/// JSON body of every error response, on both appliances.
///
/// `error` is a stable machine-readable code (`unknown_job`, `invalid_body`, ...);
/// `message` is one sentence for a human that says what failed and what to do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable error code.
    pub error: String,
    /// Human-readable explanation: what failed and what to do about it.
    pub message: String,
}

/// True when `body` is a JSON object (its first character past white space is `{`). Every
/// request body of both appliances is one, and the documents say so; serde alone would also
/// read a struct from an array (`[]` is a body whose fields all have defaults), so both
/// appliances' body extractors check this first.
pub fn is_json_object(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|&b| b == b'{')
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_an_object_is_a_body() {
        assert!(super::is_json_object(b" \n{\"dry_run\": true}"));
        for body in [&b"[]"[..], b"[true]", b"null", b"", b"  ", b"\"{\""] {
            assert!(!super::is_json_object(body), "{body:?}");
        }
    }
}
