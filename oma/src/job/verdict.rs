//! How a job ends, given how its process ended: one verdict for every path that reports an
//! exit (a death event, recovery's question, the start request's answer).

use super::{adopt, apply_progress, finalize, is_newer, reported_failure};
use crate::model::{FailureClass, JobStatus};
use crate::store::JobRecord;
use api::{DeathClass, ExitStatus, ProcessIdentity, ProgressStatus, StoredProgress};

/// The audit action of a final transition decided from exit evidence.
pub const TRANSITION: &str = "transition";

/// The audit action of a job that ended unseen after migratekit said it had finished: told
/// apart from [`TRANSITION`] so that an operator (and a query) can find every completion that
/// rests on migratekit's word rather than on an exit status.
pub const COMPLETED_UNWATCHED: &str = "completed_unwatched";

/// migratekit's own last word about the current attempt: the status of its last progress
/// report, when it said it had finished or given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastWord<'a> {
    /// No report, or one that said it was still copying.
    Silent,
    /// Its last report said `completed`: the copy was whole.
    Completed,
    /// Its last report said `failed`; the sentence the job shows says why.
    Failed(&'a str),
}

impl<'a> LastWord<'a> {
    /// The last word `rec` holds (see [`reported_failure`]: a failure report sticks for the
    /// attempt, so it wins over anything later).
    pub fn of(rec: &'a JobRecord) -> Self {
        if let Some(report) = reported_failure(rec) {
            return Self::Failed(report);
        }
        match rec.progress_status {
            Some(ProgressStatus::Completed) => Self::Completed,
            _ => Self::Silent,
        }
    }
}

/// How a job ends, given how its process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `completed` or `failed`.
    pub status: JobStatus,
    /// Set for `failed`.
    pub class: Option<FailureClass>,
    /// One sentence for the operator.
    pub message: Option<String>,
    /// The audit action that records it: [`TRANSITION`], or [`COMPLETED_UNWATCHED`].
    pub action: &'static str,
}

impl Verdict {
    /// A failure of `class`.
    pub fn failed(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            status: JobStatus::Failed,
            class: Some(class),
            message: Some(message.into()),
            action: TRANSITION,
        }
    }

    /// A final state set by an actor other than the process's exit (an operator's cancel).
    pub fn settled(status: JobStatus, message: Option<String>) -> Self {
        Self {
            status,
            class: None,
            message,
            action: TRANSITION,
        }
    }

    fn completed() -> Self {
        Self::settled(JobStatus::Completed, None)
    }

    /// Whether this verdict rests on migratekit's word that it had finished, its exit status
    /// being unknown.
    pub fn is_unwatched_completion(&self) -> bool {
        self.action == COMPLETED_UNWATCHED
    }
}

/// The final state that exit evidence implies. `exit` is `None` (or all unknown) when the
/// process ended unseen. `last` is migratekit's own last word:
/// - a `failed` report is the cause, whatever the exit looks like, so an `exit(0)`, an exit
///   code, a signal (a stop after the report) or an end nobody saw all make the job
///   `vma_reported_failure`, with the report and the exit in the message;
/// - a `completed` report decides an end whose status is unknown: migratekit says
///   `completed` only once the whole disk is copied, so the replication is complete whatever
///   happened to the process afterwards; the job is `completed`, recorded as
///   [`COMPLETED_UNWATCHED`]. A known exit still decides (a crash after the report is a
///   crash: migratekit did not finish its own way, and the operator must see it).
pub fn verdict_from_exit(exit: Option<&ExitStatus>, last: LastWord<'_>) -> Verdict {
    let known = exit.filter(|e| !e.is_unknown());
    if let LastWord::Failed(report) = last {
        let how = known.map_or_else(|| "its exit status is unknown".into(), describe);
        return Verdict::failed(
            FailureClass::VmaReportedFailure,
            format!("{report}; migratekit then ended ({how})"),
        );
    }
    let Some(exit) = known else {
        if last == LastWord::Completed {
            return Verdict {
                action: COMPLETED_UNWATCHED,
                ..Verdict::completed()
            };
        }
        // Same class either way (whether it succeeded is unknown), but the message says which:
        // an end nobody saw, or one the watchdog saw without being able to read its status
        // (its procfs detector on a kernel before 6.15, for a process init reaped first).
        let message = if exit.is_some() {
            "the watchdog saw migratekit end but could not read its exit status; whether the \
             replication finished is unknown: run it again"
        } else {
            "migratekit ended while nothing watched it; its exit status is unknown: run the \
             replication again"
        };
        return Verdict::failed(FailureClass::DiedWhileUnwatched, message);
    };
    match exit.class() {
        DeathClass::OomKilled => Verdict::failed(
            FailureClass::OomKilled,
            format!(
                "migratekit was killed by the kernel's OOM killer (signal {}); give the VMA more memory",
                exit.signal.unwrap_or(9)
            ),
        ),
        DeathClass::Killed => Verdict::failed(
            FailureClass::ProcessKilled,
            format!("migratekit was {}", describe(exit)),
        ),
        // `Unknown` cannot be here (`known` leaves it out); it reads as a failed exit.
        DeathClass::Exited | DeathClass::Unknown if exit.code == Some(0) => Verdict::completed(),
        DeathClass::Exited | DeathClass::Unknown => Verdict::failed(
            FailureClass::ProcessExited,
            format!("migratekit {}", describe(exit)),
        ),
    }
}

