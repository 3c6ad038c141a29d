//! The store test suite, run on SQLite and PostgreSQL alike.

mod common;

use api::{Detector, EventBatch, ExitStatus, ProcessEvent, ProcessEventKind};
use common::vma::pid;
use common::{dead_url, store_with_vmas, test_dbs};
use oma::events::decide_event;
use oma::model::{Actor, ContextStatus, FailureClass, JobStatus};
use oma::store::{JobFilter, NewJob, Store, StoreError};

fn new_job(id: &str, ctx: &str, vma: &str) -> NewJob {
    NewJob {
        id: Some(id.into()),
        vm_context_id: ctx.into(),
        vm_name: Some(format!("vm-{ctx}")),
        vma_id: vma.into(),
        sync_type: Some("full".into()),
    }
}

pub fn event(
    job: &str,
    kind: ProcessEventKind,
    p: api::ProcessIdentity,
    exit: Option<ExitStatus>,
) -> ProcessEvent {
    ProcessEvent {
        event_id: uuid::Uuid::new_v4(),
        kind,
        job_id: job.into(),
        process: p,
        exit,
        observed_at: chrono::Utc::now(),
        detector: Detector::Ebpf,
    }
}

fn code(c: i32) -> Option<ExitStatus> {
    Some(ExitStatus {
        code: Some(c),
        signal: None,
        core_dumped: false,
        oom_killed: false,
    })
}

async fn setup(db: &common::TestDb) -> Store {
    store_with_vmas(db, &dead_url().await, &dead_url().await).await
}

#[tokio::test]
async fn job_creation_takes_the_context_and_a_second_job_is_refused() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        let job = store
            .create_job(&new_job("j1", "ctx-1", "vma-1"))
            .await
            .unwrap();
        assert_eq!(job.job.status, JobStatus::Pending, "{}", db.backend);
        let ctx = store.get_context("ctx-1").await.unwrap();
        assert_eq!(ctx.current_job_id.as_deref(), Some("j1"));
        assert_eq!(ctx.current_status, ContextStatus::Replicating);
        assert_eq!(ctx.total_jobs_run, 1);
        let busy = store
            .create_job(&new_job("j2", "ctx-1", "vma-1"))
            .await
            .unwrap_err();
        assert!(matches!(busy, StoreError::ContextBusy { .. }), "{busy}");
        let dup = store
            .create_job(&new_job("j1", "ctx-2", "vma-1"))
            .await
            .unwrap_err();
        assert!(matches!(dup, StoreError::JobExists(_)), "{dup}");
        let no_vma = store
            .create_job(&new_job("j3", "ctx-3", "vma-9"))
            .await
            .unwrap_err();
        assert!(matches!(no_vma, StoreError::UnknownVma(_)), "{no_vma}");
        assert_eq!(store.audit("j1").await.unwrap().len(), 1);
        // Nothing half-written by the refused creations.
        assert!(store.get_job("j2").await.is_err() && store.get_job("j3").await.is_err());
        assert!(store.get_context("ctx-3").await.is_err());
    }
}

#[tokio::test]
async fn the_same_batch_twice_makes_one_transition() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        store
            .create_job(&new_job("j1", "ctx-1", "vma-1"))
            .await
            .unwrap();
        let p = pid(100, 5000);
        let batch = EventBatch {
            vma_id: "vma-1".into(),
            events: vec![
                event("j1", ProcessEventKind::ProcessStarted, p, None),
                event("j1", ProcessEventKind::ProcessExited, p, code(3)),
            ],
        };
        let (acked, applied) = store
            .apply_events("vma-1", &batch.events, decide_event)
            .await
            .unwrap();
        assert_eq!((acked.len(), applied), (2, 2), "{}", db.backend);
        let (acked, applied) = store
            .apply_events("vma-1", &batch.events, decide_event)
            .await
            .unwrap();
        assert_eq!((acked.len(), applied), (2, 0), "{}", db.backend);
        let job = store.get_job("j1").await.unwrap().job;
        assert_eq!(job.status, JobStatus::Failed);
        assert_eq!(job.failure_class, Some(FailureClass::ProcessExited));
        assert_eq!(
            (job.pid, job.process_start_time, job.attempt),
            (Some(100), Some(5000), 1)
        );
        let audit = store.audit("j1").await.unwrap();
        let transitions: Vec<_> = audit
            .iter()
            .filter(|a| a.actor == Actor::WatchdogEvent)
            .collect();
        assert_eq!(
            transitions.len(),
            2,
            "one entry per applied event: {audit:#?}"
        );
        assert_eq!(transitions[1].evidence["exit"]["code"], 3);
    }
}

