//! The REST contract between the VMA (`vma-watchdog`) and the OMA (`oma`, `job-recovery`).
//!
//! Both sides serialize exactly these types, so a field renamed here is renamed on both ends
//! at once. Every struct rejects unknown fields: a peer that sends something we do not
//! understand gets a 400 that names the field instead of having it silently dropped.

pub mod bounds;
pub mod job_id;
pub mod launch;
pub mod process;
pub mod progress;

pub use bounds::FieldError;
pub use job_id::{JobId, JobIdError};
pub use launch::{StartJobRequest, TrackJobRequest};
pub use process::{
    DeathClass, Detector, EventBatch, EventBatchAck, ExitStatus, FoundBy, JobProcessState,
    ProcessEvent, ProcessEventKind, ProcessIdentity, VmaJobStatus,
};
pub use progress::{ProgressStatus, ProgressUpdate, StoredProgress, SyncType};

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
