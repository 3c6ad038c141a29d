//! `POST /api/v1/jobs/{id}/stop`: SIGTERM to a job's running migratekit (what the OMA asks
//! when an operator cancels the job), never to another process, and a clear answer otherwise.

mod support;

use api::{ErrorBody, JobProcessState, VmaJobStatus};
use reqwest::StatusCode;
use support::{TOKEN, exit_signal, serve_on, sleep_launcher, state};

#[tokio::test]
async fn stop_terminates_the_running_process_and_says_when_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let (state, jobs) = state(dir.path(), sleep_launcher());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_on(listener, state, jobs);
    let client = reqwest::Client::new();
    let stop = |job: &str| {
        client
            .post(server.url(&format!("/api/v1/jobs/{job}/stop")))
            .bearer_auth(TOKEN)
            .send()
    };

    let unknown = stop("job-x").await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        unknown.json::<ErrorBody>().await.unwrap().error,
        "unknown_job"
    );

    let started = client
        .post(server.url("/api/v1/jobs/job-1/start"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"parameters": {"seconds": "300"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::CREATED);
    let anonymous = client
        .post(server.url("/api/v1/jobs/job-1/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let stopped = stop("job-1").await.unwrap();
    assert_eq!(stopped.status(), StatusCode::ACCEPTED);
    let status: VmaJobStatus = stopped.json().await.unwrap();
    assert!(
        matches!(status.state, JobProcessState::Running { .. }),
        "{status:?}"
    );
    let signal = exit_signal(&client, &server.url("/api/v1/jobs/job-1")).await;
    assert_eq!(signal, Some(libc::SIGTERM));

    let again = stop("job-1").await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let body: ErrorBody = again.json().await.unwrap();
    assert_eq!(body.error, "not_running");
    assert!(body.message.contains("job-1"), "{}", body.message);
    server.stop().await;
}

#[test]
fn a_recycled_pid_is_never_signalled() {
    let mut child = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    let pid = child.id();
    let real = vma_watchdog::launcher::proc_identity(pid).unwrap();
    // The same pid with another start time: the process the caller means is gone.
    let stale = api::ProcessIdentity {
        pid,
        start_time: real.start_time + 1,
    };
    let err = vma_watchdog::signal::send(stale, libc::SIGTERM).unwrap_err();
    assert!(
        matches!(err, vma_watchdog::signal::SignalError::Gone { .. }),
        "{err}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the sleep was signalled"
    );
    vma_watchdog::signal::send(real, libc::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM)
    );
}