/// What a completion decided by migratekit's word ([`COMPLETED_UNWATCHED`]) rests on, for the
/// audit trail: the report that said so (recovery's partial record holds these fields too).
pub fn last_word_evidence(rec: &JobRecord) -> serde_json::Value {
    serde_json::json!({
        "progress_status": rec.progress_status,
        "progress_sequence": rec.progress_sequence,
        "last_progress_at": rec.job.last_progress_at,
        "exit_status": "unknown",
    })
}

/// How a known exit reads in a sentence: "exited with code 3", "killed by signal 9 (core
/// dumped)".
fn describe(exit: &ExitStatus) -> String {
    match exit.signal {
        Some(signal) if exit.oom_killed => format!("killed by the OOM killer (signal {signal})"),
        Some(signal) if exit.core_dumped => format!("killed by signal {signal} (core dumped)"),
        Some(signal) => format!("killed by signal {signal}"),
        None => format!("exited with code {}", exit.code.unwrap_or(-1)),
    }
}

/// Ends the job on its process's exit: migratekit's last progress first (when newer than
/// what the job holds, so the verdict and the final figures use its last word), then the
/// verdict from the exit and that word, then the final state. `process`, when given, is
/// recorded as the attempt that ended (the death event and the start answer name it;
/// recovery's verdict rests on the VMA's answer about the job and records none). Returns the
/// ended job, the verdict, and whether the last progress was applied.
pub fn end_on_exit(
    rec: &JobRecord,
    process: Option<ProcessIdentity>,
    exit: Option<&ExitStatus>,
    last: Option<&StoredProgress>,
    now: i64,
) -> (JobRecord, Verdict, bool) {
    let mut after = rec.clone();
    let newer = last.filter(|p| is_newer(rec, p));
    if let Some(progress) = newer {
        apply_progress(&mut after, progress, now);
    }
    let verdict = verdict_from_exit(exit, LastWord::of(&after));
    if let Some(process) = process {
        adopt(&mut after, process, now);
    }
    (finalize(&after, &verdict, now), verdict, newer.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_status_is_unwatched_and_says_whether_the_end_was_seen() {
        let seen = verdict_from_exit(Some(&ExitStatus::default()), LastWord::Silent);
        let unseen = verdict_from_exit(None, LastWord::Silent);
        for v in [&seen, &unseen] {
            assert_eq!(
                (v.status, v.class),
                (JobStatus::Failed, Some(FailureClass::DiedWhileUnwatched))
            );
        }
        assert!(seen.message.unwrap().contains("saw migratekit end"));
        assert!(unseen.message.unwrap().contains("nothing watched it"));
    }

    #[test]
    fn a_known_status_decides_the_class() {
        let class = |status: u32| verdict_from_exit(Some(&exit(status)), LastWord::Silent).class;
        assert_eq!(class(9), Some(FailureClass::ProcessKilled));
        assert_eq!(class(3 << 8), Some(FailureClass::ProcessExited));
        assert_eq!(class(0), None);
        let oom = ExitStatus::from_wait_status(9, true);
        assert_eq!(
            verdict_from_exit(Some(&oom), LastWord::Silent).class,
            Some(FailureClass::OomKilled)
        );
    }

    #[test]
    fn a_reported_failure_is_the_cause_however_the_process_ended() {
        let report = "migratekit reported failure: disk full";
        for exit_status in [Some(exit(0)), Some(exit(3 << 8)), Some(exit(15)), None] {
            let v = verdict_from_exit(exit_status.as_ref(), LastWord::Failed(report));
            assert_eq!(v.class, Some(FailureClass::VmaReportedFailure));
            let message = v.message.unwrap();
            assert!(message.starts_with(report), "{message}");
        }
        let v = verdict_from_exit(Some(&exit(15)), LastWord::Failed(report));
        assert!(v.message.unwrap().ends_with("(killed by signal 15)"));
    }

    #[test]
    fn a_completion_report_decides_only_an_unknown_status() {
        for unknown in [None, Some(ExitStatus::default())] {
            let v = verdict_from_exit(unknown.as_ref(), LastWord::Completed);
            assert_eq!((v.status, v.class), (JobStatus::Completed, None));
            assert_eq!((v.action, v.message), (COMPLETED_UNWATCHED, None));
        }
        // A death that was seen is a fact: a kill or a crash after the report stays one.
        let v = verdict_from_exit(Some(&exit(9)), LastWord::Completed);
        assert_eq!(v.class, Some(FailureClass::ProcessKilled));
        let v = verdict_from_exit(Some(&exit(0)), LastWord::Completed);
        assert_eq!((v.status, v.action), (JobStatus::Completed, TRANSITION));
    }

    #[test]
    fn the_last_word_is_read_from_the_record() {
        let mut rec = crate::job::testing::record(JobStatus::Replicating);
        assert_eq!(LastWord::of(&rec), LastWord::Silent);
        rec.progress_status = Some(ProgressStatus::InProgress);
        assert_eq!(LastWord::of(&rec), LastWord::Silent);
        rec.progress_status = Some(ProgressStatus::Completed);
        assert_eq!(LastWord::of(&rec), LastWord::Completed);
        rec.progress_status = Some(ProgressStatus::Failed);
        assert!(matches!(LastWord::of(&rec), LastWord::Failed(_)));
    }

    fn exit(wait_status: u32) -> ExitStatus {
        ExitStatus::from_wait_status(wait_status, false)
    }
}
