//! Every row of the recovery decision table, against a stand-in VMA on 127.0.0.1:0, on
//! SQLite and PostgreSQL; the dry run changes nothing and matches the real run.

mod common;

use api::{ExitStatus, ProcessEventKind};
use common::vma::{Answer, StandInVma, pid};
use common::{dead_url, store_with_vmas, test_dbs};
use oma::job::on_event;
use oma::model::{Actor, ContextStatus, FailureClass, JobStatus};
use oma::recovery::{Action, Recovery, RecoveryConfig, RecoveryError, Trigger};
use oma::store::{NewJob, Store};
use oma::vma_client::VmaClient;
use std::sync::Arc;
use std::time::Duration;

fn exit(code: Option<i32>, signal: Option<i32>, oom: bool) -> ExitStatus {
    ExitStatus {
        code,
        signal,
        core_dumped: false,
        oom_killed: oom,
    }
}

async fn job(store: &Store, id: &str, vma: &str) {
    let new = NewJob {
        id: Some(id.into()),
        vm_context_id: format!("ctx-{id}"),
        vm_name: Some(format!("vm-{id}")),
        vma_id: vma.into(),
        sync_type: None,
    };
    store.create_job(&new).await.unwrap();
}

/// Records `p` as the job's process, as a watchdog's start event would.
async fn started(store: &Store, id: &str, p: api::ProcessIdentity) {
    let ev = ProcessEvent_::started(id, p);
    store.apply_events("vma-1", &[ev], on_event).await.unwrap();
}

#[allow(non_camel_case_types)]
struct ProcessEvent_;
impl ProcessEvent_ {
    fn started(job: &str, p: api::ProcessIdentity) -> api::ProcessEvent {
        api::ProcessEvent {
            event_id: uuid::Uuid::new_v4(),
            kind: ProcessEventKind::ProcessStarted,
            job_id: api::JobId::parse(job).unwrap(),
            process: p,
            exit: None,
            observed_at: chrono::Utc::now(),
            detector: api::Detector::Ebpf,
            last_progress: None,
        }
    }
}

fn recovery(store: &Store, stale: Duration) -> Recovery {
    let config = RecoveryConfig {
        interval: Duration::from_secs(60),
        stale_threshold: stale,
        concurrency: 4,
    };
    Recovery::new(
        store.clone(),
        VmaClient::new(Duration::from_secs(10), None),
        config,
    )
}

