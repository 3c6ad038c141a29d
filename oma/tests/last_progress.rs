//! A death event's `last_progress` (migratekit's last word, which the poller may never have
//! fetched) decides the verdict and the final figures; an older report moves nothing back.
//! On SQLite and PostgreSQL alike.

mod common;

use api::{ProcessEventKind, ProgressStatus, ProgressUpdate, StoredProgress};
use common::fixtures::{code, event, new_job, setup};
use common::test_dbs;
use common::vma::pid;
use oma::job::on_event;
use oma::job::on_progress;
use oma::model::{FailureClass, JobStatus};
use oma::store::Store;

const TOTAL: u64 = 10_000;

fn progress(job: &str, sequence: u64, bytes: u64, status: ProgressStatus) -> StoredProgress {
    StoredProgress {
        job_id: api::JobId::parse(job).unwrap(),
        update: ProgressUpdate {
            stage: "Transfer".into(),
            status: Some(status),
            bytes_transferred: bytes,
            total_bytes: Some(TOTAL),
            throughput_bps: 100,
            percent: Some(bytes as f64 * 100.0 / TOTAL as f64),
            disk_id: None,
            sync_type: None,
            error_message: (status == ProgressStatus::Failed).then(|| "disk full".into()),
        },
        received_at: chrono::Utc::now(),
        sequence,
    }
}

/// Creates `job` with a started process and the poller's view of progress `sequence` at
/// `bytes` (81 %), as a job looks after its last poll.
async fn polled_job(store: &Store, job: &str, ctx: &str, sequence: u64, bytes: u64) {
    store.create_job(&new_job(job, ctx, "vma-1")).await.unwrap();
    let started = [event(
        job,
        ProcessEventKind::ProcessStarted,
        pid(100, 5000),
        None,
    )];
    store
        .apply_events("vma-1", &started, on_event)
        .await
        .unwrap();
    let polled = progress(job, sequence, bytes, ProgressStatus::InProgress);
    store
        .mutate_job(job, |cur, now| Ok(on_progress(cur, &polled, now, i64::MAX)))
        .await
        .unwrap();
}

async fn exit_with(store: &Store, job: &str, last: StoredProgress) {
    end_with(store, job, ProcessEventKind::ProcessExited, Some(last)).await;
}

/// Reports the end of `job`'s process: an `exit(0)`, or a death while unwatched (no status).
async fn end_with(store: &Store, job: &str, kind: ProcessEventKind, last: Option<StoredProgress>) {
    let exit = (kind == ProcessEventKind::ProcessExited)
        .then(|| code(0))
        .flatten();
    let mut ev = event(job, kind, pid(100, 5000), exit);
    ev.last_progress = last;
    let (_, applied) = store.apply_events("vma-1", &[ev], on_event).await.unwrap();
    assert_eq!(applied, 1);
}

#[tokio::test]
async fn an_unseen_end_after_a_completion_report_is_completed_with_its_evidence() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        // j1: the completion report rides on the death event (the poller never saw it);
        // j2: the poller applied it, and the event carries nothing newer.
        polled_job(&store, "j1", "ctx-1", 7, 8_100).await;
        let done = progress("j1", 9, TOTAL, ProgressStatus::Completed);
        end_with(
            &store,
            "j1",
            ProcessEventKind::DiedWhileUnwatched,
            Some(done),
        )
        .await;
        polled_job(&store, "j2", "ctx-2", 7, 8_100).await;
        let done = progress("j2", 9, TOTAL, ProgressStatus::Completed);
        store
            .mutate_job("j2", |cur, now| Ok(on_progress(cur, &done, now, i64::MAX)))
            .await
            .unwrap();
        end_with(&store, "j2", ProcessEventKind::DiedWhileUnwatched, None).await;
        for (job, ctx) in [("j1", "ctx-1"), ("j2", "ctx-2")] {
            let rec = store.get_job(job).await.unwrap();
            let what = format!("{job} on {}", db.backend);
            assert_eq!(rec.job.status, JobStatus::Completed, "{what}");
            assert_eq!(
                (rec.job.failure_class, rec.job.progress_percent),
                (None, 100.0)
            );
            let audit = store.audit(job).await.unwrap();
            let last = audit.last().unwrap();
            assert_eq!(
                last.action,
                oma::job::COMPLETED_UNWATCHED,
                "{what}: {audit:#?}"
            );
            assert_eq!(last.evidence["last_word"]["progress_status"], "completed");
            assert_eq!(last.evidence["last_word"]["progress_sequence"], 9);
            let context = store.get_context(ctx).await.unwrap();
            assert_eq!(
                context.last_successful_job_id.as_deref(),
                Some(job),
                "{what}"
            );
        }
        // Still copying when last heard from: an unseen end is still a failure.
        polled_job(&store, "j3", "ctx-3", 7, 8_100).await;
        end_with(&store, "j3", ProcessEventKind::DiedWhileUnwatched, None).await;
        let job = store.get_job("j3").await.unwrap().job;
        assert_eq!(job.failure_class, Some(FailureClass::DiedWhileUnwatched));
    }
}