#[tokio::test]
async fn an_event_about_another_attempt_only_reaches_the_audit_trail() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        store
            .create_job(&new_job("j1", "ctx-1", "vma-1"))
            .await
            .unwrap();
        let current = pid(200, 9000);
        let older = pid(150, 4000);
        let started = [event("j1", ProcessEventKind::ProcessStarted, current, None)];
        store
            .apply_events("vma-1", &started, decide_event)
            .await
            .unwrap();
        let stale = [
            event("j1", ProcessEventKind::ProcessExited, older, code(1)),
            event("j1", ProcessEventKind::DiedWhileUnwatched, older, None),
            event("j1", ProcessEventKind::ProcessStarted, older, None),
        ];
        let (acked, applied) = store
            .apply_events("vma-1", &stale, decide_event)
            .await
            .unwrap();
        assert_eq!((acked.len(), applied), (3, 0), "{}", db.backend);
        let job = store.get_job("j1").await.unwrap().job;
        assert_eq!(job.status, JobStatus::Replicating);
        assert_eq!(job.pid, Some(200));
        let audit = store.audit("j1").await.unwrap();
        assert_eq!(
            audit.iter().filter(|a| a.action == "stale_attempt").count(),
            3
        );
        assert!(
            audit
                .iter()
                .all(|a| a.action != "stale_attempt" || a.from_status == Some(a.to_status))
        );
    }
}

#[tokio::test]
async fn a_death_fails_the_job_and_releases_its_context_in_one_go() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        store
            .create_job(&new_job("j1", "ctx-1", "vma-1"))
            .await
            .unwrap();
        let p = pid(300, 7000);
        let killed = ExitStatus {
            code: None,
            signal: Some(9),
            core_dumped: false,
            oom_killed: false,
        };
        let events = [event(
            "j1",
            ProcessEventKind::ProcessExited,
            p,
            Some(killed),
        )];
        store
            .apply_events("vma-1", &events, decide_event)
            .await
            .unwrap();
        let job = store.get_job("j1").await.unwrap().job;
        assert_eq!(
            (job.status, job.failure_class),
            (JobStatus::Failed, Some(FailureClass::ProcessKilled))
        );
        assert!(job.error_message.unwrap().contains("signal 9"));
        let ctx = store.get_context("ctx-1").await.unwrap();
        assert_eq!(ctx.current_job_id, None, "{}", db.backend);
        assert_eq!(ctx.current_status, ContextStatus::ReadyForFailover);
        assert_eq!((ctx.failed_jobs, ctx.successful_jobs), (1, 0));
        // The context is free: the next job starts, then completes.
        store
            .create_job(&new_job("j2", "ctx-1", "vma-1"))
            .await
            .unwrap();
        let ok = [event(
            "j2",
            ProcessEventKind::ProcessExited,
            pid(301, 7100),
            code(0),
        )];
        store
            .apply_events("vma-1", &ok, decide_event)
            .await
            .unwrap();
        assert_eq!(
            store.get_job("j2").await.unwrap().job.status,
            JobStatus::Completed
        );
        let ctx = store.get_context("ctx-1").await.unwrap();
        assert_eq!(
            (ctx.total_jobs_run, ctx.successful_jobs, ctx.failed_jobs),
            (2, 1, 1)
        );
        assert_eq!(ctx.last_successful_job_id.as_deref(), Some("j2"));
        // A late event never moves a final job.
        let late = [event(
            "j2",
            ProcessEventKind::ProcessExited,
            pid(301, 7100),
            code(1),
        )];
        let (_, applied) = store
            .apply_events("vma-1", &late, decide_event)
            .await
            .unwrap();
        assert_eq!(applied, 0);
        assert_eq!(
            store.get_job("j2").await.unwrap().job.status,
            JobStatus::Completed
        );
    }
}

