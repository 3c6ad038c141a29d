//! The progress poller against a stand-in VMA: progress recorded, stall flagged and cleared,
//! errors backed off but never given up, and polling resumed after the server restarts.

mod common;

use api::ProgressStatus;
use common::vma::{Answer, StandInVma, pid};
use common::{VMA1_TOKEN, eventually, settings, start_server, test_dbs};
use oma::auth::hash_token;
use oma::model::{FailureClass, JobStatus};
use oma::server::RunningServer;
use oma::store::{NewJob, Store};
use std::time::Duration;

async fn create(store: &Store, id: &str) {
    create_on(store, id, "vma-1").await;
}

async fn create_on(store: &Store, id: &str, vma: &str) {
    let new = NewJob {
        id: Some(id.into()),
        vm_context_id: format!("ctx-{id}"),
        vm_name: Some("vm".into()),
        vma_id: vma.into(),
        sync_type: None,
    };
    store.create_job(&new).await.unwrap();
}

/// A stand-in VMA, an OMA started with `settings`, and the VMA registered as `vma-1`.
async fn with_vma(settings: oma::server::Settings) -> (StandInVma, RunningServer, Store) {
    let vma = StandInVma::start().await;
    let server = start_server(settings).await;
    let store = server.state.store.clone();
    store
        .upsert_vma("vma-1", &vma.url, &hash_token(VMA1_TOKEN))
        .await
        .unwrap();
    (vma, server, store)
}

async fn bytes(store: &Store, id: &str, want: i64) -> Option<()> {
    (store.get_job(id).await.unwrap().job.bytes_transferred == want).then_some(())
}