#[tokio::test]
async fn exit_zero_after_a_failed_report_the_poller_missed_is_a_failure() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        polled_job(&store, "j1", "ctx-1", 4, 8_100).await;
        exit_with(
            &store,
            "j1",
            progress("j1", 5, 8_200, ProgressStatus::Failed),
        )
        .await;
        let job = store.get_job("j1").await.unwrap().job;
        assert_eq!(job.status, JobStatus::Failed, "{}", db.backend);
        assert_eq!(
            job.failure_class,
            Some(FailureClass::VmaReportedFailure),
            "{}",
            db.backend
        );
        assert_eq!(job.bytes_transferred, 8_200, "{}", db.backend);
        let audit = store.audit("j1").await.unwrap();
        let last = audit.last().unwrap();
        assert_eq!(
            last.evidence["last_progress"]["applied"], true,
            "{audit:#?}"
        );
        assert_eq!(last.evidence["last_progress"]["sequence"], 5);
    }
}

#[tokio::test]
async fn exit_zero_after_the_final_report_records_completed_with_its_figures() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        polled_job(&store, "j1", "ctx-1", 7, 8_100).await;
        exit_with(
            &store,
            "j1",
            progress("j1", 9, TOTAL, ProgressStatus::Completed),
        )
        .await;
        let rec = store.get_job("j1").await.unwrap();
        let job = rec.job;
        assert_eq!(job.status, JobStatus::Completed, "{}", db.backend);
        assert_eq!(job.failure_class, None);
        assert_eq!(job.progress_percent, 100.0, "{}", db.backend);
        assert_eq!(
            (job.bytes_transferred, job.total_bytes),
            (TOTAL as i64, Some(TOTAL as i64)),
            "{}",
            db.backend
        );
        assert_eq!(rec.progress_sequence, Some(9));
        assert_eq!(rec.progress_status, Some(api::ProgressStatus::Completed));
    }
}

#[tokio::test]
async fn an_older_last_progress_moves_no_figure_back() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        polled_job(&store, "j1", "ctx-1", 7, 8_100).await;
        // Sequence 6 says `failed` at fewer bytes, but the job already holds 7: ignored.
        exit_with(
            &store,
            "j1",
            progress("j1", 6, 5_000, ProgressStatus::Failed),
        )
        .await;
        let rec = store.get_job("j1").await.unwrap();
        assert_eq!(rec.job.status, JobStatus::Completed, "{}", db.backend);
        assert_eq!(rec.job.bytes_transferred, 8_100, "{}", db.backend);
        assert_eq!(rec.job.progress_percent, 81.0, "{}", db.backend);
        assert_eq!(rec.progress_sequence, Some(7), "{}", db.backend);
        let audit = store.audit("j1").await.unwrap();
        assert_eq!(
            audit.last().unwrap().evidence["last_progress"]["applied"],
            false,
            "{audit:#?}"
        );
    }
}

/// Recovery (a death the OMA never received: outbox full, or the event lost with the VMA's
/// disk) takes migratekit's last word from the VMA's progress endpoint, like a death event's.
#[tokio::test]
async fn recovery_of_an_exited_job_fetches_its_last_progress_first() {
    use common::vma::{Answer, StandInVma};
    use oma::recovery::{Recovery, RecoveryConfig, Trigger};
    use std::time::Duration;
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        let store = common::store_with_vmas(&db, &vma.url, &common::dead_url().await).await;
        // j1: the poller saw 81 % in progress; the VMA's newer report says `failed`.
        // j2: the VMA's report is older than the poll: the poll stands.
        polled_job(&store, "j1", "ctx-1", 4, 8_100).await;
        polled_job(&store, "j2", "ctx-2", 7, 8_100).await;
        for job in ["j1", "j2"] {
            let exit = code(0).unwrap();
            vma.set(job, Answer::Exited(pid(100, 5000), exit));
        }
        vma.set_progress("j1", 5, 8_200, Some(ProgressStatus::Failed));
        vma.set_progress("j2", 6, 9_000, Some(ProgressStatus::Completed));
        let recovery = Recovery::new(
            store.clone(),
            oma::vma_client::VmaClient::new(Duration::from_secs(10), None),
            RecoveryConfig {
                interval: Duration::from_secs(60),
                stale_threshold: Duration::from_secs(1800),
                concurrency: 4,
            },
        );
        let report = recovery.run(Trigger::Operator, false).await.unwrap();
        assert_eq!(report.decisions.len(), 2, "{}", db.backend);

        let j1 = store.get_job("j1").await.unwrap();
        assert_eq!(
            (j1.job.status, j1.job.failure_class),
            (JobStatus::Failed, Some(FailureClass::VmaReportedFailure)),
            "{}",
            db.backend
        );
        assert_eq!(j1.job.bytes_transferred, 8_200, "{}", db.backend);
        assert_eq!(j1.progress_sequence, Some(5));
        let audit = store.audit("j1").await.unwrap();
        let last = &audit.last().unwrap().evidence["vma_last_progress"];
        assert_eq!(
            (&last["sequence"], &last["applied"]),
            (&5.into(), &true.into())
        );

        // An exit 0 after an older report: completed, the polled figures unmoved.
        let j2 = store.get_job("j2").await.unwrap();
        assert_eq!(j2.job.status, JobStatus::Completed, "{}", db.backend);
        assert_eq!(j2.job.bytes_transferred, 8_100, "{}", db.backend);
        assert_eq!(j2.progress_sequence, Some(7));
        let audit = store.audit("j2").await.unwrap();
        assert_eq!(
            audit.last().unwrap().evidence["vma_last_progress"]["applied"],
            false
        );
    }
}
