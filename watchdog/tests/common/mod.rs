//! Harness for the privileged integration tests: the real `vma-watchdog` binary, the real
//! stand-in `migratekit`, real signals. Each test gets its own state directory; the watchdogs
//! of tests running in parallel also see each other's stand-ins, so every assertion is about
//! one pid.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any awaited log line may take. Generous: this is about correctness, not speed.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// True when the tests can run; otherwise prints why they are skipped.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: {test}: needs root (to read other processes' /proc and to kill them)");
        return false;
    }
    true
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vma-watchdog"))
        .parent()
        .expect("the watchdog binary lives in a target directory")
        .to_owned()
}

/// The stand-in `migratekit` next to the watchdog binary, built once per test run with the
/// same profile (cargo does not build other packages' binaries for a package's tests).
pub fn standin_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = target_dir();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args([
                "build",
                "--quiet",
                "-p",
                "migratekit-standin",
                "--bin",
                "migratekit",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd
                .status()
                .expect("run cargo to build the stand-in migratekit");
            assert!(status.success(), "building the stand-in migratekit failed");
            let bin = dir.join("migratekit");
            assert!(bin.exists(), "no stand-in at {}", bin.display());
            bin
        })
        .clone()
}

/// Log lines of a running watchdog, parsed as JSON, plus the raw text.
#[derive(Default)]
struct Log {
    lines: Vec<Value>,
    raw: String,
}

/// A running `vma-watchdog --log-format json`: the real binary as a child process, its log
/// read line by line (not the system harness's watchdog in `tests/src/watchdog.rs`).
pub struct WatchdogProcess {
    child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    /// The detector it runs (`procfs`, `ebpf`), from its ready line.
    pub detector: String,
}

impl WatchdogProcess {
    /// Starts the watchdog on `state_dir` with `--detector detector` and waits until it is ready.
    pub fn start(state_dir: &Path, detector: &str) -> Self {
        // Tests run in parallel: each watchdog takes a free port of its own.
        Self::start_with(state_dir, detector, &["--listen", "127.0.0.1:0"], &[])
    }

    /// [`Watchdog::start`] with more arguments and environment variables.
    pub fn start_with(
        state_dir: &Path,
        detector: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vma-watchdog"))
            .args([
                "--log-format",
                "json",
                "--scan-interval-ms",
                "100",
                "--detector",
                detector,
            ])
            .args(extra)
            .envs(env.iter().copied())
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vma-watchdog");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.0.lock().unwrap();
                l.raw.push_str(&line);
                l.raw.push('\n');
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| panic!("watchdog log line is not JSON: {line}"));
                l.lines.push(value);
                sink.1.notify_all();
            }
        });
        let mut w = Self {
            child,
            log,
            detector: String::new(),
        };
        let ready = w.wait_for("watchdog_ready", |v| v["event"] == "watchdog_ready");
        w.detector = ready["detector"].as_str().unwrap().to_owned();
        w
    }

    /// Waits for the first log line matching `pred`; panics with the whole log after TIMEOUT.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        let mut log = self.log.0.lock().unwrap();
        loop {
            if let Some(v) = log.lines.iter().find(|v| pred(v)) {
                return v.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no {what} within {TIMEOUT:?}; log:\n{}",
                log.raw
            );
            log = self.log.1.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// The address of the REST API (its first `api_listening` line).
    pub fn api_addr(&self) -> std::net::SocketAddr {
        let line = self.wait_for("api_listening", |v| v["event"] == "api_listening");
        line["addr"].as_str().unwrap().parse().unwrap()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and waits until it is gone.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        self.raw()
    }

    /// Waits for the event `event` about `pid`.
    pub fn wait_event(&self, event: &str, pid: u32) -> Value {
        self.wait_for(&format!("{event} for pid {pid}"), |v| {
            v["event"] == event && v["pid"] == pid
        })
    }

    /// Every log line about `pid` so far.
    pub fn lines_for(&self, pid: u32) -> Vec<Value> {
        let log = self.log.0.lock().unwrap();
        log.lines
            .iter()
            .filter(|v| v["pid"] == pid)
            .cloned()
            .collect()
    }

    /// The raw log so far.
    pub fn raw(&self) -> String {
        self.log.0.lock().unwrap().raw.clone()
    }

    /// SIGTERM, and checks it stops cleanly with exit status 0. Returns the whole log.
    pub fn stop(mut self) -> String {
        signal(self.child.id(), libc::SIGTERM);
        let status = self.child.wait().unwrap();
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(100));
        let raw = self.raw();
        assert!(
            status.success(),
            "watchdog did not stop cleanly ({status}); log:\n{raw}"
        );
        self.wait_for("watchdog_stopped", |v| v["event"] == "watchdog_stopped");
        raw
    }
}

