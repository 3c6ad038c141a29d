//! The store test suite (jobs, contexts, lists), run on SQLite and PostgreSQL alike.

mod common;

use api::ProcessEventKind;
use common::fixtures::{code, event, new_job, setup};
use common::test_dbs;
use common::vma::pid;
use oma::job::on_event;
use oma::model::{ContextStatus, JobStatus};
use oma::store::{JobFilter, StoreError};

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
            .apply_events("vma-1", &events, on_event)
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
