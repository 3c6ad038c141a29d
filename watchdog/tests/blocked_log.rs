//! Privileged: a stderr that takes no more lines (a stuck journal, a full pipe nobody reads)
//! does not stop the watchdog. Its stderr here is a pipe of one page, filled before it starts:
//! every write to it would block. The watchdog still comes up, sees a stand-in die and queues
//! the death in its outbox; once the pipe is read, the queued lines follow, the death's among
//! them. With its log queue full as well, it still stops on SIGTERM.
//!
//! Run: `cargo test -p vma-watchdog --test blocked_log` as root.

mod common;
mod fake_oma;

use std::io::PipeWriter;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::ProcessEventKind;
use common::{Standin, TIMEOUT, outbox_events_for, privileged, secret};
use test_support::{KillOnDrop, read_to_end_within, stuffed_pipe, wait_within};

/// Starts the watchdog on `state` at `port`, logging at debug level into `stderr`, which is
/// its stdout too (as under systemd, where both go to the journal).
fn start(state: &Path, port: u16, stderr: PipeWriter, extra: &[&str]) -> KillOnDrop {
    let stdout = stderr.try_clone().expect("a second descriptor of the pipe");
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_vma-watchdog"))
            .args(["--log-format", "json", "--scan-interval-ms", "100"])
            .args([
                "--detector",
                "auto",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(extra)
            .arg("--state-dir")
            .arg(state)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start vma-watchdog"),
    )
}

/// `/health` once the watchdog answers, though not one of its lines has been written.
async fn health(port: u16) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let answer = match reqwest::get(format!("http://127.0.0.1:{port}/health")).await {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if let Some(health) = answer {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog did not answer within {TIMEOUT:?} while its stderr was full"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stderr_that_takes_nothing_stalls_no_death() {
    if !privileged("a_stderr_that_takes_nothing_stalls_no_death") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (reader, writer, stuffed) = stuffed_pipe().unwrap();
    let port = fake_oma::free_port();
    let mut watchdog = start(&state, port, writer, &[]);
    let up = health(port).await;
    assert!(up["log"]["dropped_lines"].is_u64(), "{up}");

    // A stand-in found by the scan or the exec event, killed: its death is queued for the OMA.
    let s = Standin::start(dir.path(), "job-blocked-log", &secret(), &[]);
    let deadline = Instant::now() + TIMEOUT;
    while outbox_events_for(&state, s.pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stand-in was not seen within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.kill(libc::SIGKILL);
    let pid = s.pid;
    let deadline = Instant::now() + TIMEOUT;
    while !outbox_events_for(&state, pid)
        .iter()
        .any(|e| e.kind == ProcessEventKind::ProcessExited)
    {
        assert!(
            Instant::now() < deadline,
            "the death was not queued within {TIMEOUT:?} while stderr was full"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);

    // Reading the pipe lets the queued lines out; the watchdog stops cleanly meanwhile.
    common::signal(watchdog.0.id(), libc::SIGTERM);
    let log = read_to_end_within(reader, TIMEOUT).expect("the watchdog's stderr never ended");
    let status = wait_within(&mut watchdog.0, TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "the watchdog did not stop cleanly: {status:?}"
    );
    let log = String::from_utf8_lossy(&log[stuffed..]).into_owned();
    let death = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "process_exited" && v["pid"] == pid);
    assert!(
        death.is_some(),
        "the death's line was not written out once stderr was read:\n{log}"
    );
}

/// With the queue full too (four lines, debug level), lines are dropped and counted, and
/// SIGTERM still ends the watchdog, though its stderr is never read.
#[tokio::test]
async fn a_full_log_queue_drops_lines_and_stops_nothing() {
    if !privileged("a_full_log_queue_drops_lines_and_stops_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer, _) = stuffed_pipe().unwrap();
    let port = fake_oma::free_port();
    let state = dir.path().join("state");
    let mut watchdog = start(&state, port, writer, &["--log-queue-lines", "4"]);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let dropped = health(port).await["log"]["dropped_lines"].as_u64();
        if dropped.is_some_and(|n| n > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no line dropped within {TIMEOUT:?}: {dropped:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::signal(watchdog.0.id(), libc::SIGTERM);
    let status = wait_within(&mut watchdog.0, TIMEOUT).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM did not end the watchdog within {TIMEOUT:?} while its log was stuck: {status:?}"
    );
    drop(reader);
}
