//! The soak's jobs: how each was started, what the harness did to its process, and the
//! verdict its final state must match, judged from facts read back (as the kill tests do,
//! see [`crate::observed`]), never from a prediction of timing.

use std::time::{Duration, Instant, SystemTime};

use api::ProcessIdentity;
use oma::model::{FailureClass, Job, JobStatus};

use super::schedule::Fate;
use crate::observed::{Downtime, may_be_unwatched};
use crate::system::System;

/// A verdict: final status and failure class.
pub type Verdict = (JobStatus, Option<FailureClass>);

/// The verdict for a death no watchdog saw.
const UNWATCHED: Verdict = (JobStatus::Failed, Some(FailureClass::DiedWhileUnwatched));

/// One job of the soak.
#[derive(Debug)]
pub struct SoakJob {
    /// Job id (`soak-<n>`); its VM context is `ctx-<id>`.
    pub id: String,
    /// How it was told to end.
    pub fate: Fate,
    /// Just before the OMA was asked to create it.
    pub created_at: SystemTime,
    /// Its process, once known (from the OMA's answer or from `/proc`).
    pub process: Option<ProcessIdentity>,
    /// Just before the harness signalled it, and the signal.
    pub killed: Option<(SystemTime, i32)>,
    /// When the harness cancelled it through the OMA.
    pub cancelled: Option<Instant>,
    /// When the harness first saw its process gone.
    pub gone: Option<Instant>,
    /// Its final state was judged (once, when first seen final).
    pub judged: bool,
}

impl SoakJob {
    /// A job just asked for.
    pub fn new(id: String, fate: Fate) -> Self {
        Self {
            id,
            fate,
            created_at: SystemTime::now(),
            process: None,
            killed: None,
            cancelled: None,
            gone: None,
            judged: false,
        }
    }

    /// The VM context the job holds.
    pub fn context(&self) -> String {
        format!("ctx-{}", self.id)
    }

    /// Still to be hit by a `Kill` or `Cancel` of the schedule.
    pub fn runs_until_killed(&self) -> bool {
        self.fate == Fate::UntilKilled && self.killed.is_none() && self.cancelled.is_none()
    }

    /// The stand-in's flags for its fate.
    pub fn standin_args(&self) -> String {
        let secs = |ms: u32| f64::from(ms) / 1000.0;
        match self.fate {
            Fate::UntilKilled => String::new(),
            Fate::Exits { code, after_ms } => {
                format!(
                    "--standin-run-for {:.3} --standin-exit-code {code}",
                    secs(after_ms)
                )
            }
            Fate::Completes { after_ms } => format!("--standin-run-for {:.3}", secs(after_ms)),
            Fate::Segv { after_ms } => {
                format!(
                    "--standin-run-for {:.3} --standin-crash segv",
                    secs(after_ms)
                )
            }
            Fate::Oom { after_ms } => format!(
                "--standin-run-for {:.3} --standin-oom --standin-oom-cap-mib 1024",
                secs(after_ms)
            ),
            Fate::Dissolves { after_ms } => {
                format!("--standin-run-for {:.3} --standin-dissolve", secs(after_ms))
            }
            Fate::WorkerExitGroup { code, after_ms } => format!(
                "--standin-run-for {:.3} --standin-exit-code {code} --standin-end-from-worker",
                secs(after_ms)
            ),
        }
    }

    /// True while its process is known and alive; records the moment it is first seen gone.
    pub fn alive(&mut self) -> bool {
        let alive = self.process.is_some_and(crate::procs::is_alive);
        if !alive && self.process.is_some() && self.gone.is_none() {
            self.gone = Some(Instant::now());
        }
        alive
    }

    /// The verdict a watchdog that saw the end must give; `detector` is the one running
    /// (only eBPF can tell an OOM kill from another SIGKILL).
    fn seen(&self, detector: &str) -> Verdict {
        if self.cancelled.is_some() {
            return (JobStatus::Cancelled, None);
        }
        let failed = |class| (JobStatus::Failed, Some(class));
        if self.killed.is_some() {
            return failed(FailureClass::ProcessKilled);
        }
        match self.fate {
            Fate::UntilKilled | Fate::Segv { .. } => failed(FailureClass::ProcessKilled),
            Fate::Exits { .. } | Fate::WorkerExitGroup { .. } => {
                failed(FailureClass::ProcessExited)
            }
            // Exit status 0 (the leader's) after its 100 % report.
            Fate::Completes { .. } | Fate::Dissolves { .. } => (JobStatus::Completed, None),
            Fate::Oom { .. } if detector == "procfs" => failed(FailureClass::ProcessKilled),
            Fate::Oom { .. } => failed(FailureClass::OomKilled),
        }
    }

    /// The verdicts its final state may rightly have: as seen, or `died_while_unwatched`
    /// when the facts allow that no watchdog saw the end ([`may_be_unwatched`]).
    pub fn allowed(&self, sys: &System, detector: &str, downtimes: &[Downtime]) -> Vec<Verdict> {
        let seen = self.seen(detector);
        if self.cancelled.is_some() {
            return vec![seen];
        }
        // A start the VMA never got (the OMA answered 202, the job stayed pending) launched
        // nothing; recovery then hears `unknown_job` from the VMA and fails the job
        // `job_lost`, by design (oma/src/start.rs). Only a job with no launch log at all, so
        // truly never started, may end so.
        let launch_log = sys
            .watchdog
            .dir()
            .join("jobs")
            .join(format!("{}.log", self.id));
        if !launch_log.exists() {
            return vec![(JobStatus::Failed, Some(FailureClass::JobLost))];
        }
        // When the process ended: the harness's signal, the stand-in's own `ending` line, or,
        // for a crash that writes none, no later than its creation (the loosest bound).
        let ended_from = self
            .killed
            .map(|(at, _)| at)
            .or_else(|| sys.watchdog.standin_end(&self.id).map(|e| e.at))
            .unwrap_or(self.created_at);
        let recorded = sys
            .watchdog
            .deaths_logged(&self.id)
            .iter()
            .any(|e| e == "process_exited");
        // A death the watchdog held in memory on a full or failing disk is lost with that
        // memory when the watchdog is stopped before it could write it (docs/OPERATIONS.md,
        // `storage_degraded`): the restarted one reports it as died while unwatched.
        let held = format!("\"job_id\":\"{}\"", self.id);
        let held_in_memory = sys
            .watchdog
            .log()
            .lines()
            .any(|l| l.contains("\"event_held_in_memory\"") && l.contains(&held));
        if held_in_memory || may_be_unwatched(ended_from, downtimes, recorded) {
            vec![seen, UNWATCHED]
        } else {
            vec![seen]
        }
    }
}

/// Whether `job`'s final state is one of `allowed`.
pub fn verdict_ok(job: &Job, allowed: &[Verdict]) -> bool {
    allowed
        .iter()
        .any(|&(status, class)| job.status == status && job.failure_class == class)
}

/// How long a job may stay active after its process is gone, counted from the later of the
/// death and the moment the system was last made whole (both daemons up, the link up and
/// fast, the database up): the kill tests' patience, far above the measured kill-to-commit
/// latency (milliseconds), so that only a stuck job trips it.
pub const ACTIVE_AFTER_DEATH: Duration = crate::system::PATIENCE;
