//! Privileged: the real daemon, started as in production (eBPF detector, an OMA URL, both
//! tokens) and left idle, stays under a generous resident-memory bound. A memory guard, not a
//! benchmark: the figures are in docs/BENCHMARKS.md ("Watchdog memory"). Without the heap trim
//! after the eBPF load this build idled at 27 MiB (release) and 37 MiB (debug).
//!
//! Run: `cargo test -p vma-watchdog --test idle_memory` as root.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vma_watchdog::detector::ebpf::object_built;
use vma_watchdog::memory::resident_of;

/// Idle RSS bound: about twice the measured 12 MiB (release), 23 MiB (debug).
const BOUND_MIB: u64 = if cfg!(debug_assertions) { 32 } else { 24 };

#[test]
fn the_idle_daemon_stays_under_its_memory_bound() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !object_built() {
        eprintln!("SKIP: needs root and the eBPF object (cargo xtask build-ebpf)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "idle-memory-test-token-0123456789abcdef\n").expect("token");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vma-watchdog"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args([
            "--detector",
            "ebpf",
            "--log-format",
            "json",
            "--vma-id",
            "t",
        ])
        .args(["--oma-url", "http://127.0.0.1:9"])
        .arg("--oma-token-file")
        .arg(&token)
        .arg("--api-token-file")
        .arg(&token)
        .env_remove(vma_watchdog::memory::TUNING_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vma-watchdog");
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("\"watchdog_ready\"") || Instant::now() > deadline);
    std::thread::spawn(move || lines.for_each(drop));
    std::thread::sleep(Duration::from_secs(2));
    let resident = resident_of(Some(pid));
    // SAFETY: kill() on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(ready, "the watchdog did not log watchdog_ready");
    let r = resident.expect("the daemon's /proc status");
    eprintln!("idle RSS {} KiB, peak {} KiB", r.rss / 1024, r.peak / 1024);
    assert!(
        r.rss <= BOUND_MIB * 1024 * 1024,
        "idle RSS {} KiB over {BOUND_MIB} MiB",
        r.rss / 1024
    );
}
