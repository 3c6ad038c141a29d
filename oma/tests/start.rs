//! Creating a job starts migratekit on its VMA (a stand-in following the watchdog's start
//! contract on 127.0.0.1:0), on SQLite and PostgreSQL: started, refused, unreachable (then
//! recovery), already running, and the watchdog's duplicate `process_started` event.

mod common;

use api::{EventBatchAck, ProcessEventKind, StartJobRequest};
use common::vma::{Answer, StandInVma, StartMode, pid};
use common::{OPERATOR, VMA1_TOKEN, dead_url, settings, start_server, test_dbs};
use oma::auth::hash_token;
use oma::model::{Actor, ContextStatus, FailureClass, Job, JobStatus};
use oma::recovery::{Action, RecoveryError, Trigger};
use oma::server::RunningServer;
use oma::store::{NewJob, Store};
use reqwest::StatusCode;
use serde_json::json;

const OMA_TO_VMA: &str = "oma-to-vma-token-for-tests-01";

async fn server(db: &common::TestDb, vma_url: &str) -> RunningServer {
    let mut settings = settings(db);
    settings.vma_api_token = Some(OMA_TO_VMA.into());
    // Counted before the start, so that a second OMA on the same database waits for its own
    // startup run, not for the first one's.
    let runs_before = {
        let store = Store::connect(&db.url).await.unwrap();
        store.recent_runs(100).await.unwrap().len()
    };
    let server = start_server(settings).await;
    // The startup recovery runs beside the test otherwise, and on PostgreSQL could judge the
    // test's job and add to the audit trails these tests compare whole.
    let store = server.state.store.clone();
    common::eventually(30, "this OMA's startup recovery run", || async {
        (store.recent_runs(100).await.unwrap().len() > runs_before).then_some(())
    })
    .await;
    // The run is recorded a moment before its lock is released: a second OMA started in that
    // moment would find the lock taken and skip its own startup run (the next is an hour off).
    common::eventually(30, "the startup run's recovery lock released", || async {
        let lock = store.try_recovery_lock().await.unwrap()?;
        lock.release().await;
        Some(())
    })
    .await;
    register(&server.state.store, vma_url).await;
    server
}

async fn register(store: &Store, vma_url: &str) {
    store
        .upsert_vma("vma-1", vma_url, &hash_token(VMA1_TOKEN))
        .await
        .unwrap();
}

