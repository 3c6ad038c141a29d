//! Privileged: a stderr that takes no more lines (a stuck journal, a full pipe nobody reads)
//! does not stop the watchdog. Its stderr here is a pipe of one page, filled before it starts:
//! every write to it would block. The watchdog still comes up, sees a stand-in die and queues
//! the death in its outbox; once the pipe is read, the queued lines follow, the death's among
//! them.
//!
//! Run: `cargo test -p vma-watchdog --test blocked_log` as root.

mod common;
mod fake_oma;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::ProcessEventKind;
use common::{Standin, TIMEOUT, journal_for, privileged, secret};

/// The watchdog, killed should the test fail before it stops it.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_stderr_that_takes_nothing_stalls_no_death() {
    if !privileged("a_stderr_that_takes_nothing_stalls_no_death") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut reader, writer, stuffed) = test_support::stuffed_pipe().unwrap();
    let port = fake_oma::free_port();
    let mut watchdog = Daemon(
        Command::new(env!("CARGO_BIN_EXE_vma-watchdog"))
            .args(["--log-format", "json", "--scan-interval-ms", "100"])
            .args([
                "--detector",
                "auto",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--state-dir")
            .arg(&state)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(writer))
            .spawn()
            .expect("start vma-watchdog"),
    );

    // Up and answering, though not one of its lines has been written.
    let deadline = Instant::now() + TIMEOUT;
    let health = loop {
        let answer = match reqwest::get(format!("http://127.0.0.1:{port}/health")).await {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if let Some(health) = answer {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog did not answer within {TIMEOUT:?} while its stderr was full"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(health["log"]["dropped_lines"].is_u64(), "{health}");

    // A stand-in found by the scan or the exec event, killed: its death is queued for the OMA.
    let s = Standin::start(dir.path(), "job-blocked-log", &secret(), &[]);
    let deadline = Instant::now() + TIMEOUT;
    while journal_for(&state, s.pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stand-in was not seen within {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.kill(libc::SIGKILL);
    let pid = s.pid;
    let deadline = Instant::now() + TIMEOUT;
    while !journal_for(&state, pid)
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
    let mut log = Vec::new();
    reader.read_to_end(&mut log).unwrap();
    let status = watchdog.0.wait().unwrap();
    assert!(status.success(), "the watchdog exited with {status}");
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
