//! The watchdog's REST API over real sockets on 127.0.0.1:0.

mod support;

use std::time::Duration;

use api::{ErrorBody, FoundBy, JobProcessState, StoredProgress, VmaJobStatus};
use reqwest::StatusCode;
use support::{TOKEN, get_json, progress_body, sleep_launcher, start};
use vma_watchdog::progress::ProgressStore;

/// Registers this test process as the job's process: progress updates count only from the
/// job's own process, and here the test's HTTP client plays migratekit.
fn register_self(server: &support::Server, job_id: &str) {
    use vma_watchdog::http::JobsView;
    let me = vma_watchdog::launcher::proc_identity(std::process::id()).unwrap();
    server
        .jobs
        .register_process(&api::JobId::parse(job_id).unwrap(), me, FoundBy::Tracked)
        .unwrap();
}

async fn error_of(response: reqwest::Response) -> ErrorBody {
    response
        .json::<ErrorBody>()
        .await
        .expect("an ErrorBody JSON")
}

#[tokio::test]
async fn progress_from_loopback_is_stored_and_survives_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    register_self(&server, "job-1");
    let client = reqwest::Client::new();
    // Exactly like migratekit's client: no credentials, 5 s timeout, expects 200.
    for bytes in [100, 200, 300] {
        let response = client
            .post(server.url("/api/v1/progress/job-1/update"))
            .timeout(Duration::from_secs(5))
            .json(&progress_body(bytes))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let got: StoredProgress = get_json(&client, &server.url("/api/v1/progress/job-1")).await;
    assert_eq!((got.update.bytes_transferred, got.sequence), (300, 3));
    server.stop().await;
    let reopened = ProgressStore::open(dir.path()).unwrap();
    let stored = reopened
        .get("job-1")
        .expect("progress persisted across a new store");
    assert_eq!((stored.update.bytes_transferred, stored.sequence), (300, 3));
    assert_eq!(stored.update.disk_id.as_deref(), Some("disk-2000"));
}

