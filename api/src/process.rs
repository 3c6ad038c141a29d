//! Process lifecycle: what the watchdog tells the OMA about migratekit processes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Identity of one process: pids are reused, `(pid, start_time)` is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessIdentity {
    /// Thread-group id (the pid as `ps` shows it).
    #[serde(deserialize_with = "crate::bounds::whole::deserialize")]
    #[schema(schema_with = crate::bounds::schema::pid)]
    pub pid: u32,
    /// Start time in clock ticks since boot, as in field 22 of `/proc/<pid>/stat`.
    #[serde(deserialize_with = "crate::bounds::whole::deserialize")]
    #[schema(schema_with = crate::bounds::schema::stored_count)]
    pub start_time: u64,
}

/// How a process ended, decoded from the kernel's wait status.
///
/// `code` is set for a normal exit, `signal` for a death by signal; both are absent when the
/// status could not be known (for example a death while the watchdog was down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code passed to `exit()`, when the process exited normally.
    pub code: Option<i32>,
    /// Number of the signal that killed the process, when it was killed.
    pub signal: Option<i32>,
    /// The kernel wrote (or tried to write) a core dump.
    pub core_dumped: bool,
    /// The kernel's OOM killer chose this process.
    pub oom_killed: bool,
}

impl ExitStatus {
    /// Decodes a raw wait status (`task_struct.exit_code`: `(code << 8) | signal`, `0x80` = core).
    pub fn from_wait_status(raw: u32, oom_killed: bool) -> Self {
        let signal = (raw & 0x7f) as i32;
        if signal == 0 {
            Self {
                code: Some(((raw >> 8) & 0xff) as i32),
                signal: None,
                core_dumped: false,
                oom_killed,
            }
        } else {
            Self {
                code: None,
                signal: Some(signal),
                core_dumped: raw & 0x80 != 0,
                oom_killed,
            }
        }
    }

    /// True when nothing is known about how the process ended.
    pub fn is_unknown(&self) -> bool {
        self.code.is_none() && self.signal.is_none()
    }

    /// True for `exit(0)`.
    pub fn is_success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none()
    }

    /// How the process ended, in the words the OMA's failure classes and both daemons'
    /// metrics use.
    pub fn class(&self) -> DeathClass {
        if self.oom_killed && !self.is_unknown() {
            DeathClass::OomKilled
        } else if self.signal.is_some() {
            DeathClass::Killed
        } else if self.code.is_some() {
            DeathClass::Exited
        } else {
            DeathClass::Unknown
        }
    }
}

/// How a process ended: [`ExitStatus::class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeathClass {
    /// It called `exit()` (with any code, 0 included).
    Exited,
    /// A signal killed it.
    Killed,
    /// The kernel's OOM killer killed it.
    OomKilled,
    /// Nothing is known about how it ended.
    Unknown,
}

impl DeathClass {
    /// The class's name: `process_exited`, `process_killed`, `oom_killed`, `status_unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exited => "process_exited",
            Self::Killed => "process_killed",
            Self::OomKilled => "oom_killed",
            Self::Unknown => "status_unknown",
        }
    }
}

/// Which mechanism saw the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// The eBPF programs on `sched_process_exit` / `sched_process_exec`.
    Ebpf,
    /// The procfs/pidfd fallback.
    Procfs,
    /// Reconciliation of the on-disk registry against `/proc` after a restart.
    Registry,
}

/// What kind of lifecycle event this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProcessEventKind {
    /// A migratekit process was seen starting (or adopted).
    ProcessStarted,
    /// A migratekit process died while watched; `exit` says how.
    ProcessExited,
    /// A registered process was found gone after a watchdog restart; how it ended is unknown.
    DiedWhileUnwatched,
}

/// One event about one migratekit process, as kept in the watchdog's outbox and delivered to
/// the OMA. `event_id` is assigned once, when the event is first written to disk, so that a
/// redelivery carries the same id and the OMA can apply it at most once.
// Not `Eq`: `last_progress` holds a percentage as `f64`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessEvent {
    /// Unique id of this event; stable across redeliveries.
    pub event_id: Uuid,
    /// What happened.
    pub kind: ProcessEventKind,
    /// The replication job the process runs.
    pub job_id: crate::JobId,
    /// The process the event is about.
    pub process: ProcessIdentity,
    /// How it ended (`process_exited` only; unknown fields for `died_while_unwatched`).
    pub exit: Option<ExitStatus>,
    /// When the watchdog observed the event (wall clock of the VMA).
    pub observed_at: DateTime<Utc>,
    /// What saw it.
    pub detector: Detector,
    /// The latest progress migratekit had posted to the watchdog when the death was recorded
    /// (`process_exited` and `died_while_unwatched` only; absent when it never posted, and in
    /// events written before this field existed). The OMA's poller may not have fetched it
    /// (it polls every few seconds), so the OMA applies it, when newer than what the job
    /// holds, before it decides how the job ended: an `exit(0)` right after a `failed` report
    /// is a failure, and a completed job shows its final figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress: Option<crate::StoredProgress>,
}