#[tokio::test]
async fn exit_classes_follow_the_evidence() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        let oom = ExitStatus {
            code: None,
            signal: Some(9),
            core_dumped: false,
            oom_killed: true,
        };
        let cases = [
            (
                "a",
                ProcessEventKind::ProcessExited,
                Some(oom),
                FailureClass::OomKilled,
            ),
            (
                "b",
                ProcessEventKind::DiedWhileUnwatched,
                None,
                FailureClass::DiedWhileUnwatched,
            ),
            (
                "c",
                ProcessEventKind::ProcessExited,
                code(2),
                FailureClass::ProcessExited,
            ),
        ];
        for (i, (id, kind, exit, class)) in cases.into_iter().enumerate() {
            store
                .create_job(&new_job(id, &format!("ctx-{id}"), "vma-1"))
                .await
                .unwrap();
            let events = [event(id, kind, pid(400 + i as u32, 1), exit)];
            store
                .apply_events("vma-1", &events, decide_event)
                .await
                .unwrap();
            let job = store.get_job(id).await.unwrap().job;
            assert_eq!(job.failure_class, Some(class), "{} {id}", db.backend);
        }
    }
}

#[tokio::test]
async fn a_vma_may_only_report_on_its_own_jobs() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        store
            .create_job(&new_job("j1", "ctx-1", "vma-1"))
            .await
            .unwrap();
        let events = [event(
            "j1",
            ProcessEventKind::ProcessExited,
            pid(1, 1),
            code(1),
        )];
        let err = store
            .apply_events("vma-2", &events, decide_event)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::ForeignJob { .. }), "{err}");
        assert_eq!(
            store.get_job("j1").await.unwrap().job.status,
            JobStatus::Pending
        );
        // Unknown jobs are acknowledged, not applied, so an outbox never jams.
        let unknown = [event(
            "nope",
            ProcessEventKind::ProcessExited,
            pid(1, 1),
            code(1),
        )];
        let (acked, applied) = store
            .apply_events("vma-1", &unknown, decide_event)
            .await
            .unwrap();
        assert_eq!((acked.len(), applied), (1, 0), "{}", db.backend);
    }
}

#[tokio::test]
async fn lists_filter_and_the_active_set_excludes_final_jobs() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        for i in 0..6 {
            let vma = if i % 2 == 0 { "vma-1" } else { "vma-2" };
            store
                .create_job(&new_job(&format!("j{i}"), &format!("ctx-{i}"), vma))
                .await
                .unwrap();
        }
        let events = [event(
            "j0",
            ProcessEventKind::ProcessExited,
            pid(1, 1),
            code(0),
        )];
        store
            .apply_events("vma-1", &events, decide_event)
            .await
            .unwrap();
        let by_vma = store
            .list_jobs(&JobFilter {
                vma_id: Some("vma-2".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(by_vma.len(), 3, "{}", db.backend);
        let completed = store
            .list_jobs(&JobFilter {
                status: Some(JobStatus::Completed),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(completed.len(), 1);
        let by_ctx = store
            .list_jobs(&JobFilter {
                vm_context_id: Some("ctx-3".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(by_ctx[0].job.id, "j3");
        let active = store.active_jobs().await.unwrap();
        assert_eq!(active.len(), 5);
        assert!(active.iter().all(|r| r.job.id != "j0"));
        let counts = store.count_by_status().await.unwrap();
        assert!(
            counts.contains(&(JobStatus::Pending, 5))
                && counts.contains(&(JobStatus::Completed, 1))
        );
    }
}

#[tokio::test]
async fn a_repeated_start_of_the_same_process_changes_nothing() {
    for db in test_dbs().await {
        let store = setup(&db).await;
        store
            .create_job(&new_job("j1", "ctx-1", "vma-1"))
            .await
            .unwrap();
        let p = pid(9, 99);
        let first = [event("j1", ProcessEventKind::ProcessStarted, p, None)];
        let again = [event("j1", ProcessEventKind::ProcessStarted, p, None)];
        assert_eq!(
            store
                .apply_events("vma-1", &first, decide_event)
                .await
                .unwrap()
                .1,
            1
        );
        let job = store.get_job("j1").await.unwrap();
        assert_eq!(
            store
                .apply_events("vma-1", &again, decide_event)
                .await
                .unwrap()
                .1,
            0,
            "{}",
            db.backend
        );
        assert_eq!(store.get_job("j1").await.unwrap(), job);
        assert_eq!(
            store.audit("j1").await.unwrap().len(),
            2,
            "created + process_recorded"
        );
    }
}
