//! The recovery decision table, as one pure function. Orphans, dry runs and real runs all
//! call [`decide`], so a dry run cannot show anything the real run would not do.

use crate::job::{
    Verdict, begin_replicating, end_on_exit, last_progress_evidence, last_word_evidence,
    recorded_identity,
};
use crate::model::{FailureClass, JobStatus};
use crate::store::JobRecord;
use crate::vma_client::VmaAnswer;
use api::{ExitStatus, JobProcessState, ProcessIdentity, StoredProgress};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

/// What recovery does with one active job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The process runs: keep the job (and keep polling it).
    Keep,
    /// The process is known gone (or the VMA silent past the threshold): final state.
    Finalize,
    /// The VMA did not answer, but progress is recent enough: decide next time.
    Wait,
}

impl Action {
    /// The name on the wire and in the metrics: `keep`, `finalize`, `wait`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Finalize => "finalize",
            Self::Wait => "wait",
        }
    }
}

/// One decision with its evidence, as orphans, dry runs and real runs report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The job.
    pub job_id: String,
    /// Its VMA.
    pub vma_id: String,
    /// Its status when examined.
    pub from_status: JobStatus,
    /// What recovery does.
    pub action: Action,
    /// The status after the decision.
    pub to_status: JobStatus,
    /// Failure class, for `finalize` to `failed`.
    pub failure_class: Option<FailureClass>,
    /// One sentence for the operator.
    pub message: Option<String>,
    /// A process to record as the job's current attempt (the VMA reports it running).
    pub adopt: Option<ProcessIdentity>,
    /// What the decision rests on: the VMA's answer, the recorded process, ages, threshold.
    #[schema(value_type = Object)]
    pub evidence: serde_json::Value,
    /// migratekit's last progress, fetched from the VMA for a job whose process has exited,
    /// when it is newer than what the job holds: recorded with the final state (its figures
    /// are in `evidence`).
    #[serde(skip)]
    pub last_progress: Option<StoredProgress>,
    /// How the job's process ended, when the VMA said it exited: the real run ends the job
    /// from it with [`crate::job::end_on_exit`] on the full record, as a death event would.
    #[serde(skip)]
    pub exit: Option<ExitStatus>,
}

/// Decides for one active job, given the VMA's answer, the time and the stale threshold.
///
/// | VMA answer                        | decision                                          |
/// |-----------------------------------|---------------------------------------------------|
/// | running (recorded or newer)       | keep; record the process if it is not the recorded one |
/// | exited (this or a newer attempt)  | final state from the exit evidence                |
/// | exited, status unknown, migratekit's last report `completed` | completed (`completed_unwatched`) |
/// | exited (an older attempt)         | failed `job_lost`: the VMA never saw our attempt  |
/// | 404 unknown_job                   | failed `job_lost`                                 |
/// | unreachable, silent < threshold   | wait                                              |
/// | unreachable, silent >= threshold  | failed `vma_unreachable_timeout`                  |
///
/// Silence is counted from the last progress the OMA saw; only for a job that never sent
/// progress, from when its process was first seen, and only before that from its creation.
///
/// `last` is the VMA's latest progress of the job, fetched for an exited process: when newer
/// than what the job holds, its status is migratekit's last word for the verdict (an
/// `exit(0)` right after a `failed` report is a failure), as it is for a death event.
pub fn decide(
    rec: &JobRecord,
    answer: &VmaAnswer,
    last: Option<&StoredProgress>,
    now_ms: i64,
    stale_ms: i64,
) -> Decision {
    let silent_ms = rec.silence_ms(now_ms);
    let base = Decision::keep(rec, evidence(rec, answer, silent_ms, stale_ms));
    match answer {
        VmaAnswer::Known {
            state: JobProcessState::Running { process, .. },
        } => {
            let adopt = (recorded_identity(rec) != Some(*process)).then_some(*process);
            // Recording a process starts the job replicating (`job::adopt`).
            let mut view = rec.clone();
            if adopt.is_some() {
                begin_replicating(&mut view, now_ms);
            }
            Decision {
                adopt,
                to_status: view.job.status,
                ..base
            }
        }
        VmaAnswer::Known {
            state: JobProcessState::Exited { process, exit, .. },
        } => exited(base, rec, *process, exit, last, now_ms),
        VmaAnswer::UnknownJob => base.finalize(Verdict::failed(
            FailureClass::JobLost,
            "the VMA has never heard of this job; start it again",
        )),
        VmaAnswer::Unreachable { .. } if silent_ms >= stale_ms => base.finalize(Verdict::failed(
            FailureClass::VmaUnreachableTimeout,
            format!(
                "the VMA did not answer and no progress came for {} s (threshold {} s)",
                silent_ms / 1000,
                stale_ms / 1000
            ),
        )),
        VmaAnswer::Unreachable { .. } => Decision {
            action: Action::Wait,
            ..base
        },
    }
}

