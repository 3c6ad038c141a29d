//! Watchdog-event intake through the store: idempotence, attempts, deaths, exit classes,
//! foreign VMAs; on SQLite and PostgreSQL alike.

mod common;

use api::{EventBatch, ExitStatus, ProcessEventKind};
use common::fixtures::{code, event, new_job, setup};
use common::test_dbs;
use common::vma::pid;
use oma::job::on_event;
use oma::model::{Actor, ContextStatus, FailureClass, JobStatus};
use oma::store::StoreError;

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
            .apply_events("vma-1", &batch.events, on_event)
            .await
            .unwrap();
        assert_eq!((acked.len(), applied), (2, 2), "{}", db.backend);
        let (acked, applied) = store
            .apply_events("vma-1", &batch.events, on_event)
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
            .apply_events("vma-1", &started, on_event)
            .await
            .unwrap();
        let stale = [
            event("j1", ProcessEventKind::ProcessExited, older, code(1)),
            event("j1", ProcessEventKind::DiedWhileUnwatched, older, None),
            event("j1", ProcessEventKind::ProcessStarted, older, None),
        ];
        let (acked, applied) = store.apply_events("vma-1", &stale, on_event).await.unwrap();
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
            .apply_events("vma-1", &events, on_event)
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
        store.apply_events("vma-1", &ok, on_event).await.unwrap();
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
        let (_, applied) = store.apply_events("vma-1", &late, on_event).await.unwrap();
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
                .apply_events("vma-1", &events, on_event)
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
            .apply_events("vma-2", &events, on_event)
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
            .apply_events("vma-1", &unknown, on_event)
            .await
            .unwrap();
        assert_eq!((acked.len(), applied), (1, 0), "{}", db.backend);
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
                .apply_events("vma-1", &first, on_event)
                .await
                .unwrap()
                .1,
            1
        );
        let job = store.get_job("j1").await.unwrap();
        assert_eq!(
            store
                .apply_events("vma-1", &again, on_event)
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