/// Body of `POST /api/v1/watchdog/events` on the OMA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    /// The VMA that sends the batch; must match the token's VMA.
    pub vma_id: String,
    /// Events in the order they were observed.
    pub events: Vec<ProcessEvent>,
}

/// The OMA's answer to an event batch: every event id it has durably recorded
/// (newly applied or already known). The watchdog drops exactly those from its outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBatchAck {
    /// Event ids now safe to forget.
    pub acknowledged: Vec<Uuid>,
    /// How many of them changed a job (the rest were duplicates or about other attempts).
    pub applied: u32,
}

/// How the watchdog came to know a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    /// Started by the watchdog's own start endpoint.
    Started,
    /// Seen by the exec tracepoint (or the procfs fallback's periodic scan).
    Exec,
    /// Found by the `/proc` scan at watchdog start.
    Scan,
    /// Adopted through the track endpoint.
    Tracked,
}

/// The state of a job's process as the watchdog knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobProcessState {
    /// The process runs.
    Running {
        /// The process.
        process: ProcessIdentity,
        /// When the watchdog first saw it.
        since: DateTime<Utc>,
        /// How it was found.
        found_by: FoundBy,
    },
    /// The process has ended.
    Exited {
        /// The process.
        process: ProcessIdentity,
        /// How it ended (all unknown for a death while the watchdog was down).
        exit: ExitStatus,
        /// When the end was observed.
        exited_at: DateTime<Utc>,
        /// What observed it.
        detector: Detector,
    },
}

/// Body of `GET /api/v1/jobs/{job_id}` on the watchdog (200). An unknown job is a 404 with
/// an [`crate::ErrorBody`] whose `error` is `unknown_job`.
///
/// Unknown fields are tolerated here: serde cannot deny them through `flatten`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaJobStatus {
    /// The job.
    pub job_id: crate::JobId,
    /// Its latest process state.
    #[serde(flatten)]
    pub state: JobProcessState,
}

/// The schema of [`VmaJobStatus`] as the JSON is: one flat object per state, each with the
/// `job_id` beside the state's fields. (The derived schema would be an `allOf` of the `job_id`
/// object and the states' `oneOf`, which says the same but which client generators such as
/// openapi-python-client cannot read.)
impl utoipa::PartialSchema for VmaJobStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::Schema;
        use utoipa::openapi::{Ref, RefOr};
        let mut states = match JobProcessState::schema() {
            RefOr::T(Schema::OneOf(one_of)) => one_of,
            other => return other,
        };
        for state in &mut states.items {
            if let RefOr::T(Schema::Object(object)) = state {
                object.properties.insert(
                    "job_id".to_owned(),
                    RefOr::Ref(Ref::from_schema_name("JobId")),
                );
                object.required.insert(0, "job_id".to_owned());
            }
        }
        states.description = Some(
            "A job and the latest state of its process (`state` says which fields follow). \
             An unknown job is a 404 `unknown_job`."
                .to_owned(),
        );
        Schema::OneOf(states).into()
    }
}

impl ToSchema for VmaJobStatus {
    fn schemas(
        schemas: &mut Vec<(
            String,
            utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
        )>,
    ) {
        use utoipa::PartialSchema;
        schemas.push(("JobId".to_owned(), crate::JobId::schema()));
        <JobProcessState as ToSchema>::schemas(schemas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_decoding_matches_the_kernel_layout() {
        assert_eq!(ExitStatus::from_wait_status(0x9, false).signal, Some(9));
        let term = ExitStatus::from_wait_status(0xf, false);
        assert_eq!(
            (term.code, term.signal, term.core_dumped),
            (None, Some(15), false)
        );
        let exit3 = ExitStatus::from_wait_status(0x300, false);
        assert_eq!((exit3.code, exit3.signal), (Some(3), None));
        let segv = ExitStatus::from_wait_status(0x80 | 11, false);
        assert_eq!((segv.signal, segv.core_dumped), (Some(11), true));
        assert!(ExitStatus::from_wait_status(0, false).is_success());
    }

    #[test]
    fn an_event_written_before_last_progress_existed_still_reads() {
        let line = r#"{"event_id":"0190b6a0-0000-7000-8000-000000000001","kind":"process_exited",
            "job_id":"j1","process":{"pid":1,"start_time":2},
            "exit":{"code":0,"signal":null,"core_dumped":false,"oom_killed":false},
            "observed_at":"2026-01-01T00:00:00Z","detector":"ebpf"}"#;
        let event: ProcessEvent = serde_json::from_str(line).unwrap();
        assert_eq!(event.last_progress, None);
        let json = serde_json::to_value(&event).unwrap();
        assert!(
            json.get("last_progress").is_none(),
            "absent, not null: {json}"
        );
    }

    #[test]
    fn job_status_serializes_with_a_state_tag() {
        let status = VmaJobStatus {
            job_id: crate::JobId::parse("job-1").unwrap(),
            state: JobProcessState::Running {
                process: ProcessIdentity {
                    pid: 42,
                    start_time: 7,
                },
                since: DateTime::from_timestamp(0, 0).unwrap(),
                found_by: FoundBy::Scan,
            },
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "running");
        assert_eq!(json["process"]["pid"], 42);
        let back: VmaJobStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }
}
