//! `POST /api/v1/jobs/{id}/stop`: SIGTERM to a job's running migratekit (what the OMA asks
//! when an operator cancels the job), never to another process, and a clear answer otherwise.

mod support;

use api::{ErrorBody, JobProcessState, VmaJobStatus};
use reqwest::StatusCode;
use support::{TOKEN, exit_signal, get_json, serve_on, sleep_launcher, state};
use vma_watchdog::launcher::{LauncherConfig, SystemdMode};

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

/// A stop asked twice (the OMA's retry after an answer it lost) signals the process once: a
/// second SIGTERM could cut migratekit's own shutdown short.
#[tokio::test]
async fn a_process_is_sent_sigterm_once_however_often_it_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("terms");
    let ready = dir.path().join("ready");
    // A process that outlives SIGTERM and notes each one it gets.
    let mut launcher = LauncherConfig::new("/bin/sh");
    launcher.args = vec![
        "-c".into(),
        format!(
            "trap 'echo term >> {}' TERM; touch {}; while :; do sleep 0.05; done",
            count.display(),
            ready.display()
        ),
    ];
    launcher.match_names = vec!["sh".into()];
    launcher.systemd = SystemdMode::Never;
    let (state, jobs) = state(dir.path(), launcher);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve_on(listener, state, jobs);
    let client = reqwest::Client::new();
    let started = client
        .post(server.url("/api/v1/jobs/job-1/start"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"parameters": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::CREATED);
    // The trap is set once the shell has touched `ready`; a SIGTERM before would kill it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the shell never got ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let terms = || {
        std::fs::read_to_string(&count)
            .unwrap_or_default()
            .lines()
            .count()
    };
    for round in 0..3 {
        let stopped = client
            .post(server.url("/api/v1/jobs/job-1/stop"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let code = stopped.status();
        assert_eq!(
            code,
            StatusCode::ACCEPTED,
            "{}",
            stopped.text().await.unwrap()
        );
        if round == 0 {
            // The shell runs its trap once its current sleep ends.
            while terms() == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the shell never trapped the first SIGTERM"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        } else {
            // Time for a second SIGTERM, had one been sent, to be trapped as the first was.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
    assert_eq!(terms(), 1, "SIGTERMs received");
    let running: VmaJobStatus = get_json(&client, &server.url("/api/v1/jobs/job-1")).await;
    if let JobProcessState::Running { process, .. } = running.state {
        vma_watchdog::signal::send(process, libc::SIGKILL).unwrap();
    }
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