#[tokio::test]
async fn progress_is_recorded_and_stalls_are_flagged_not_failed() {
    for db in test_dbs().await {
        let mut s = settings(&db);
        s.poller.stall_threshold = Duration::from_millis(300);
        let (vma, server, store) = with_vma(s).await;
        for id in ["live", "failing"] {
            vma.set(id, Answer::Running(pid(10, 10)));
            create(&store, id).await;
        }
        vma.set_progress("live", 1, 100, None);
        eventually(10, "first progress", || bytes(&store, "live", 100)).await;
        let job = store.get_job("live").await.unwrap().job;
        assert_eq!(job.status, JobStatus::Replicating, "{}", db.backend);
        assert!(job.last_progress_at.is_some() && job.progress_percent > 9.9);
        // Updates keep coming but bytes do not move: flagged, still replicating.
        for seq in 2..6 {
            vma.set_progress("live", seq, 100, None);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eventually(10, "stall flag", || async {
            store
                .get_job("live")
                .await
                .unwrap()
                .job
                .stalled_since
                .map(|_| ())
        })
        .await;
        let job = store.get_job("live").await.unwrap().job;
        assert_eq!(
            (job.status, job.failure_class),
            (JobStatus::Replicating, None)
        );
        // Bytes move again: the flag clears; both changes are in the audit trail. The audit
        // entry is what is waited for: with bytes still again afterwards, the flag comes back
        // one threshold later, so the cleared flag itself may be gone before a look sees it.
        vma.set_progress("live", 7, 200, None);
        eventually(10, "stall cleared", || async {
            let actions: Vec<String> = store
                .audit("live")
                .await
                .unwrap()
                .into_iter()
                .map(|a| a.action)
                .collect();
            actions.contains(&"unstalled".into()).then_some(())
        })
        .await;
        let job = store.get_job("live").await.unwrap().job;
        assert_eq!(
            (job.status, job.failure_class, job.bytes_transferred),
            (JobStatus::Replicating, None, 200)
        );
        let actions: Vec<_> = store
            .audit("live")
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert!(actions.contains(&"stalled".into()), "{actions:?}");
        server.shutdown().await;
    }
}

/// migratekit's own `failed` report is evidence, not a death: while its process lives the job
/// stays active and its VM context busy (so no second replication can start on the VM);
/// the reason shows at once; the death then ends the job as the reported failure.
#[tokio::test]
async fn a_failure_report_keeps_the_vm_busy_until_the_process_is_gone() {
    for db in test_dbs().await {
        let (vma, server, store) = with_vma(settings(&db)).await;
        vma.set("failing", Answer::Running(pid(10, 10)));
        create(&store, "failing").await;
        vma.set_progress("failing", 1, 5, Some(ProgressStatus::Failed));
        let job = eventually(10, "the failure report recorded", || async {
            let job = store.get_job("failing").await.unwrap().job;
            job.error_message.is_some().then_some(job)
        })
        .await;
        assert_eq!(
            (job.status, job.failure_class),
            (JobStatus::Replicating, None),
            "{}",
            db.backend
        );
        assert!(job.error_message.unwrap().contains("disk read error"));
        let context = store.get_context("ctx-failing").await.unwrap();
        assert_eq!(context.current_job_id.as_deref(), Some("failing"));
        let actions: Vec<_> = store
            .audit("failing")
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.action, a.to_status))
            .collect();
        assert!(
            actions.contains(&("failure_reported".into(), JobStatus::Replicating)),
            "{actions:?}"
        );
        // A later report of the same process cannot take the failure back.
        vma.set_progress("failing", 2, 6, Some(ProgressStatus::InProgress));
        eventually(10, "the next report", || bytes(&store, "failing", 6)).await;
        // The process ends with exit 0: the reported failure is the verdict, and only now is
        // the VM context free.
        vma.set(
            "failing",
            Answer::Exited(pid(10, 10), api::ExitStatus::from_wait_status(0, false)),
        );
        let report = server
            .state
            .recovery
            .run(oma::recovery::Trigger::Operator, false)
            .await
            .unwrap();
        assert_eq!(report.run.finalized, 1, "{}", db.backend);
        let job = store.get_job("failing").await.unwrap().job;
        assert_eq!(
            (job.status, job.failure_class),
            (JobStatus::Failed, Some(FailureClass::VmaReportedFailure))
        );
        let message = job.error_message.unwrap();
        assert!(
            message.contains("disk read error") && message.contains("exited with code 0"),
            "{message}"
        );
        let context = store.get_context("ctx-failing").await.unwrap();
        assert_eq!(context.current_job_id, None);
        server.shutdown().await;
    }
}

