//! Every number and text a client sends is checked against `api::bounds` before it is
//! stored: 400 `invalid_field` naming the field, the store unchanged; a long error message
//! is cut, not refused. Over real sockets, from the job's own process.

mod support;

use api::{ErrorBody, FoundBy, StoredProgress};
use reqwest::StatusCode;
use support::{TOKEN, progress_body, sleep_launcher, start};

/// Registers this test process as the job's process: its HTTP client plays migratekit.
fn register_self(server: &support::Server, job_id: &str) {
    use vma_watchdog::http::JobsView;
    let me = vma_watchdog::launcher::proc_identity(std::process::id()).unwrap();
    server
        .jobs
        .register_process(&api::JobId::parse(job_id).unwrap(), me, FoundBy::Tracked)
        .unwrap();
}

async fn post(
    client: &reqwest::Client,
    server: &support::Server,
    body: &serde_json::Value,
) -> reqwest::Response {
    client
        .post(server.url("/api/v1/progress/job-b/update"))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn out_of_range_progress_is_400_naming_the_field_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    register_self(&server, "job-b");
    let client = reqwest::Client::new();
    assert_eq!(
        post(&client, &server, &progress_body(100)).await.status(),
        StatusCode::OK
    );
    let before = server.state.progress.get("job-b").unwrap();
    let cases: [(&str, serde_json::Value, &str); 7] = [
        ("percent", serde_json::json!(-50), "from 0 to 100"),
        ("percent", serde_json::json!(100.5), "from 0 to 100"),
        (
            "total_bytes",
            serde_json::json!(10),
            "at least bytes_transferred",
        ),
        (
            "bytes_transferred",
            serde_json::json!(1u64 << 63),
            "2^63 - 1",
        ),
        ("stage", "s".repeat(257).into(), "at most 256"),
        ("disk_id", "d".repeat(129).into(), "at most 128"),
        ("throughput_bps", serde_json::json!(u64::MAX), "2^63 - 1"),
    ];
    for (field, value, rule) in cases {
        let mut body = progress_body(100);
        body[field] = value;
        let response = post(&client, &server, &body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{field}");
        let error: ErrorBody = response.json().await.unwrap();
        assert_eq!(error.error, "invalid_field", "{field}");
        assert!(
            error.message.contains(&format!("`{field}`")) && error.message.contains(rule),
            "{field}: {}",
            error.message
        );
    }
    assert_eq!(server.state.progress.get("job-b").unwrap(), before);
    server.stop().await;
}

#[tokio::test]
async fn a_long_error_message_is_stored_cut_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    register_self(&server, "job-b");
    let client = reqwest::Client::new();
    let mut body = progress_body(100);
    body["status"] = "failed".into();
    body["error_message"] = format!("copy failed: {}: disk full", "x".repeat(10_000)).into();
    let response = post(&client, &server, &body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let stored: StoredProgress = response.json().await.unwrap();
    let message = stored.update.error_message.unwrap();
    assert!(message.chars().count() <= api::bounds::MAX_ERROR_MESSAGE_CHARS);
    assert!(message.starts_with("copy failed: "), "{message}");
    assert!(message.ends_with(": disk full"), "{message}");
    assert!(message.contains("cut by the VMA watchdog"), "{message}");
    assert_eq!(stored.update.status, Some(api::ProgressStatus::Failed));
    server.stop().await;
}

#[tokio::test]
async fn track_refuses_a_pid_outside_linux_range() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), sleep_launcher()).await;
    let client = reqwest::Client::new();
    for pid in [0u32, 4_194_305, u32::MAX] {
        let response = client
            .post(server.url("/api/v1/jobs/job-t/track"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "pid": pid }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{pid}");
        let error: ErrorBody = response.json().await.unwrap();
        assert_eq!(error.error, "invalid_field");
        assert!(
            error.message.contains("`pid`") && error.message.contains("4194304"),
            "{}",
            error.message
        );
    }
    server.stop().await;
}
