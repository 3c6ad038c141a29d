//! How a job ends, given how its process ended: one verdict for every path that reports an
//! exit (a death event, recovery's question, the start request's answer).

use super::{adopt, apply_progress, finalize, is_newer, reported_failure};
use crate::model::{FailureClass, JobStatus};
use crate::store::JobRecord;
use api::{DeathClass, ExitStatus, ProcessIdentity, StoredProgress};

/// How a job ends, given how its process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `completed` or `failed`.
    pub status: JobStatus,
    /// Set for `failed`.
    pub class: Option<FailureClass>,
    /// One sentence for the operator.
    pub message: Option<String>,
}

impl Verdict {
    /// A failure of `class`.
    pub fn failed(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            status: JobStatus::Failed,
            class: Some(class),
            message: Some(message.into()),
        }
    }

    fn completed() -> Self {
        Self {
            status: JobStatus::Completed,
            class: None,
            message: None,
        }
    }
}

/// The final state that exit evidence implies. `exit` is `None` (or all unknown) when the
/// process ended unseen. `reported` is migratekit's own failure report, when its last
/// progress said `failed` (the text says why): that is the cause, whatever the exit looks
/// like, so an `exit(0)`, an exit code, a signal (a stop after the report) or an end nobody
/// saw all make the job `vma_reported_failure`, with the report and the exit in the message.
pub fn verdict_from_exit(exit: Option<&ExitStatus>, reported: Option<&str>) -> Verdict {
    let known = exit.filter(|e| !e.is_unknown());
    if let Some(report) = reported {
        let how = known.map_or_else(|| "its exit status is unknown".into(), describe);
        return Verdict::failed(
            FailureClass::VmaReportedFailure,
            format!("{report}; migratekit then ended ({how})"),
        );
    }
    let Some(exit) = known else {
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
    let verdict = verdict_from_exit(exit, reported_failure(&after));
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
        let seen = verdict_from_exit(Some(&ExitStatus::default()), None);
        let unseen = verdict_from_exit(None, None);
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
        let class = |status: u32| verdict_from_exit(Some(&exit(status)), None).class;
        assert_eq!(class(9), Some(FailureClass::ProcessKilled));
        assert_eq!(class(3 << 8), Some(FailureClass::ProcessExited));
        assert_eq!(class(0), None);
        let oom = ExitStatus::from_wait_status(9, true);
        assert_eq!(
            verdict_from_exit(Some(&oom), None).class,
            Some(FailureClass::OomKilled)
        );
    }

    #[test]
    fn a_reported_failure_is_the_cause_however_the_process_ended() {
        let report = "migratekit reported failure: disk full";
        for exit_status in [Some(exit(0)), Some(exit(3 << 8)), Some(exit(15)), None] {
            let v = verdict_from_exit(exit_status.as_ref(), Some(report));
            assert_eq!(v.class, Some(FailureClass::VmaReportedFailure));
            let message = v.message.unwrap();
            assert!(message.starts_with(report), "{message}");
        }
        let v = verdict_from_exit(Some(&exit(15)), Some(report));
        assert!(v.message.unwrap().ends_with("(killed by signal 15)"));
    }

    fn exit(wait_status: u32) -> ExitStatus {
        ExitStatus::from_wait_status(wait_status, false)
    }
}