async fn create(server: &RunningServer, body: serde_json::Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{}/api/v1/jobs", server.addr))
        .bearer_auth(OPERATOR)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn body(id: &str) -> serde_json::Value {
    json!({"id": id, "vm_context_id": format!("ctx-{id}"), "vm_name": "web01", "vma_id": "vma-1",
           "params": {"vm_path": "/DC/vm/web01", "nbd_export_name": "web01-disk0",
                      "credentials": "vcenter-main"}})
}

/// One real recovery run, once the startup run (still going on a slow machine) has finished.
async fn recover(server: &RunningServer) -> oma::recovery::RunReport {
    common::eventually(10, "a recovery run", || async {
        match server.state.recovery.run(Trigger::Operator, false).await {
            Ok(report) => Some(report),
            Err(RecoveryError::Busy) => None,
            Err(e) => panic!("recovery failed: {e}"),
        }
    })
    .await
}

fn actions(audit: &[oma::model::AuditEntry]) -> Vec<&str> {
    audit.iter().map(|a| a.action.as_str()).collect()
}

fn started_event(job: &str, p: api::ProcessIdentity) -> api::ProcessEvent {
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

#[tokio::test]
async fn a_started_job_records_its_process_and_the_watchdogs_start_event_changes_nothing() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        vma.set_start(StartMode::Run(pid(4242, 777)));
        let server = server(&db, &vma.url).await;
        let store = &server.state.store;

        let resp = create(&server, body("job-1")).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", db.backend);
        let job: Job = resp.json().await.unwrap();
        assert_eq!(job.status, JobStatus::Replicating, "{}", db.backend);
        assert_eq!((job.pid, job.process_start_time), (Some(4242), Some(777)));
        assert_eq!(job.attempt, 1);
        assert!(job.started_at.is_some());
        // Parameters, never a command line; the OMA's own token for the VMA.
        let starts = vma.starts();
        assert_eq!(starts.len(), 1);
        let (id, token, request) = &starts[0];
        assert_eq!(id, "job-1");
        assert_eq!(token.as_deref(), Some(OMA_TO_VMA));
        let expected = StartJobRequest {
            vm_path: Some("/DC/vm/web01".into()),
            nbd_export_name: Some("web01-disk0".into()),
            credentials: Some("vcenter-main".into()),
            ..StartJobRequest::default()
        };
        assert_eq!(request, &expected);
        let audit = store.audit("job-1").await.unwrap();
        assert_eq!(actions(&audit), ["created", "started"], "{}", db.backend);
        assert_eq!(audit[1].from_status, Some(JobStatus::Pending));
        assert_eq!(audit[1].to_status, JobStatus::Replicating);
        assert_eq!(audit[1].evidence["vma_answer"]["answer"], "started");
        assert_eq!(
            audit[1].evidence["vma_answer"]["state"]["process"]["pid"],
            4242
        );

        // The watchdog's outbox delivers process_started for the same process: acknowledged,
        // nothing applied, the job and its trail unchanged.
        let before = store.get_job("job-1").await.unwrap();
        let batch = json!({"vma_id": "vma-1", "events": [started_event("job-1", pid(4242, 777))]});
        let ack: EventBatchAck = reqwest::Client::new()
            .post(format!("http://{}/api/v1/watchdog/events", server.addr))
            .bearer_auth(VMA1_TOKEN)
            .json(&batch)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!((ack.acknowledged.len(), ack.applied), (1, 0));
        assert_eq!(store.get_job("job-1").await.unwrap(), before);
        assert_eq!(store.audit("job-1").await.unwrap().len(), 2);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn the_event_first_then_the_start_answer_is_one_transition() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        let server = server(&db, &vma.url).await;
        let store = &server.state.store;
        let new = NewJob {
            id: Some("job-2".into()),
            vm_context_id: "ctx-2".into(),
            vm_name: Some("db01".into()),
            vma_id: "vma-1".into(),
            sync_type: None,
        };
        store.create_job(&new).await.unwrap();
        let event = started_event("job-2", pid(5000, 900));
        store
            .apply_events("vma-1", &[event], oma::job::on_event)
            .await
            .unwrap();
        let after_event = store.get_job("job-2").await.unwrap();
        assert_eq!(after_event.job.status, JobStatus::Replicating);
        // The start answer for the same process arrives late: it changes nothing.
        let answer = oma::vma_client::StartAnswer::Started {
            state: api::JobProcessState::Running {
                process: pid(5000, 900),
                since: chrono::Utc::now(),
                found_by: api::FoundBy::Started,
            },
        };
        let rec = store
            .mutate_job("job-2", |cur, now| {
                Ok(oma::job::on_start_answer(cur, &answer, now))
            })
            .await
            .unwrap();
        assert_eq!(rec, after_event, "{}", db.backend);
        let audit = store.audit("job-2").await.unwrap();
        assert_eq!(actions(&audit), ["created", "process_recorded"]);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_refused_start_fails_the_job_and_releases_its_context() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        vma.set_start(StartMode::Refuse);
        let server = server(&db, &vma.url).await;
        let store = &server.state.store;
        let resp = create(&server, body("job-3")).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{}", db.backend);
        let e: api::ErrorBody = resp.json().await.unwrap();
        assert_eq!(e.error, "start_refused");
        assert!(
            e.message.contains("job-3") && e.message.contains("invalid_parameters"),
            "{}",
            e.message
        );
        let job = store.get_job("job-3").await.unwrap().job;
        assert_eq!(job.status, JobStatus::Failed);
        assert_eq!(job.failure_class, Some(FailureClass::StartRefused));
        assert!(job.error_message.unwrap().contains("refused"));
        let ctx = store.get_context("ctx-job-3").await.unwrap();
        assert_eq!(ctx.current_status, ContextStatus::ReadyForFailover);
        assert_eq!((ctx.current_job_id, ctx.failed_jobs), (None, 1));
        let audit = store.audit("job-3").await.unwrap();
        assert_eq!(actions(&audit), ["created", "start_refused"]);
        assert_eq!(audit[1].failure_class, Some(FailureClass::StartRefused));
        assert_eq!(audit[1].evidence["vma_answer"]["status"], 400);
        assert_eq!(
            audit[1].evidence["vma_answer"]["error"],
            "invalid_parameters"
        );
        server.shutdown().await;
    }
}

