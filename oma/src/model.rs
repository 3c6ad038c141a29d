//! The OMA's vocabulary: job and VM context statuses, failure classes, audit actors, and the
//! records the REST API returns. The names are the original platform's, so its operators
//! recognise them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Defines a string-backed enum with `as_str`/`parse`, serde in snake_case and an OpenAPI schema.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored in the database and sent on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the stored text; `None` for anything this version does not know.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Status of a replication job. The first ten are active, the last three final.
    JobStatus {
        /// Recorded, process not seen yet.
        Pending => "pending",
        /// Being prepared.
        Initializing => "initializing",
        /// The migratekit process runs and copies.
        Replicating => "replicating",
        /// Waiting for the next sync.
        ReadyForSync => "ready_for_sync",
        /// Attaching volumes.
        Attaching => "attaching",
        /// Configuring the target.
        Configuring => "configuring",
        /// Provisioning the target.
        Provisioning => "provisioning",
        /// Analyzing the source.
        Analyzing => "analyzing",
        /// Taking a snapshot.
        Snapshotting => "snapshotting",
        /// Finishing up.
        Finalizing => "finalizing",
        /// Finished successfully.
        Completed => "completed",
        /// Finished unsuccessfully; `failure_class` says why.
        Failed => "failed",
        /// Stopped by an operator.
        Cancelled => "cancelled",
    }
);

impl JobStatus {
    /// True for the statuses recovery and the poller care about.
    pub fn is_active(self) -> bool {
        !self.is_final()
    }

    /// True for `completed`, `failed` and `cancelled`: nothing but an operator moves a job out.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

string_enum!(
    /// Status of a VM replication context.
    ContextStatus {
        /// Known, never replicated.
        Discovered => "discovered",
        /// A job runs for this VM.
        Replicating => "replicating",
        /// No job runs; the VM may be failed over or replicated again.
        ReadyForFailover => "ready_for_failover",
        /// Test failover done.
        FailedOverTest => "failed_over_test",
        /// Live failover done.
        FailedOverLive => "failed_over_live",
        /// Migration finished.
        Completed => "completed",
        /// The context itself is broken.
        Failed => "failed",
        /// Needs cleanup by an operator.
        CleanupRequired => "cleanup_required",
    }
);

string_enum!(
    /// Why a job failed, so an operator sees it at a glance.
    FailureClass {
        /// migratekit exited with a non-zero code.
        ProcessExited => "process_exited",
        /// migratekit was killed by a signal.
        ProcessKilled => "process_killed",
        /// The kernel's OOM killer chose migratekit.
        OomKilled => "oom_killed",
        /// Found gone after a watchdog restart; how it ended is unknown.
        DiedWhileUnwatched => "died_while_unwatched",
        /// migratekit itself reported failure.
        VmaReportedFailure => "vma_reported_failure",
        /// The VMA has never heard of the job.
        JobLost => "job_lost",
        /// The VMA did not answer and no progress came for the stale threshold.
        VmaUnreachableTimeout => "vma_unreachable_timeout",
        /// Alive but no progress for too long. Only ever a flag (`stalled_since`), never a failure:
        /// a live process is not failed on age alone.
        Stalled => "stalled",
        /// Failed by startup recovery for a reason not covered above.
        StartupRecovery => "startup_recovery",
        /// The VMA refused to start migratekit (4xx to the start request): nothing ran.
        StartRefused => "start_refused",
    }
);

string_enum!(
    /// Who made a change recorded in the audit trail.
    Actor {
        /// A process event from a VMA's watchdog.
        WatchdogEvent => "watchdog_event",
        /// The recovery pass run when the OMA starts.
        StartupRecovery => "startup_recovery",
        /// The recovery pass run every interval.
        PeriodicRecovery => "periodic_recovery",
        /// The progress poller.
        Poller => "poller",
        /// An operator through the REST API or the CLI.
        Operator => "operator",
    }
);

/// A replication job as the REST API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Job id (also migratekit's `--job-id`).
    pub id: String,
    /// The VM context the job replicates.
    pub vm_context_id: String,
    /// The VMA that runs the job.
    pub vma_id: String,
    /// Current status.
    pub status: JobStatus,
    /// Percent done, from the latest progress.
    pub progress_percent: f64,
    /// Stage named by the latest progress.
    pub current_operation: Option<String>,
    /// Bytes copied so far.
    pub bytes_transferred: i64,
    /// Bytes to copy in all, when known.
    pub total_bytes: Option<i64>,
    /// Throughput in bytes per second.
    pub throughput: i64,
    /// `full` or `incremental`.
    pub sync_type: Option<String>,
    /// When the job was recorded.
    pub created_at: DateTime<Utc>,
    /// When its process was first seen.
    pub started_at: Option<DateTime<Utc>>,
    /// Last change of any field.
    pub updated_at: DateTime<Utc>,
    /// When the OMA last saw new progress (OMA clock).
    pub last_progress_at: Option<DateTime<Utc>>,
    /// Set while bytes have not moved for the stall threshold although the process lives.
    pub stalled_since: Option<DateTime<Utc>>,
    /// When the job reached a final state.
    pub completed_at: Option<DateTime<Utc>>,
    /// Why it failed, in words.
    pub error_message: Option<String>,
    /// Why it failed, as a class.
    pub failure_class: Option<FailureClass>,
    /// Pid of the process running the current attempt.
    pub pid: Option<i64>,
    /// Start time (clock ticks since boot) of that process.
    pub process_start_time: Option<i64>,
    /// Attempt number: increases each time a new process takes the job over. Events about
    /// other processes only reach the audit trail.
    pub attempt: i64,
}

