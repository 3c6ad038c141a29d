//! The `oma` binary itself: starts on a fresh SQLite file, serves, and never writes a token
//! to its log, even at debug level.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::{KillOnDrop, free_port, read_to_end_within, stuffed_pipe, wait_within};

const TOKEN: &str = "binary-test-operator-token-42";
const VMA_TOKEN: &str = "binary-test-vma-token-000042";

#[tokio::test]
async fn the_server_starts_migrates_serves_and_keeps_tokens_out_of_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_oma"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--poll-interval-secs",
            "0.1",
        ])
        .arg("--database")
        .arg(&db)
        .env("OMA_OPERATOR_TOKEN", TOKEN)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start oma");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("oma logged its address");
        log.push(line.clone());
        let value: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if value["fields"]["message"] == "oma listening" {
            break value["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };
    assert!(db.exists(), "the database file is created at start");
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    assert_eq!(
        http.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    create_job(&http, &base).await;
    let wrong = http
        .get(format!("{base}/api/v1/jobs"))
        .bearer_auth(VMA_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_gracefully(&mut child);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    // Until the reader sees the end of the server's output (its sender then goes): the
    // server has exited, so that comes at once, however slowly the reader runs.
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(30)) {
        log.push(line);
    }
    let all = format!("{}\n{stderr}", log.join("\n"));
    assert!(all.contains("job created"), "the log shows the work: {all}");
    for secret in [TOKEN, VMA_TOKEN] {
        assert!(!all.contains(secret), "a token reached the log");
    }
}

/// Registers a VMA at an address where nothing listens and creates a job on it: recorded,
/// pending, 202.
async fn create_job(http: &reqwest::Client, base: &str) {
    let resp = http
        .put(format!("{base}/api/v1/vmas/vma-1"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"base_url": "http://127.0.0.1:9", "token": VMA_TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = serde_json::json!({"vm_context_id": "c", "vm_name": "v", "vma_id": "vma-1"});
    let resp = http
        .post(format!("{base}/api/v1/jobs"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
}

/// Stops the server with SIGTERM (its graceful path) and waits for it.
fn stop_gracefully(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// Starts `oma` on a fresh database in `dir` at `port`, logging JSON at debug level into
/// `out` (its stdout and its stderr, as under systemd where both go to the journal).
fn start_logging_into(
    dir: &std::path::Path,
    port: u16,
    out: std::io::PipeWriter,
    extra: &[&str],
) -> KillOnDrop {
    let stderr = out.try_clone().expect("a second descriptor of the pipe");
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_oma"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--log-format", "json"])
            .args(extra)
            .arg("--database")
            .arg(dir.join("oma.db"))
            .env("OMA_OPERATOR_TOKEN", TOKEN)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start oma"),
    )
}

/// `/health` once the server answers 200, though its output takes nothing.
async fn health(http: &reqwest::Client, base: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await
            && r.status() == 200
        {
            return r.json().await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "oma did not answer within 30 s while its stdout was full"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stdout that takes no more lines (a stuck journal, a full pipe nobody reads) stalls
/// nothing: the server comes up and records jobs while not one of its lines can be written;
/// once the pipe is read, the queued lines follow.
#[tokio::test]
async fn a_stdout_that_takes_nothing_stalls_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer, stuffed) = stuffed_pipe().unwrap();
    let port = free_port([127, 0, 0, 1].into()).unwrap();
    let mut oma = start_logging_into(dir.path(), port, writer, &[]);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let up = health(&http, &base).await;
    assert!(up["log_dropped_lines"].is_u64(), "{up}");
    create_job(&http, &base).await;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(oma.0.id().to_string())
        .status();
    let limit = Duration::from_secs(30);
    let log = read_to_end_within(reader, limit).expect("oma's output never ended");
    let status = wait_within(&mut oma.0, limit).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "oma did not stop cleanly: {status:?}"
    );
    let log = String::from_utf8_lossy(&log[stuffed..]).into_owned();
    assert!(
        log.contains("job created"),
        "the queued lines were not written out once stdout was read:\n{log}"
    );
}

/// With the queue full too (four lines), lines are dropped and counted in `/health`, and
/// SIGTERM still ends the server, though its output is never read.
#[tokio::test]
async fn a_full_log_queue_drops_lines_and_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer, _) = stuffed_pipe().unwrap();
    let port = free_port([127, 0, 0, 1].into()).unwrap();
    let mut oma = start_logging_into(dir.path(), port, writer, &["--log-queue-lines", "4"]);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dropped = health(&http, &base).await["log_dropped_lines"].as_u64();
        if dropped.is_some_and(|n| n > 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line dropped within 30 s: {dropped:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(oma.0.id().to_string())
        .status();
    let status = wait_within(&mut oma.0, Duration::from_secs(30)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM did not end oma within 30 s while its log was stuck: {status:?}"
    );
    drop(reader);
}
