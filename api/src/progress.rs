//! Progress: what migratekit's own client posts to the VMA, and what the OMA polls back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `status` field of a progress update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProgressStatus {
    /// Still copying.
    InProgress,
    /// migratekit finished the copy.
    Completed,
    /// migratekit gave up; `error_message` says why.
    Failed,
}

impl ProgressStatus {
    /// The text on the wire and in the OMA's database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// Parses the text [`ProgressStatus::as_str`] gives; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::InProgress, Self::Completed, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// `sync_type` field of a progress update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncType {
    /// First copy of the whole disk.
    Full,
    /// Changed blocks only.
    Incremental,
}

impl SyncType {
    /// The text on the wire and in the OMA's database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }

    /// Parses the text [`SyncType::as_str`] gives; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Full, Self::Incremental]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// Body of `POST /api/v1/progress/{job_id}/update` exactly as migratekit's progress client
/// (OSSEA fork) sends it. Unknown fields are tolerated here, unlike everywhere else: the
/// client is not ours to change, and refusing its update would lose progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProgressUpdate {
    /// Free-form stage name ("Transfer", "Snapshot", ...).
    #[schema(schema_with = crate::bounds::schema::stage)]
    pub stage: String,
    /// Overall status; absent means in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ProgressStatus>,
    /// Bytes copied so far.
    #[serde(deserialize_with = "crate::bounds::whole::deserialize")]
    #[schema(schema_with = crate::bounds::schema::stored_count)]
    pub bytes_transferred: u64,
    /// Bytes to copy in all, when known.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::bounds::whole::option"
    )]
    #[schema(schema_with = crate::bounds::schema::optional_stored_count)]
    pub total_bytes: Option<u64>,
    /// Current throughput in bytes per second.
    #[serde(deserialize_with = "crate::bounds::whole::deserialize")]
    #[schema(schema_with = crate::bounds::schema::stored_count)]
    pub throughput_bps: u64,
    /// Percent done, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::bounds::schema::optional_percent)]
    pub percent: Option<f64>,
    /// Disk being copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::bounds::schema::optional_disk_id)]
    pub disk_id: Option<String>,
    /// Full or incremental copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_type: Option<SyncType>,
    /// Why migratekit failed, with `status = failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// Body of `GET /api/v1/progress/{job_id}` on the watchdog: the latest update and when it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredProgress {
    /// The job.
    pub job_id: crate::JobId,
    /// The latest update, as migratekit sent it.
    pub update: ProgressUpdate,
    /// When the watchdog received it.
    pub received_at: DateTime<Utc>,
    /// Number of updates received for this job so far.
    #[serde(deserialize_with = "crate::bounds::whole::deserialize")]
    #[schema(schema_with = crate::bounds::schema::stored_count)]
    pub sequence: u64,
}

/// Query of `GET /api/v1/progress` on the watchdog: the progress of every job that changed
/// since a cursor, so that the OMA asks each VMA once per poll interval instead of once per job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ProgressFeedQuery {
    /// The `cursor` of the previous answer; absent (or 0) asks for every job's progress.
    #[serde(default)]
    pub since: Option<u64>,
    /// The `epoch` of the previous answer. A cursor is only meaningful within the epoch that
    /// gave it (one watchdog process); another epoch is answered from the beginning.
    #[serde(default)]
    pub epoch: Option<uuid::Uuid>,
    /// At most this many jobs per answer (the watchdog caps it); `more` says when some were left.
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Body of `GET /api/v1/progress` on the watchdog: every job whose progress changed after the
/// query's cursor, oldest change first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressFeed {
    /// This watchdog process's change feed; it changes when the watchdog restarts.
    pub epoch: uuid::Uuid,
    /// The cursor to send as `since` next time: the last change included in `jobs`.
    #[serde(deserialize_with = "crate::bounds::whole::deserialize")]
    #[schema(schema_with = crate::bounds::schema::stored_count)]
    pub cursor: u64,
    /// True when the answer was cut at the limit: ask again at once from `cursor`.
    pub more: bool,
    /// The jobs' latest progress, each at most once.
    pub jobs: Vec<StoredProgress>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_is_the_serde_text() {
        for status in [
            ProgressStatus::InProgress,
            ProgressStatus::Completed,
            ProgressStatus::Failed,
        ] {
            let json = serde_json::to_value(status).unwrap();
            assert_eq!(json.as_str(), Some(status.as_str()));
            assert_eq!(ProgressStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(ProgressStatus::parse("running"), None);
        for sync in [SyncType::Full, SyncType::Incremental] {
            assert_eq!(
                serde_json::to_value(sync).unwrap().as_str(),
                Some(sync.as_str())
            );
        }
    }

    #[test]
    fn accepts_the_minimal_migratekit_body() {
        let body = r#"{"stage":"Transfer","bytes_transferred":10,"throughput_bps":5}"#;
        let update: ProgressUpdate = serde_json::from_str(body).unwrap();
        assert_eq!(update.bytes_transferred, 10);
        assert_eq!(update.status, None);
    }

    #[test]
    fn accepts_the_full_migratekit_body() {
        let body = r#"{"stage":"Transfer","status":"completed","bytes_transferred":100,
            "total_bytes":100,"throughput_bps":5,"percent":100.0,"disk_id":"disk-2000",
            "sync_type":"incremental","error_message":null}"#;
        let update: ProgressUpdate = serde_json::from_str(body).unwrap();
        assert_eq!(update.status, Some(ProgressStatus::Completed));
        assert_eq!(update.sync_type, Some(SyncType::Incremental));
    }
}