impl Job {
    /// A job `id` of `vm_context_id` on `vma_id`, in `status`, recorded at `created_at`, with
    /// nothing else known yet: no process, no progress, no end.
    pub fn new(
        id: String,
        vm_context_id: String,
        vma_id: String,
        status: JobStatus,
        created_at: DateTime<Utc>,
    ) -> Self {
        Self {
            id,
            vm_context_id,
            vma_id,
            status,
            progress_percent: 0.0,
            current_operation: None,
            bytes_transferred: 0,
            total_bytes: None,
            throughput: 0,
            sync_type: None,
            created_at,
            started_at: None,
            updated_at: created_at,
            last_progress_at: None,
            stalled_since: None,
            completed_at: None,
            error_message: None,
            failure_class: None,
            pid: None,
            process_start_time: None,
            attempt: 0,
        }
    }
}

/// A VM replication context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmContext {
    /// Context id.
    pub context_id: String,
    /// VM name in vCenter.
    pub vm_name: String,
    /// Current status.
    pub current_status: ContextStatus,
    /// The job that holds the context, if any.
    pub current_job_id: Option<String>,
    /// Jobs ever created for the context.
    pub total_jobs_run: i64,
    /// Jobs that completed.
    pub successful_jobs: i64,
    /// Jobs that failed.
    pub failed_jobs: i64,
    /// The latest job that completed.
    pub last_successful_job_id: Option<String>,
    /// When `current_status` last changed.
    pub last_status_change: DateTime<Utc>,
}

/// One entry of a job's append-only audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Entry id (UUID v7, time-ordered).
    pub id: String,
    /// The job.
    pub job_id: String,
    /// When the change was committed.
    pub at: DateTime<Utc>,
    /// Status before (absent for the creation).
    pub from_status: Option<JobStatus>,
    /// Status after (equal to `from_status` for entries that record evidence without a move).
    pub to_status: JobStatus,
    /// Who made it.
    pub actor: Actor,
    /// What the entry records: `created`, `transition`, `process_recorded`, `stale_attempt`,
    /// `ignored_final`, `stalled`, `unstalled`, `failure_reported`, `recovery_keep`,
    /// `recovery_wait`, and for the
    /// start request `started`, `start_refused`, `start_unreachable`, `start_conflict`,
    /// `start_after_final`.
    pub action: String,
    /// The failure class set by this entry, if any.
    pub failure_class: Option<FailureClass>,
    /// The evidence: exit code, signal, VMA answer, ages, thresholds.
    #[schema(value_type = Object)]
    pub evidence: serde_json::Value,
}

/// Converts stored unix milliseconds into a timestamp.
pub fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The current time in unix milliseconds, the unit every timestamp column uses.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}
