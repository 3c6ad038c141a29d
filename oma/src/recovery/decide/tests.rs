//! The decision table, one test per row, with no database: each builds the job as read and
//! the VMA's answer, and checks the whole decision.

use super::*;
use crate::job::testing::{NOW, exit, proc, progress, record, running};
use crate::model::from_ms;
use api::{Detector, ExitStatus, FoundBy, ProgressStatus};

/// The stale threshold of these tests: 10 minutes.
const STALE: i64 = 600_000;

fn running_answer(process: ProcessIdentity) -> VmaAnswer {
    VmaAnswer::Known {
        state: JobProcessState::Running {
            process,
            since: from_ms(NOW - 50_000),
            found_by: FoundBy::Started,
        },
    }
}

fn exited_answer(process: ProcessIdentity, exit: ExitStatus) -> VmaAnswer {
    VmaAnswer::Known {
        state: JobProcessState::Exited {
            process,
            exit,
            exited_at: from_ms(NOW - 1_000),
            detector: Detector::Ebpf,
        },
    }
}

fn unreachable() -> VmaAnswer {
    VmaAnswer::Unreachable {
        reason: "connection refused".into(),
    }
}

/// What a decision does, in one comparable value.
type Outcome = (
    Action,
    JobStatus,
    Option<FailureClass>,
    Option<ProcessIdentity>,
);

/// The outcome of a finalize to `failed` with `class`.
fn finalized_as(class: FailureClass) -> Outcome {
    (Action::Finalize, JobStatus::Failed, Some(class), None)
}

/// The outcome of a keep that records `process` as the job's (replicating) attempt.
fn keeps_recording(process: ProcessIdentity) -> Outcome {
    (Action::Keep, JobStatus::Replicating, None, Some(process))
}

fn outcome(d: &Decision) -> Outcome {
    (d.action, d.to_status, d.failure_class, d.adopt)
}

#[test]
fn running_and_recorded_keeps_the_job_as_it_is() {
    let rec = running(JobStatus::Replicating, proc(10, 100));
    let d = decide(&rec, &running_answer(proc(10, 100)), None, NOW, STALE);
    assert_eq!(
        outcome(&d),
        (Action::Keep, JobStatus::Replicating, None, None)
    );
    assert_eq!(d.message, None);
}

#[test]
fn running_as_a_newer_process_keeps_the_job_and_records_the_process() {
    let rec = running(JobStatus::Replicating, proc(10, 100));
    let d = decide(&rec, &running_answer(proc(11, 200)), None, NOW, STALE);
    assert_eq!(outcome(&d), keeps_recording(proc(11, 200)));
}

#[test]
fn running_for_a_pending_job_records_the_process_and_starts_replicating() {
    for status in [JobStatus::Pending, JobStatus::Initializing] {
        let d = decide(
            &record(status),
            &running_answer(proc(11, 200)),
            None,
            NOW,
            STALE,
        );
        assert_eq!(outcome(&d), keeps_recording(proc(11, 200)), "{status}");
    }
}

#[test]
fn exited_as_the_recorded_process_finalizes_from_the_exit() {
    let rec = running(JobStatus::Replicating, proc(10, 100));
    let table = [
        (exit(0), JobStatus::Completed, None),
        (
            exit(3 << 8),
            JobStatus::Failed,
            Some(FailureClass::ProcessExited),
        ),
        (
            exit(9),
            JobStatus::Failed,
            Some(FailureClass::ProcessKilled),
        ),
        (
            ExitStatus::from_wait_status(9, true),
            JobStatus::Failed,
            Some(FailureClass::OomKilled),
        ),
        (
            ExitStatus::default(),
            JobStatus::Failed,
            Some(FailureClass::DiedWhileUnwatched),
        ),
    ];
    for (status, to, class) in table {
        let d = decide(
            &rec,
            &exited_answer(proc(10, 100), status),
            None,
            NOW,
            STALE,
        );
        assert_eq!(
            outcome(&d),
            (Action::Finalize, to, class, None),
            "{status:?}"
        );
    }
}

#[test]
fn exited_as_a_newer_process_finalizes_from_its_exit() {
    let rec = running(JobStatus::Replicating, proc(10, 100));
    let d = decide(
        &rec,
        &exited_answer(proc(11, 200), exit(0)),
        None,
        NOW,
        STALE,
    );
    assert_eq!(
        outcome(&d),
        (Action::Finalize, JobStatus::Completed, None, None)
    );
}

#[test]
fn exited_as_an_older_attempt_is_job_lost() {
    let rec = running(JobStatus::Replicating, proc(10, 100));
    let d = decide(&rec, &exited_answer(proc(9, 50), exit(0)), None, NOW, STALE);
    assert_eq!(outcome(&d), finalized_as(FailureClass::JobLost));
    assert!(d.message.unwrap().contains("earlier attempt"));
}