/// Sets a job's last progress to `ago` in the past, as the poller would have recorded it.
async fn progress_ago(store: &Store, id: &str, ago: Duration) {
    let at = chrono::Utc::now().timestamp_millis() - ago.as_millis() as i64;
    sqlx::query("UPDATE replication_jobs SET last_progress_at = $1, created_at = $2 WHERE id = $3")
        .bind(at)
        .bind(at - 86_400_000) // created a day earlier: age must not matter
        .bind(id.to_owned())
        .execute(store.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn each_row_of_the_decision_table() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        // vma-2 is down: nothing listens on its URL.
        let store = store_with_vmas(&db, &vma.url, &dead_url().await).await;
        let rows: &[(&str, &str)] = &[
            ("running", "vma-1"),
            ("adopt", "vma-1"),
            ("exit0", "vma-1"),
            ("exit3", "vma-1"),
            ("sigkill", "vma-1"),
            ("oom", "vma-1"),
            ("unwatched", "vma-1"),
            ("older", "vma-1"),
            ("lost", "vma-1"),
            ("broken", "vma-1"),
            ("down-recent", "vma-2"),
            ("down-stale", "vma-2"),
        ];
        for (id, v) in rows {
            job(&store, id, v).await;
        }
        let p = pid(1000, 50_000);
        for id in [
            "running",
            "exit0",
            "exit3",
            "sigkill",
            "oom",
            "unwatched",
            "older",
        ] {
            started(&store, id, p).await;
        }
        vma.set("running", Answer::Running(p));
        vma.set("adopt", Answer::Running(pid(1001, 60_000)));
        vma.set("exit0", Answer::Exited(p, exit(Some(0), None, false)));
        vma.set("exit3", Answer::Exited(p, exit(Some(3), None, false)));
        vma.set("sigkill", Answer::Exited(p, exit(None, Some(9), false)));
        vma.set("oom", Answer::Exited(p, exit(None, Some(9), true)));
        vma.set("unwatched", Answer::Exited(p, ExitStatus::default()));
        vma.set(
            "older",
            Answer::Exited(pid(900, 10), exit(Some(0), None, false)),
        );
        vma.set("broken", Answer::Broken);
        progress_ago(&store, "down-recent", Duration::from_secs(60)).await;
        progress_ago(&store, "down-stale", Duration::from_secs(3600)).await;
        progress_ago(&store, "broken", Duration::from_secs(10)).await;

        let rec = recovery(&store, Duration::from_secs(1800));
        let report = rec.run(Trigger::Startup, false).await.unwrap();
        let expect = |id: &str, action: Action, status: JobStatus, class: Option<FailureClass>| {
            let d = report
                .decisions
                .iter()
                .find(|d| d.decision.job_id == id)
                .unwrap();
            assert_eq!(
                (
                    d.decision.action,
                    d.decision.to_status,
                    d.decision.failure_class
                ),
                (action, status, class),
                "{} row {id}: {:#?}",
                db.backend,
                d.decision.evidence
            );
            assert!(d.applied, "{id} applied");
        };
        use FailureClass as F;
        expect("running", Action::Keep, JobStatus::Replicating, None);
        expect("adopt", Action::Keep, JobStatus::Replicating, None);
        expect("exit0", Action::Finalize, JobStatus::Completed, None);
        expect(
            "exit3",
            Action::Finalize,
            JobStatus::Failed,
            Some(F::ProcessExited),
        );
        expect(
            "sigkill",
            Action::Finalize,
            JobStatus::Failed,
            Some(F::ProcessKilled),
        );
        expect(
            "oom",
            Action::Finalize,
            JobStatus::Failed,
            Some(F::OomKilled),
        );
        expect(
            "unwatched",
            Action::Finalize,
            JobStatus::Failed,
            Some(F::DiedWhileUnwatched),
        );
        expect(
            "older",
            Action::Finalize,
            JobStatus::Failed,
            Some(F::JobLost),
        );
        expect(
            "lost",
            Action::Finalize,
            JobStatus::Failed,
            Some(F::JobLost),
        );
        expect("broken", Action::Wait, JobStatus::Pending, None);
        expect("down-recent", Action::Wait, JobStatus::Pending, None);
        expect(
            "down-stale",
            Action::Finalize,
            JobStatus::Failed,
            Some(F::VmaUnreachableTimeout),
        );

        // The database agrees, with audit evidence, and final jobs released their contexts.
        let adopted = store.get_job("adopt").await.unwrap().job;
        assert_eq!(
            (adopted.status, adopted.pid, adopted.attempt),
            (JobStatus::Replicating, Some(1001), 1)
        );
        for id in [
            "exit0",
            "exit3",
            "sigkill",
            "oom",
            "unwatched",
            "older",
            "lost",
            "down-stale",
        ] {
            let job = store.get_job(id).await.unwrap().job;
            assert!(job.status.is_final(), "{id}");
            let ctx = store.get_context(&format!("ctx-{id}")).await.unwrap();
            assert_eq!(
                (ctx.current_job_id, ctx.current_status),
                (None, ContextStatus::ReadyForFailover)
            );
            let audit = store.audit(id).await.unwrap();
            let last = audit.last().unwrap();
            assert_eq!(
                (last.actor, last.action.as_str()),
                (Actor::StartupRecovery, "transition")
            );
            assert!(
                last.evidence.get("vma_answer").is_some(),
                "{id}: {:?}",
                last.evidence
            );
        }
        let stale = store.audit("down-stale").await.unwrap();
        let evidence = &stale.last().unwrap().evidence;
        assert_eq!(evidence["silence_from"], "last_progress_at");
        assert!(evidence["silent_ms"].as_i64().unwrap() >= 3_600_000);
        for id in ["running", "broken", "down-recent"] {
            assert!(
                store.get_job(id).await.unwrap().job.status.is_active(),
                "{id}"
            );
            let audit = store.audit(id).await.unwrap();
            assert!(
                audit.last().unwrap().action.starts_with("recovery_"),
                "{id}: {audit:?}"
            );
        }
        // A second run finds nothing new to write about the kept and waiting jobs.
        let before = store.audit("running").await.unwrap().len();
        rec.run(Trigger::Periodic, false).await.unwrap();
        assert_eq!(store.audit("running").await.unwrap().len(), before);
    }
}