#[tokio::test]
async fn everything_but_health_and_progress_updates_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    let paths = [
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/job-1"),
        ("GET", "/api/v1/progress/job-1"),
        ("POST", "/api/v1/jobs/job-1/start"),
        ("POST", "/api/v1/jobs/job-1/track"),
    ];
    for (method, path) in paths {
        for token in [None, Some("wrong-token"), Some("test-token-012345678")] {
            let mut request = client.request(method.parse().unwrap(), server.url(path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.json(&serde_json::json!({})).send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} {token:?}"
            );
            let body = error_of(response).await;
            assert_eq!(body.error, "unauthorized");
        }
    }
    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ok = client
        .get(server.url("/api/v1/jobs"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn unknown_job_and_missing_progress_are_404_with_a_json_body() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    let job = client
        .get(server.url("/api/v1/jobs/never-heard-of"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(job.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_of(job).await.error, "unknown_job");
    let progress = client
        .get(server.url("/api/v1/progress/never-heard-of"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(progress.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_of(progress).await.error, "no_progress");
    server.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413_and_malformed_ones_400_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    // From the job's own process, so that what is checked is the body, not the caller.
    register_self(&server, "job-1");
    let client = reqwest::Client::new();
    let mut huge = progress_body(1);
    huge["stage"] = serde_json::Value::String("x".repeat(200 * 1024));
    let response = client
        .post(server.url("/api/v1/progress/job-1/update"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_of(response).await.error, "body_too_large");

    let missing = serde_json::json!({"bytes_transferred": 1, "throughput_bps": 2});
    let response = client
        .post(server.url("/api/v1/progress/job-1/update"))
        .json(&missing)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = error_of(response).await;
    assert_eq!(body.error, "invalid_body");
    assert!(body.message.contains("stage"), "{}", body.message);

    let response = client
        .post(server.url("/api/v1/jobs/job-1/start"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"command_line": "rm -rf /"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(error_of(response).await.message.contains("command_line"));

    let response = client
        .post(server.url("/api/v1/progress/job-1/update"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let response = client
        .get(server.url("/api/v1/jobs/..%2Fetc"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(response).await.error, "invalid_job_id");
    // The one rule of `api::JobId`, on every route, with its own message: ':' and a first
    // character that is not a letter or digit are refused too.
    for (path, says) in [
        ("/api/v1/jobs/job:1", "position 3"),
        ("/api/v1/jobs/-job/stop", "start with a letter or digit"),
        ("/api/v1/progress/job%20x", "position 3"),
    ] {
        let request = if path.ends_with("stop") {
            client.post(server.url(path))
        } else {
            client.get(server.url(path))
        };
        let response = request.bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let body = error_of(response).await;
        assert_eq!(body.error, "invalid_job_id", "{path}");
        assert!(body.message.contains(says), "{path}: {}", body.message);
    }
    assert!(server.state.progress.get("job-1").is_none());
    server.stop().await;
}

#[tokio::test]
async fn start_runs_the_template_registers_the_process_and_refuses_a_second_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    let start = |body: serde_json::Value| {
        client
            .post(server.url("/api/v1/jobs/job-7/start"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
    };
    // A parameter the VMA's template needs is missing: the request is well formed (no
    // schema can know this VMA's template), this VMA cannot serve it: 409.
    let missing = start(serde_json::json!({})).await.unwrap();
    assert_eq!(missing.status(), StatusCode::CONFLICT);
    let body = error_of(missing).await;
    assert_eq!(body.error, "invalid_parameters");
    assert!(body.message.contains("seconds"));
    let no_creds =
        start(serde_json::json!({"credentials": "nope", "parameters": {"seconds": "30"}}))
            .await
            .unwrap();
    assert_eq!(no_creds.status(), StatusCode::CONFLICT);
    // A body that is not an object: serde would read `[]` as a request of defaults.
    let array = start(serde_json::json!([])).await.unwrap();
    assert_eq!(array.status(), StatusCode::BAD_REQUEST);
    assert!(error_of(array).await.message.contains("JSON object"));

    let response = start(serde_json::json!({"parameters": {"seconds": "30"}}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let status: VmaJobStatus = response.json().await.unwrap();
    let JobProcessState::Running {
        process, found_by, ..
    } = status.state
    else {
        panic!("not running: {status:?}");
    };
    assert_eq!(found_by, FoundBy::Started);
    assert_eq!(
        vma_watchdog::launcher::proc_identity(process.pid).unwrap(),
        process
    );
    let environ = std::fs::read(format!("/proc/{}/environ", process.pid)).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("MIGRATEKIT_JOB_ID=job-7"));
    assert!(environ.contains("MIGRATEKIT_PROGRESS_JOB_ID=job-7"));
    // Its own session: it is the leader of a session that is not ours.
    let sid = unsafe { libc::getsid(process.pid as i32) };
    assert_eq!(sid, process.pid as i32);

    let again = start(serde_json::json!({"parameters": {"seconds": "30"}}))
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(error_of(again).await.error, "job_running");

    unsafe { libc::kill(process.pid as i32, libc::SIGKILL) };
    let signal = support::exit_signal(&client, &server.url("/api/v1/jobs/job-7")).await;
    assert_eq!(signal, Some(9));
    let jobs: Vec<VmaJobStatus> = get_json(&client, &server.url("/api/v1/jobs")).await;
    assert_eq!(jobs.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn track_adopts_a_matching_process_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    let mut sleeper = std::process::Command::new("/bin/sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    let track = |job: &str, pid: u32| {
        client
            .post(server.url(&format!("/api/v1/jobs/{job}/track")))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "pid": pid }))
            .send()
    };
    let response = track("job-t", pid).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let status: VmaJobStatus = response.json().await.unwrap();
    let JobProcessState::Running {
        process, found_by, ..
    } = status.state
    else {
        panic!("not running: {status:?}");
    };
    assert_eq!(found_by, FoundBy::Tracked);
    assert_eq!(
        process.start_time,
        vma_watchdog::launcher::proc_start_time(pid).unwrap()
    );

    let wrong_name = track("job-u", std::process::id()).await.unwrap();
    // Not migratekit by its name: 403 like any other process that is not migratekit.
    assert_eq!(wrong_name.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_of(wrong_name).await.error, "process_name_mismatch");
    // The right name from another file: a copy is not the configured binary.
    let copy = dir.path().join("sleep");
    std::fs::copy("/bin/sleep", &copy).unwrap();
    let mut impostor = std::process::Command::new(&copy).arg("30").spawn().unwrap();
    let refused = track("job-w", impostor.id()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let body = error_of(refused).await;
    assert_eq!(body.error, "not_migratekit");
    assert!(
        body.message.contains("device and inode"),
        "{}",
        body.message
    );
    impostor.kill().unwrap();
    impostor.wait().unwrap();
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let gone = track("job-v", pid).await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_of(gone).await.error, "no_such_process");
    server.stop().await;
}

#[tokio::test]
async fn health_needs_no_token_and_shows_the_outbox_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (mut state, jobs) = support::state(dir.path(), sleep_launcher());
    let outbox =
        vma_watchdog::outbox::Outbox::open(&dir.path().join("outbox"), Default::default()).unwrap();
    let outbox = std::sync::Arc::new(outbox);
    state.outbox = Some(outbox.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = support::serve_on(listener, state, jobs);
    outbox
        .append(api::ProcessEvent {
            event_id: uuid::Uuid::new_v4(),
            kind: api::ProcessEventKind::DiedWhileUnwatched,
            job_id: api::JobId::parse("job-h").unwrap(),
            process: api::ProcessIdentity {
                pid: 1,
                start_time: 1,
            },
            exit: None,
            observed_at: chrono::Utc::now(),
            detector: api::Detector::Registry,
            last_progress: None,
        })
        .unwrap();
    let health: serde_json::Value = reqwest::get(server.url("/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["outbox"]["queued"], 1);
    assert_eq!(health["outbox"]["delivered"], 0);
    assert!(health["outbox"]["oldest_age_seconds"].is_number());
    server.stop().await;
}

/// The document is served without a token at `/openapi.json`, and it is the committed copy
/// (`docs/openapi/vma-watchdog.json`, checked by tests/openapi_doc.rs); the plain progress
/// listener does not serve it.
#[tokio::test]
async fn the_openapi_document_is_served_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let response = reqwest::get(server.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: serde_json::Value = response.json().await.unwrap();
    let committed: serde_json::Value =
        serde_json::from_str(&vma_watchdog::http::openapi::document_json()).unwrap();
    assert_eq!(doc, committed);
    assert!(doc["paths"]["/api/v1/jobs/{job_id}/start"].is_object());
    server.stop().await;
}