#[test]
fn exited_after_a_newer_failure_report_is_the_reported_failure() {
    let mut rec = running(JobStatus::Replicating, proc(10, 100));
    rec.progress_sequence = Some(4);
    let answer = exited_answer(proc(10, 100), exit(0));
    let failed = progress(5, Some(ProgressStatus::Failed));
    let d = decide(&rec, &answer, Some(&failed), NOW, STALE);
    assert_eq!(outcome(&d), finalized_as(FailureClass::VmaReportedFailure));
    assert_eq!(d.last_progress, Some(failed));
    assert_eq!(d.evidence["vma_last_progress"]["applied"], true);
    // The same report, already applied (not newer): the exit alone decides.
    let old = progress(4, Some(ProgressStatus::Failed));
    let d = decide(&rec, &answer, Some(&old), NOW, STALE);
    assert_eq!(
        outcome(&d),
        (Action::Finalize, JobStatus::Completed, None, None)
    );
    assert_eq!(d.last_progress, None);
    assert_eq!(d.evidence["vma_last_progress"]["applied"], false);
}

#[test]
fn exited_unseen_after_a_completion_report_is_completed_unwatched() {
    let unseen = exited_answer(proc(10, 100), ExitStatus::default());
    // The report the job already holds (polled before the end), or a newer one the VMA kept.
    let mut held = running(JobStatus::Replicating, proc(10, 100));
    held.progress_sequence = Some(5);
    held.progress_status = Some(ProgressStatus::Completed);
    let newer = running(JobStatus::Replicating, proc(10, 100));
    let completed = progress(5, Some(ProgressStatus::Completed));
    for (rec, last) in [(&held, None), (&newer, Some(&completed))] {
        let d = decide(rec, &unseen, last, NOW, STALE);
        assert_eq!(
            outcome(&d),
            (Action::Finalize, JobStatus::Completed, None, None)
        );
        assert_eq!(d.evidence["last_word"]["progress_status"], "completed");
        assert_eq!(d.evidence["last_word"]["progress_sequence"], 5);
        // The real run records it under its own audit action.
        let change = crate::job::on_decision(rec, &d, crate::model::Actor::PeriodicRecovery, NOW)
            .expect("the job ends");
        assert_eq!(change.audit[0].action, crate::job::COMPLETED_UNWATCHED);
        assert_eq!(change.after.job.status, JobStatus::Completed);
    }
    // Still copying when it was last heard from: whether it finished is unknown.
    let copying = progress(5, Some(ProgressStatus::InProgress));
    let d = decide(&newer, &unseen, Some(&copying), NOW, STALE);
    assert_eq!(outcome(&d), finalized_as(FailureClass::DiedWhileUnwatched));
    assert!(d.evidence.get("last_word").is_none());
}

#[test]
fn unknown_to_the_vma_is_job_lost() {
    let rec = running(JobStatus::Replicating, proc(10, 100));
    let d = decide(&rec, &VmaAnswer::UnknownJob, None, NOW, STALE);
    assert_eq!(outcome(&d), finalized_as(FailureClass::JobLost));
    assert!(d.message.unwrap().contains("never heard of this job"));
}

#[test]
fn unreachable_and_silent_below_the_threshold_waits() {
    let mut rec = running(JobStatus::Replicating, proc(10, 100));
    rec.job.last_progress_at = Some(from_ms(NOW - STALE + 1));
    let d = decide(&rec, &unreachable(), None, NOW, STALE);
    assert_eq!(
        outcome(&d),
        (Action::Wait, JobStatus::Replicating, None, None)
    );
    assert_eq!(d.evidence["silent_ms"], STALE - 1);
}

#[test]
fn unreachable_and_silent_for_the_threshold_is_a_timeout() {
    let mut rec = running(JobStatus::Replicating, proc(10, 100));
    rec.job.last_progress_at = Some(from_ms(NOW - STALE));
    let d = decide(&rec, &unreachable(), None, NOW, STALE);
    assert_eq!(
        outcome(&d),
        finalized_as(FailureClass::VmaUnreachableTimeout)
    );
    assert!(d.message.unwrap().contains("600 s"));
}

#[test]
fn silence_counts_from_progress_then_from_the_start_then_from_the_creation() {
    let mut rec = record(JobStatus::Pending);
    let from = |rec: &JobRecord| {
        let d = decide(rec, &unreachable(), None, NOW, STALE);
        (
            d.evidence["silence_from"].clone(),
            d.evidence["silent_ms"].clone(),
        )
    };
    assert_eq!(from(&rec), ("created_at".into(), 60_000.into()));
    rec.job.started_at = Some(from_ms(NOW - 50_000));
    assert_eq!(from(&rec), ("started_at".into(), 50_000.into()));
    rec.job.last_progress_at = Some(from_ms(NOW - 5_000));
    assert_eq!(from(&rec), ("last_progress_at".into(), 5_000.into()));
}