#[tokio::test]
async fn the_dry_run_changes_nothing_and_matches_the_real_run() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        let store = store_with_vmas(&db, &vma.url, &dead_url().await).await;
        for (id, v) in [
            ("a", "vma-1"),
            ("b", "vma-1"),
            ("c", "vma-1"),
            ("d", "vma-2"),
            ("e", "vma-2"),
        ] {
            job(&store, id, v).await;
        }
        vma.set("a", Answer::Running(pid(1, 1)));
        vma.set("b", Answer::Exited(pid(2, 2), exit(None, Some(15), false)));
        progress_ago(&store, "e", Duration::from_secs(7200)).await;
        let rec = recovery(&store, Duration::from_secs(1800));
        let jobs_before: Vec<_> = store.active_jobs().await.unwrap();
        let audit_before = store.audit("b").await.unwrap();
        let orphans: Vec<_> = rec
            .plan()
            .await
            .unwrap()
            .into_iter()
            .map(|(_, d)| d)
            .filter(|d| d.action != Action::Keep)
            .collect();
        let dry = rec.run(Trigger::Operator, true).await.unwrap();
        assert!(dry.run.dry_run && dry.decisions.iter().all(|d| !d.applied));
        assert_eq!(
            store.active_jobs().await.unwrap(),
            jobs_before,
            "{}: dry run changed jobs",
            db.backend
        );
        assert_eq!(store.audit("b").await.unwrap(), audit_before);
        let real = rec.run(Trigger::Operator, false).await.unwrap();
        let key = |d: &oma::recovery::Decision| {
            let mut evidence = d.evidence.clone();
            evidence["silent_ms"] = serde_json::Value::Null;
            (
                d.job_id.clone(),
                d.action,
                d.to_status,
                d.failure_class,
                d.message.clone().map(|m| m.len()),
                evidence,
            )
        };
        let dry_keys: Vec<_> = dry.decisions.iter().map(|d| key(&d.decision)).collect();
        let real_keys: Vec<_> = real.decisions.iter().map(|d| key(&d.decision)).collect();
        assert_eq!(dry_keys, real_keys, "{}", db.backend);
        let orphan_ids: Vec<_> = orphans.iter().map(|d| d.job_id.clone()).collect();
        let real_changes: Vec<_> = real
            .decisions
            .iter()
            .filter(|d| d.decision.action != Action::Keep)
            .map(|d| d.decision.job_id.clone())
            .collect();
        assert_eq!(orphan_ids, real_changes);
        assert_eq!(
            (real.run.kept, real.run.finalized, real.run.waiting),
            (1, 3, 1)
        );
        let runs = store.recent_runs(10).await.unwrap();
        assert_eq!(runs.len(), 2);
        assert!(!runs[0].dry_run && runs[1].dry_run);
    }
}

#[tokio::test]
async fn two_recoveries_never_run_at_once() {
    let db = common::sqlite_db();
    let vma = StandInVma::start().await;
    let store = store_with_vmas(&db, &vma.url, &vma.url).await;
    job(&store, "slow", "vma-1").await;
    vma.set("slow", Answer::Running(pid(5, 5)));
    vma.inner.lock().unwrap().delay_ms = 3_000;
    let rec = Arc::new(recovery(&store, Duration::from_secs(1800)));
    let first = tokio::spawn({
        let rec = rec.clone();
        async move { rec.run(Trigger::Operator, false).await.map(|_| ()) }
    });
    // The first run holds the lock while it waits for the VMA's answer.
    vma.wait_job_calls(1).await;
    let second = rec.run(Trigger::Periodic, true).await;
    assert!(
        matches!(second, Err(RecoveryError::Busy)),
        "second run must be refused"
    );
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn two_omas_on_one_postgres_never_recover_at_once() {
    for db in test_dbs()
        .await
        .into_iter()
        .filter(|d| d.backend == "postgres")
    {
        let vma = StandInVma::start().await;
        let store_a = store_with_vmas(&db, &vma.url, &vma.url).await;
        let store_b = Store::connect(&db.url).await.unwrap();
        job(&store_a, "slow", "vma-1").await;
        vma.set("slow", Answer::Running(pid(5, 5)));
        vma.inner.lock().unwrap().delay_ms = 3_000;
        let oma_a = Arc::new(recovery(&store_a, Duration::from_secs(1800)));
        let oma_b = recovery(&store_b, Duration::from_secs(1800));
        let first = tokio::spawn({
            let oma_a = oma_a.clone();
            async move { oma_a.run(Trigger::Periodic, false).await.map(|_| ()) }
        });
        // OMA A holds the database's lock while it waits for the VMA's answer.
        vma.wait_job_calls(1).await;
        let second = oma_b.run(Trigger::Periodic, false).await;
        assert!(
            matches!(second, Err(RecoveryError::Busy)),
            "the other OMA must be refused"
        );
        first.await.unwrap().unwrap();
        // Released: the other OMA runs now.
        vma.inner.lock().unwrap().delay_ms = 0;
        oma_b.run(Trigger::Periodic, true).await.unwrap();
    }
}