#[tokio::test]
async fn an_unreachable_vma_leaves_the_job_pending_for_recovery() {
    for db in test_dbs().await {
        let server = server(&db, &dead_url().await).await;
        let store = &server.state.store;
        let resp = create(&server, body("job-4")).await;
        assert_eq!(resp.status(), StatusCode::ACCEPTED, "{}", db.backend);
        let job: Job = resp.json().await.unwrap();
        assert_eq!((job.status, job.pid), (JobStatus::Pending, None));
        let audit = store.audit("job-4").await.unwrap();
        assert_eq!(actions(&audit), ["created", "start_unreachable"]);
        assert_eq!(audit[1].evidence["vma_answer"]["answer"], "unreachable");

        // Recovery by its normal rules: still unreachable and young → wait.
        let report = recover(&server).await;
        assert_eq!(report.decisions[0].decision.action, Action::Wait);
        assert_eq!(
            store.get_job("job-4").await.unwrap().job.status,
            JobStatus::Pending
        );
        // The VMA is back and has never heard of the job → job_lost, context released.
        let vma = StandInVma::start().await;
        register(store, &vma.url).await;
        recover(&server).await;
        let job = store.get_job("job-4").await.unwrap().job;
        assert_eq!(job.status, JobStatus::Failed, "{}", db.backend);
        assert_eq!(job.failure_class, Some(FailureClass::JobLost));
        let ctx = store.get_context("ctx-job-4").await.unwrap();
        assert_eq!(ctx.current_job_id, None);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn a_job_already_running_on_the_vma_is_adopted() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        vma.set("job-5", Answer::Running(pid(6000, 1234)));
        let server = server(&db, &vma.url).await;
        let resp = create(&server, body("job-5")).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", db.backend);
        let job: Job = resp.json().await.unwrap();
        assert_eq!(job.status, JobStatus::Replicating);
        assert_eq!((job.pid, job.process_start_time), (Some(6000), Some(1234)));
        server.shutdown().await;
    }
}

#[tokio::test]
async fn start_false_only_records_and_bad_ids_are_refused_before_anything_is_written() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        vma.set_start(StartMode::Run(pid(1, 1)));
        let server = server(&db, &vma.url).await;
        let mut b = body("job-6");
        b["start"] = json!(false);
        let resp = create(&server, b).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        let job: Job = resp.json().await.unwrap();
        assert_eq!(job.status, JobStatus::Pending);
        assert!(vma.starts().is_empty(), "no start request was sent");

        let resp = create(&server, body("job 7")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e: api::ErrorBody = resp.json().await.unwrap();
        assert!(e.message.contains("`id`"), "{}", e.message);
        assert!(server.state.store.get_job("job 7").await.is_err());
        // The same rule without a start: the id still reaches the VMA's names and the logs
        // (a newline in it once forged a text log line).
        let mut b = body("job\n8");
        b["start"] = json!(false);
        let resp = create(&server, b).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let e: api::ErrorBody = resp.json().await.unwrap();
        assert!(e.message.contains("position 3"), "{}", e.message);
        assert!(server.state.store.get_job("job\n8").await.is_err());
        assert!(vma.starts().is_empty());
        server.shutdown().await;
    }
}

