//! `Store::mutate_jobs` (group commit) on SQLite and on PostgreSQL: hundreds of jobs'
//! progress in one transaction across the multi-row UPDATE's chunks, the same rows and audit
//! entries as the single path, unknown jobs skipped, a cancel (ends a job, asks a stop) in the
//! same batch, and nothing written when nothing changes.

mod common;

use api::StoredProgress;
use common::fixtures::{new_job, progress};
use common::{store_with_vmas, test_dbs};
use oma::job::{cancel, on_progress};
use oma::model::{ContextStatus, JobStatus};
use std::collections::HashMap;

/// More than one multi-row UPDATE's worth (400 rows).
const JOBS: usize = 450;

#[tokio::test]
async fn many_jobs_commit_in_one_transaction_with_their_audit_entries() {
    for db in test_dbs().await {
        let store = store_with_vmas(&db, "http://127.0.0.1:9", "http://127.0.0.1:9").await;
        let ids: Vec<String> = (0..JOBS).map(|n| format!("many-{n:03}")).collect();
        for id in &ids {
            store
                .create_job(&new_job(id, &format!("ctx-{id}"), "vma-1"))
                .await
                .unwrap();
        }
        let reports: HashMap<String, StoredProgress> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| (id.clone(), progress(id, 1, n as u64 + 1)))
            .collect();
        let mut asked = ids.clone();
        asked.push("no-such-job".into());
        let outcome = store
            .mutate_jobs(&asked, |cur, now| {
                Ok(on_progress(cur, &reports[&cur.job.id], now, i64::MAX))
            })
            .await
            .unwrap();
        assert_eq!(outcome.changed.len(), JOBS, "{}", db.backend);
        assert_eq!(outcome.unknown, ["no-such-job"]);
        assert_eq!(outcome.transactions, 1);
        assert!(outcome.failed.is_empty());
        for (n, id) in ids.iter().enumerate().step_by(37) {
            let rec = store.get_job(id).await.unwrap();
            assert_eq!(rec.job.status, JobStatus::Replicating, "{id}");
            assert_eq!(rec.job.bytes_transferred, n as i64 + 1);
            assert_eq!(rec.job.current_operation.as_deref(), Some("Transfer"));
            assert_eq!((rec.progress_sequence, rec.version), (Some(1), 1));
            assert!((rec.job.progress_percent - 1.5).abs() < 1e-9);
            let audit = store.audit(id).await.unwrap();
            let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
            assert_eq!(actions, ["created", "transition"], "{id}");
        }
        // The same reports again change nothing and write nothing.
        let again = store
            .mutate_jobs(&ids, |cur, now| {
                Ok(on_progress(cur, &reports[&cur.job.id], now, i64::MAX))
            })
            .await
            .unwrap();
        assert!(again.changed.is_empty() && again.transactions == 0);
        assert_eq!(store.get_job(&ids[0]).await.unwrap().version, 1);
        // A batch mixing progress with a cancel: the cancel releases its context and asks
        // its stop, in the same transaction.
        let (first, second) = (ids[0].clone(), ids[1].clone());
        let newer = progress(&second, 2, 999);
        let mixed = store
            .mutate_jobs(&[first.clone(), second.clone()], |cur, now| {
                if cur.job.id == first {
                    return cancel(cur, Some("test"), now).map(Some);
                }
                Ok(on_progress(cur, &newer, now, i64::MAX))
            })
            .await
            .unwrap();
        assert_eq!((mixed.changed.len(), mixed.transactions), (2, 1));
        let cancelled = store.get_job(&first).await.unwrap();
        assert_eq!(cancelled.job.status, JobStatus::Cancelled);
        let context = store.get_context(&format!("ctx-{first}")).await.unwrap();
        assert_eq!(context.current_status, ContextStatus::ReadyForFailover);
        assert_eq!(context.current_job_id, None);
        let stops = store.pending_stops().await.unwrap();
        assert!(stops.iter().any(|s| s.job_id == first), "{stops:?}");
        assert_eq!(
            store.get_job(&second).await.unwrap().job.bytes_transferred,
            999
        );
    }
}