/// The rows for an exited process: an older attempt than the recorded one means ours was
/// never seen (`job_lost`); otherwise the job ends as a death event would end it
/// ([`end_on_exit`], with migratekit's last progress when newer).
fn exited(
    base: Decision,
    rec: &JobRecord,
    process: ProcessIdentity,
    exit: &ExitStatus,
    last: Option<&StoredProgress>,
    now_ms: i64,
) -> Decision {
    let recorded = recorded_identity(rec);
    if recorded.is_some_and(|r| r != process && process.start_time < r.start_time) {
        return base.finalize(Verdict::failed(
            FailureClass::JobLost,
            "the VMA only knows an earlier attempt of this job; the recorded process is gone",
        ));
    }
    let (ended, verdict, applied) = end_on_exit(rec, None, Some(exit), last, now_ms);
    let verdict_is_unwatched_completion = verdict.is_unwatched_completion();
    let mut decision = base.finalize(verdict);
    if let Some(p) = last {
        decision.evidence["vma_last_progress"] = last_progress_evidence(p, applied);
    }
    if verdict_is_unwatched_completion {
        decision.evidence["last_word"] = last_word_evidence(&ended);
    }
    decision.last_progress = last.filter(|_| applied).cloned();
    decision.exit = Some(*exit);
    decision
}

/// What every decision about `rec` rests on, for the audit trail and the dry run.
fn evidence(
    rec: &JobRecord,
    answer: &VmaAnswer,
    silent_ms: i64,
    stale_ms: i64,
) -> serde_json::Value {
    let job = &rec.job;
    let silence_from = if job.last_progress_at.is_some() {
        "last_progress_at"
    } else if job.started_at.is_some() {
        "started_at"
    } else {
        "created_at"
    };
    json!({
        "vma_answer": answer,
        "recorded_pid": job.pid,
        "recorded_start_time": job.process_start_time,
        "attempt": job.attempt,
        "last_progress_at": job.last_progress_at,
        "silent_ms": silent_ms,
        "silence_from": silence_from,
        "stale_threshold_ms": stale_ms,
    })
}

impl Decision {
    /// Keep `rec` as it is, on `evidence`.
    fn keep(rec: &JobRecord, evidence: serde_json::Value) -> Self {
        let job = &rec.job;
        Self {
            job_id: job.id.clone(),
            vma_id: job.vma_id.clone(),
            from_status: job.status,
            action: Action::Keep,
            to_status: job.status,
            failure_class: None,
            message: None,
            adopt: None,
            evidence,
            last_progress: None,
            exit: None,
        }
    }

    /// This decision turned into ending the job with `verdict`.
    fn finalize(self, verdict: Verdict) -> Self {
        Self {
            action: Action::Finalize,
            to_status: verdict.status,
            failure_class: verdict.class,
            message: verdict.message,
            ..self
        }
    }
}

#[cfg(test)]
mod tests;