/// Cancelling a job asks its VMA to stop migratekit, after the cancel is committed, and the
/// audit trail shows the VMA's answer; an unreachable VMA does not stop the cancel.
#[tokio::test]
async fn cancel_stops_the_process_on_the_vma_and_records_the_answer() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        vma.set_start(StartMode::Run(pid(4242, 777)));
        let server = server(&db, &vma.url).await;
        let store = &server.state.store;
        assert_eq!(
            create(&server, body("job-1")).await.status(),
            StatusCode::CREATED
        );
        let cancel = |job: &str| {
            reqwest::Client::new()
                .post(format!("http://{}/api/v1/jobs/{job}/cancel", server.addr))
                .bearer_auth(OPERATOR)
                .json(&json!({"reason": "wrong VM"}))
                .send()
        };
        let resp = cancel("job-1").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{}", db.backend);
        assert_eq!(
            resp.json::<Job>().await.unwrap().status,
            JobStatus::Cancelled
        );
        assert_eq!(vma.stops(), ["job-1"], "{}", db.backend);
        let audit = store.audit("job-1").await.unwrap();
        assert_eq!(
            actions(&audit),
            ["created", "started", "transition", "stop_requested"],
            "{}",
            db.backend
        );
        let stop = audit.last().unwrap();
        assert_eq!(stop.to_status, JobStatus::Cancelled);
        assert_eq!(stop.evidence["vma_answer"]["answer"], "stopping");

        // A VMA nobody listens on: the job is cancelled all the same, and the trail says the
        // process may still run.
        store
            .upsert_vma("vma-1", &dead_url().await, &hash_token(VMA1_TOKEN))
            .await
            .unwrap();
        assert_eq!(
            create(&server, body("job-2")).await.status(),
            StatusCode::ACCEPTED
        );
        let resp = cancel("job-2").await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{}", db.backend);
        let audit = store.audit("job-2").await.unwrap();
        let stop = audit.last().unwrap();
        assert_eq!(stop.action, "stop_requested");
        assert_eq!(
            stop.evidence["vma_answer"]["answer"], "failed",
            "{:?}",
            stop.evidence
        );

        // The VMA is back, and job-2's migratekit runs there after all (it was started by a
        // request whose answer was lost): recovery's retry stops it, once, and records it.
        let retry = || oma::stop::retry_pending(&server.state.recovery, Actor::PeriodicRecovery, 4);
        assert_eq!(
            retry().await,
            0,
            "{}: the VMA is still unreachable",
            db.backend
        );
        assert_eq!(store.audit("job-2").await.unwrap().len(), audit.len());
        // Until the stop gets there, job-2's migratekit may still run against its VM: no new
        // job may take the VM context, although job-2 is final and released it.
        let mut next = body("job-3");
        next["vm_context_id"] = json!("ctx-job-2");
        next["start"] = json!(false);
        let resp = create(&server, next.clone()).await;
        assert_eq!(resp.status(), StatusCode::CONFLICT, "{}", db.backend);
        let e: api::ErrorBody = resp.json().await.unwrap();
        assert_eq!(e.error, "vm_context_busy");
        assert!(
            e.message.contains("job-2") && e.message.contains("not been stopped"),
            "{}",
            e.message
        );
        store
            .upsert_vma("vma-1", &vma.url, &hash_token(VMA1_TOKEN))
            .await
            .unwrap();
        vma.set("job-2", Answer::Running(pid(5151, 888)));
        assert_eq!(retry().await, 1, "{}", db.backend);
        let resp = create(&server, next).await;
        assert_eq!(
            resp.status(),
            StatusCode::CREATED,
            "{}: the stop got there",
            db.backend
        );
        assert_eq!(vma.stops(), ["job-1", "job-2"], "{}", db.backend);
        let after = store.audit("job-2").await.unwrap();
        let stop = after.last().unwrap();
        assert_eq!(
            (stop.action.as_str(), stop.actor, stop.to_status),
            (
                "stop_requested",
                Actor::PeriodicRecovery,
                JobStatus::Cancelled
            )
        );
        assert_eq!(stop.evidence["vma_answer"]["answer"], "stopping");
        assert_eq!(retry().await, 0, "{}: asked twice", db.backend);
        assert_eq!(vma.stops(), ["job-1", "job-2"], "{}", db.backend);
    }
}