impl Drop for WatchdogProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running stand-in migratekit, with all its threads up. Not reaped until dropped, so
/// its exit status stays readable in /proc as a zombie, as for a process the test does not own.
pub struct Standin {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its pid.
    pub pid: u32,
}

impl Standin {
    /// Starts `migratekit migrate --vmware-password <secret> --job-id <job> <extra...>` in
    /// `cwd` (where a core dump lands) and waits for its ready line.
    pub fn start(cwd: &Path, job: &str, secret: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(standin_bin());
        cmd.args([
            "migrate",
            "--vmware-endpoint",
            "vc.example",
            "--vmware-username",
            "admin",
        ])
        .args(["--vmware-password", secret, "--vmware-path", "/dc/vm/test"])
        .args(["--job-id", job])
        .args(extra);
        Self::spawn(cmd, cwd)
    }

    /// Starts the stand-in from a prepared command.
    pub fn spawn(mut cmd: Command, cwd: &Path) -> Self {
        let mut child = cmd
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the stand-in migratekit");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep reading so the stand-in never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(TIMEOUT)
            .expect("stand-in ready line")
            .unwrap()
            .unwrap();
        assert!(
            line.starts_with("migratekit-standin ready"),
            "unexpected first line {line:?}"
        );
        let pid = child.id();
        assert!(
            line.contains(&format!("pid={pid} ")),
            "ready line {line:?} of pid {pid}"
        );
        Self {
            stdin: child.stdin.take(),
            child,
            pid,
        }
    }

    /// Sends a signal.
    pub fn kill(&self, sig: i32) {
        signal(self.pid, sig);
    }

    /// Tells the stand-in to end the way its flags say (a line on stdin).
    pub fn trigger(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Reaps it (after the watchdog has seen the death).
    pub fn reap(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Its start time (field 22 of /proc/<pid>/stat).
    pub fn start_time(&self) -> u64 {
        vma_watchdog::proc_reader::read_stat(self.pid)
            .unwrap()
            .unwrap()
            .start_time
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// A secret password unique to this test.
pub fn secret() -> String {
    format!("pw-{}-Zq9", uuid::Uuid::new_v4().simple())
}

/// Asserts that `secret` is in none of the files under `dir` and in no log text given.
pub fn assert_secret_absent(secret: &str, dir: &Path, logs: &[&str]) {
    for log in logs {
        assert!(!log.contains(secret), "the secret reached a log");
    }
    let mut checked = 0;
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap();
        let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
        assert!(!found, "the secret reached {}", entry.display());
        checked += 1;
    }
    assert!(
        checked > 0,
        "no state files to check under {}",
        dir.display()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Asserts the exit fields of a death log line.
pub fn assert_exit(line: &Value, code: Option<i32>, signal: Option<i32>, core: Option<bool>) {
    assert_eq!(
        line["exit_code"],
        serde_json::json!(code),
        "exit_code in {line}"
    );
    assert_eq!(
        line["signal"],
        serde_json::json!(signal),
        "signal in {line}"
    );
    assert_eq!(
        line["core_dumped"],
        serde_json::json!(core),
        "core_dumped in {line}"
    );
}

/// The events about `pid` in the outbox: without an OMA nothing is ever removed from it, so
/// it holds every event the daemon recorded.
pub fn outbox_events_for(state: &Path, pid: u32) -> Vec<api::ProcessEvent> {
    let dir = state.join(vma_watchdog::outbox::DIR_NAME);
    vma_watchdog::outbox::read_pending(&dir)
        .unwrap()
        .into_iter()
        .filter(|e| e.process.pid == pid)
        .collect()
}

/// Waits until the outbox's file holds `events` events about `pid`, and returns them; panics
/// after TIMEOUT. The registry shows a death before the outbox has appended it (one fsync
/// later), so a test that saw the death there waits here for the event.
#[allow(dead_code)]
pub async fn wait_outbox_events(state: &Path, pid: u32, events: usize) -> Vec<api::ProcessEvent> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let held = outbox_events_for(state, pid);
        if held.len() >= events {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox held {held:?} after {TIMEOUT:?}, not {events} events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs each `case(detector)` as two tests, `procfs::case` and `auto::case`, each skipped with a
/// message when not privileged. For the files that declare `#[macro_use] mod common;` and bring
/// `privileged` into scope.
#[allow(unused_macros)]
macro_rules! both_detectors {
    ($($case:ident),* $(,)?) => {
        mod procfs {
            $(#[test]
            fn $case() {
                if super::privileged(concat!(stringify!($case), " (procfs)")) {
                    super::$case("procfs");
                }
            })*
        }
        mod auto {
            $(#[test]
            fn $case() {
                if super::privileged(concat!(stringify!($case), " (auto)")) {
                    super::$case("auto");
                }
            })*
        }
    };
}