/// A VMA's progress that breaks the contract's rules (a negative percent) is not believed:
/// the poll counts as failed, the job keeps its figures.
#[tokio::test]
async fn progress_out_of_range_is_not_believed() {
    let db = common::sqlite_db();
    let (vma, server, store) = with_vma(settings(&db)).await;
    vma.set("odd", Answer::Running(pid(3, 3)));
    create(&store, "odd").await;
    vma.set_progress("odd", 1, 100, None);
    eventually(10, "first progress", || bytes(&store, "odd", 100)).await;
    vma.set_progress("odd", 2, 200, None);
    vma.inner
        .lock()
        .unwrap()
        .progress
        .get_mut("odd")
        .unwrap()
        .update
        .percent = Some(-50.0);
    let calls = vma.progress_calls("odd");
    eventually(10, "polls of the odd answer", || async {
        (vma.progress_calls("odd") >= calls + 3).then_some(())
    })
    .await;
    let job = store.get_job("odd").await.unwrap().job;
    assert_eq!(job.bytes_transferred, 100, "the odd answer changed the job");
    let health = server.state.poller.health();
    assert!(health.polls_failed > 0, "{health:?}");
    assert!(
        health.last_error.unwrap_or_default().contains("percent"),
        "the error names the field"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn errors_back_off_but_polling_never_stops() {
    let db = common::sqlite_db();
    let (vma, server, store) = with_vma(settings(&db)).await;
    vma.set("flaky", Answer::Running(pid(1, 1)));
    create(&store, "flaky").await;
    vma.inner.lock().unwrap().progress_broken = true;
    // Interval 50 ms, cap 400 ms: over 2 s a healthy poller would call ~40 times; backing
    // off it calls fewer times, but it keeps calling.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let calls = vma.progress_calls("flaky");
    assert!(calls >= 3, "the poller gave up after {calls} calls");
    assert!(calls < 30, "no backoff: {calls} calls in 2 s");
    let health = server.state.poller.health();
    assert!(
        health.polls_failed >= 3 && health.jobs_backing_off == 1,
        "{health:?}"
    );
    vma.inner.lock().unwrap().progress_broken = false;
    vma.set_progress("flaky", 1, 42, None);
    eventually(10, "progress after errors", || bytes(&store, "flaky", 42)).await;
    eventually(10, "backoff cleared", || async {
        (server.state.poller.health().jobs_backing_off == 0).then_some(())
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn polling_resumes_after_the_server_restarts() {
    for db in test_dbs().await {
        let (vma, server, store) = with_vma(settings(&db)).await;
        vma.set("long", Answer::Running(pid(77, 7700)));
        create(&store, "long").await;
        vma.set_progress("long", 1, 100, None);
        eventually(10, "progress before restart", || bytes(&store, "long", 100)).await;
        server.shutdown().await;

        // Progress moves while the OMA is down; a new server on the same database picks the
        // job up from the database: startup recovery keeps it (the VMA says it runs) and the
        // poller records the new progress.
        vma.set_progress("long", 2, 600, None);
        let server = start_server(settings(&db)).await;
        let store = server.state.store.clone();
        eventually(10, "progress after restart", || bytes(&store, "long", 600)).await;
        // The poller may record progress before startup recovery has committed, and the first
        // server's startup run is in the same database: wait for what the new server's startup
        // recovery does (adopt the running process, then record its run), not for a guess at
        // how long it takes.
        eventually(10, "process adopted by startup recovery", || async {
            let job = store.get_job("long").await.unwrap().job;
            (job.pid.is_some()).then_some(())
        })
        .await;
        let job = store.get_job("long").await.unwrap().job;
        assert_eq!(job.status, JobStatus::Replicating, "{}", db.backend);
        assert_eq!((job.pid, job.process_start_time), (Some(77), Some(7700)));
        eventually(10, "startup run that kept the job", || async {
            let runs = store.recent_runs(5).await.unwrap();
            runs.iter()
                .any(|r| r.trigger == "startup" && r.kept == 1)
                .then_some(())
        })
        .await;
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_hanging_vma_does_not_delay_another_vmas_jobs() {
    let db = common::sqlite_db();
    let vma = StandInVma::start().await;
    // Accepts connections and never answers: every poll of its jobs waits for the timeout.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_url = format!("http://{}", hang.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hang.accept().await {
            held.push(socket);
        }
    });
    let mut s = settings(&db);
    // Far longer than the waits below: were the healthy job's polls queued behind the hung
    // ones, its progress could not arrive before this timeout.
    s.vma_timeout = Duration::from_secs(120);
    let server = start_server(s).await;
    let store = server.state.store.clone();
    store
        .upsert_vma("vma-1", &vma.url, &hash_token(VMA1_TOKEN))
        .await
        .unwrap();
    store
        .upsert_vma("vma-2", &hang_url, &hash_token(common::VMA2_TOKEN))
        .await
        .unwrap();
    for i in 0..8 {
        create_on(&store, &format!("hung-{i}"), "vma-2").await;
    }
    vma.set("healthy", Answer::Running(pid(3, 3)));
    create(&store, "healthy").await;
    vma.set_progress("healthy", 1, 10, None);
    eventually(30, "first progress", || bytes(&store, "healthy", 10)).await;
    // The hung VMA's polls are all still waiting for their timeout; the healthy job's next
    // progress must still arrive well within it.
    vma.set_progress("healthy", 2, 20, None);
    eventually(30, "second progress", || bytes(&store, "healthy", 20)).await;
    server.shutdown().await;
}