/// While a job's start request is in flight, recovery leaves the job alone (asking the VMA a
/// moment before the start arrives there would fail it as `job_lost`): in the OMA that starts
/// it, and on PostgreSQL in every other OMA on the same database. Released, it is judged again.
#[tokio::test]
async fn a_start_in_flight_fences_recovery_in_every_oma_on_the_database() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        let a = server(&db, &vma.url).await;
        // A second OMA on the same database (PostgreSQL only: SQLite is one OMA per file).
        let b = match db.backend {
            "postgres" => Some(server(&db, &vma.url).await),
            _ => None,
        };
        let planned = |s: &RunningServer| {
            let recovery = s.state.recovery.clone();
            async move {
                let plan = recovery.plan().await.unwrap();
                plan.into_iter().map(|(r, _)| r.job.id).collect::<Vec<_>>()
            }
        };
        let guard = a.state.recovery.start_guard("job-1").await.unwrap();
        let new = common::fixtures::new_job("job-1", "ctx-1", "vma-1");
        a.state.store.create_job(&new).await.unwrap();
        assert!(planned(&a).await.is_empty(), "{}", db.backend);
        if let Some(b) = &b {
            assert!(
                planned(b).await.is_empty(),
                "the other OMA judged a job being started"
            );
        }
        guard.release().await;
        assert_eq!(planned(&a).await, ["job-1"], "{}", db.backend);
        if let Some(b) = &b {
            assert_eq!(planned(b).await, ["job-1"], "the fence outlived the start");
        }
    }
}

/// Ends the PostgreSQL session that holds the start fence `key`, as a server restart would.
async fn end_session_holding(store: &Store, key: u32) {
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND objid::bigint = $1 AND objsubid = 2 AND granted",
    )
    .bind(i64::from(key))
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(ended, [true], "one session held the fence");
}

/// A start fence whose database session ends (a server restart, a cut connection) is gone
/// for the other OMAs at once, silently on the server's side: releasing it says so, so the
/// OMA can log that the job may have been judged meanwhile. PostgreSQL only (on SQLite the
/// fence holds nothing).
#[tokio::test]
async fn a_start_fence_lost_with_its_session_is_reported_at_release() {
    for db in test_dbs()
        .await
        .into_iter()
        .filter(|d| d.backend == "postgres")
    {
        let vma = StandInVma::start().await;
        let a = server(&db, &vma.url).await;
        let other = Store::connect(&db.url).await.unwrap();
        let key = oma::store::start_key("job-lost");

        let kept = a.state.recovery.start_guard("job-kept").await.unwrap();
        assert!(kept.release().await, "a fence held to the end");

        let guard = a.state.recovery.start_guard("job-lost").await.unwrap();
        assert!(other.starts_in_flight().await.unwrap().contains(&key));
        // The session holding the fence ends, as when the server restarts.
        end_session_holding(&other, key).await;
        common::eventually(10, "the fence to go with its session", || async {
            (!other.starts_in_flight().await.unwrap().contains(&key)).then_some(())
        })
        .await;
        assert!(!guard.release().await, "a lost fence was reported as held");
        // The store says how: lost with its session, not some other failure.
        let fence = a.state.store.fence_start("job-lost").await.unwrap();
        end_session_holding(&other, key).await;
        let released = fence.release().await;
        assert!(
            matches!(released, oma::store::Released::Lost),
            "{released:?}"
        );
        // The OMA goes on: its next start is fenced again.
        let again = a.state.recovery.start_guard("job-lost").await.unwrap();
        assert!(other.starts_in_flight().await.unwrap().contains(&key));
        assert!(again.release().await);
    }
}
