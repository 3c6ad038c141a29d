//! Privileged tests of the eBPF detector against the real kernel and real processes.
//!
//! They need root, `/sys/kernel/btf/vmlinux`, tracefs and the eBPF object built into the
//! binary (`cargo xtask build-ebpf` before `cargo test`); without one of them each test prints
//! `SKIP: <why>` and returns.
//!
//! Every test runs its own detector matching a name of its own: the helper
//! `ebpf-test-child` is started through a symlink with that name (the kernel takes `comm` from
//! the name exec'd), so tests running in parallel never see each other's processes.
//!
//! Each scenario runs twice: with the tracepoint's `group_dead` field (this kernel) and with
//! the `signal->live` path that kernels without the field (5.x, 6.1) use.
//!
//! The SIGSEGV test needs a core_pattern that writes a core (the default `core` does; the
//! helper sets RLIMIT_CORE itself and runs in a temporary directory).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use api::{ExitStatus, ProcessIdentity};
use tokio::sync::mpsc::Receiver;
use vma_watchdog::detector::ebpf::{
    EbpfDetector, EbpfOptions, ExitMode, VMLINUX_BTF, object_built,
};
use vma_watchdog::detector::{Detector, DetectorEvent};

const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long "no event" is waited for. Events arrive in well under a millisecond here.
const QUIET: Duration = Duration::from_millis(300);

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: the eBPF detector needs root".into());
    }
    if !std::path::Path::new(VMLINUX_BTF).exists() {
        return Some(format!("{VMLINUX_BTF} missing: kernel without BTF"));
    }
    if !object_built() {
        return Some("eBPF object not built into this binary: run `cargo xtask build-ebpf`".into());
    }
    None
}

/// One test's detector, its name and its helper symlink.
struct Env {
    detector: EbpfDetector,
    events: Receiver<DetectorEvent>,
    name: String,
    exe: PathBuf,
    dir: tempfile::TempDir,
}

impl Env {
    /// `None` (after printing SKIP) when the test cannot run here.
    fn start(name: &str, signal_live: bool) -> Option<Env> {
        // The kernel keeps 15 bytes of a name; use exactly what it will report.
        let name = &name[..name.len().min(15)];
        if let Some(why) = skip_reason() {
            eprintln!("SKIP: {why}");
            return None;
        }
        let options = EbpfOptions {
            match_names: vec![name.to_owned()],
            force_signal_live: signal_live,
        };
        let (detector, events) = EbpfDetector::start_with(&options).expect("eBPF detector starts");
        assert_eq!(
            matches!(detector.exit_mode(), ExitMode::SignalLive),
            signal_live
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let exe = dir.path().join(name);
        symlink(env!("CARGO_BIN_EXE_ebpf-test-child"), &exe).expect("symlink to the helper");
        Some(Env {
            detector,
            events,
            name: name.to_owned(),
            exe,
            dir,
        })
    }

    /// Starts the helper and waits for its `ready` line (so it has exec'd and runs its threads).
    fn spawn(&self, args: &[&str]) -> Helper {
        let mut child = Command::new(&self.exe)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("helper starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("helper prints ready");
        assert_eq!(line.trim(), "ready");
        let id = identity(child.id());
        Helper {
            stdin: child.stdin.take(),
            child,
            stdout,
            id,
        }
    }

    /// The next event about `pid`, skipping others; panics after [`EVENT_TIMEOUT`].
    async fn next_for(&mut self, pid: u32) -> DetectorEvent {
        loop {
            let event = tokio::time::timeout(EVENT_TIMEOUT, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no event for pid {pid} within {EVENT_TIMEOUT:?}"))
                .expect("detector channel open");
            if event_pid(&event) == pid {
                return event;
            }
        }
    }

    /// Asserts that nothing about `pid` arrives for [`QUIET`].
    async fn assert_quiet(&mut self, pid: u32) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(event) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            let event = event.expect("detector channel open");
            assert_ne!(event_pid(&event), pid, "unexpected event {event:?}");
        }
    }

    async fn expect_started(&mut self, helper: &Helper) {
        let event = self.next_for(helper.id.pid).await;
        assert_eq!(
            event,
            DetectorEvent::Started {
                process: helper.id,
                comm: self.name.clone()
            }
        );
    }

    async fn expect_exited(&mut self, helper: &Helper, exit: ExitStatus) {
        match self.next_for(helper.id.pid).await {
            DetectorEvent::Exited {
                process,
                exit: got,
                comm,
                ktime_ns,
            } => {
                assert_eq!(
                    process, helper.id,
                    "identity (pid, start time) of the dead process"
                );
                assert_eq!(got, exit, "exit status");
                assert_eq!(comm, self.name);
                assert!(ktime_ns.is_some_and(|t| t > 0));
            }
            other => panic!("expected an exit, got {other:?}"),
        }
    }

    fn assert_no_read_errors(&self) {
        let stats = self.detector.stats().expect("stats readable");
        assert_eq!(
            stats.read_errors, 0,
            "kernel reads failed: offsets wrong? {stats:?}"
        );
        assert_eq!(stats.events_dropped, 0, "{stats:?}");
    }
}

struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    id: ProcessIdentity,
}

impl Helper {
    fn kill(&self, signal: i32) {
        // SAFETY: kill() on our own child, which is not reaped yet, so the pid is still its.
        assert_eq!(unsafe { libc::kill(self.id.pid as i32, signal) }, 0);
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("helper output");
        line.trim().to_owned()
    }

    fn send_line(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin piped");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("write to helper");
    }

    fn reap(mut self) {
        let _ = self.child.wait();
    }
}

fn event_pid(event: &DetectorEvent) -> u32 {
    match event {
        DetectorEvent::Started { process, .. } | DetectorEvent::Exited { process, .. } => {
            process.pid
        }
    }
}

/// `(pid, start time)` from `/proc/<pid>/stat` field 22, as the rest of the watchdog reads it.
fn identity(pid: u32) -> ProcessIdentity {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let after_comm = &stat[stat.rfind(')').expect("comm ends") + 1..];
    let start_time = after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .expect("field 22");
    ProcessIdentity { pid, start_time }
}

fn killed(signal: i32, core_dumped: bool) -> ExitStatus {
    ExitStatus {
        code: None,
        signal: Some(signal),
        core_dumped,
        oom_killed: false,
    }
}

fn exited(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        signal: None,
        core_dumped: false,
        oom_killed: false,
    }
}

/// Waits until the leader thread of `pid` is a zombie while the process lives on.
fn wait_leader_zombie(pid: u32) {
    for _ in 0..500 {
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap_or_default();
        if stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z'))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("leader of {pid} did not exit");
}

async fn killed_by_signal(name: &str, live: bool, signal: i32) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let helper = env.spawn(&["4", "hold"]);
    env.expect_started(&helper).await;
    helper.kill(signal);
    env.expect_exited(&helper, killed(signal, false)).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn exit_code_3(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let helper = env.spawn(&["4", "exit", "3"]);
    env.expect_started(&helper).await;
    env.expect_exited(&helper, exited(3)).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn segv_with_core(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let helper = env.spawn(&["4", "segv"]);
    env.expect_started(&helper).await;
    env.expect_exited(&helper, killed(libc::SIGSEGV, true))
        .await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn thread_exit_is_not_a_death(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let mut helper = env.spawn(&["4", "thread-exit"]);
    env.expect_started(&helper).await;
    assert_eq!(helper.line(), "thread-exited");
    env.assert_quiet(helper.id.pid).await;
    helper.kill(libc::SIGKILL);
    env.expect_exited(&helper, killed(libc::SIGKILL, false))
        .await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

async fn leader_exit_then_last_thread(name: &str, live: bool, then: &str, exit: ExitStatus) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let mut helper = env.spawn(&["4", "leader-exit", then]);
    env.expect_started(&helper).await;
    wait_leader_zombie(helper.id.pid);
    env.assert_quiet(helper.id.pid).await;
    helper.send_line();
    env.expect_exited(&helper, exit).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
}

macro_rules! both_paths {
    ($($name:ident => |$n:ident, $live:ident| $body:expr;)*) => {
        mod group_dead {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let ($n, $live) = (concat!("wdg-", stringify!($name)), false);
                $body.await
            })*
        }
        mod signal_live {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let ($n, $live) = (concat!("wdl-", stringify!($name)), true);
                $body.await
            })*
        }
    };
}

both_paths! {
    sigkill => |n, live| killed_by_signal(n, live, libc::SIGKILL);
    sigterm => |n, live| killed_by_signal(n, live, libc::SIGTERM);
    exit3 => |n, live| exit_code_3(n, live);
    segv_core => |n, live| segv_with_core(n, live);
    thread_exit => |n, live| thread_exit_is_not_a_death(n, live);
    leader_ret => |n, live| leader_exit_then_last_thread(n, live, "none", exited(0));
    leader_exit4 => |n, live| leader_exit_then_last_thread(n, live, "4", exited(4));
}

/// A process watched by tgid (its name matches nothing) is reported; after `unwatch` it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_tgid_without_name_match() {
    let Some(mut env) = Env::start("wd-no-such-name", false) else {
        return;
    };
    let mut watched = Command::new("sleep")
        .arg("100")
        .spawn()
        .expect("sleep starts");
    let mut unwatched = Command::new("sleep")
        .arg("100")
        .spawn()
        .expect("sleep starts");
    let (w, u) = (identity(watched.id()), identity(unwatched.id()));
    env.detector.watch(w).expect("watch");
    env.detector.watch(u).expect("watch");
    env.detector.unwatch(u).expect("unwatch");
    env.detector.unwatch(u).expect("unwatching twice is fine");
    watched.kill().expect("kill");
    unwatched.kill().expect("kill");
    match env.next_for(w.pid).await {
        DetectorEvent::Exited {
            process,
            exit,
            comm,
            ..
        } => {
            assert_eq!(
                (process, exit, comm.as_str()),
                (w, killed(libc::SIGKILL, false), "sleep")
            );
        }
        other => panic!("expected an exit, got {other:?}"),
    }
    env.assert_quiet(u.pid).await;
    let _ = (watched.wait(), unwatched.wait());
    env.assert_no_read_errors();
}

/// 2,000 exits of unrelated processes while the detector watches reach user space as nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_exits_produce_no_events() {
    let Some(mut env) = Env::start("wd-quiet-match", false) else {
        return;
    };
    let mut keep = Command::new("sleep")
        .arg("100")
        .spawn()
        .expect("sleep starts");
    env.detector.watch(identity(keep.id())).expect("watch");
    let before = env.detector.stats().expect("stats");
    for _ in 0..2000 {
        let status = Command::new("true").status().expect("true runs");
        assert!(status.success());
    }
    let after = env.detector.stats().expect("stats");
    assert!(
        after.exits_seen - before.exits_seen >= 2000,
        "the exit program ran: {before:?} -> {after:?}"
    );
    assert!(
        tokio::time::timeout(QUIET, env.events.recv())
            .await
            .is_err(),
        "an event reached user space"
    );
    assert_eq!(
        after.events_sent, before.events_sent,
        "the kernel sent events: {after:?}"
    );
    keep.kill().expect("kill");
    let _ = keep.wait();
    env.assert_no_read_errors();
}

/// A memory cgroup (v1) with a small limit, created under this process's own memory cgroup
/// and removed on drop.
struct MemCgroup(PathBuf);

impl MemCgroup {
    fn create(name: &str, limit_bytes: u64) -> Option<MemCgroup> {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let own = cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_owned())
        })?;
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/memory{own}/{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).ok()?;
        let cgroup = MemCgroup(dir);
        std::fs::write(
            cgroup.0.join("memory.limit_in_bytes"),
            limit_bytes.to_string(),
        )
        .ok()?;
        // Without swap accounting limited too, the kernel could swap instead of killing.
        let memsw = cgroup.0.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            std::fs::write(memsw, limit_bytes.to_string()).ok()?;
        }
        Some(cgroup)
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).expect("move into cgroup");
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A process killed by the OOM killer of its memory cgroup carries the OOM flag (and SIGKILL).
async fn oom_kill(name: &str, live: bool) {
    let Some(mut env) = Env::start(name, live) else {
        return;
    };
    let Some(cgroup) = MemCgroup::create(name, 64 << 20) else {
        eprintln!("SKIP: cannot create a cgroup v1 memory group under /sys/fs/cgroup/memory");
        return;
    };
    let mut helper = env.spawn(&["2", "oom"]);
    env.expect_started(&helper).await;
    cgroup.add(helper.id.pid);
    helper.send_line();
    let oom = ExitStatus {
        code: None,
        signal: Some(libc::SIGKILL),
        core_dumped: false,
        oom_killed: true,
    };
    env.expect_exited(&helper, oom).await;
    env.assert_quiet(helper.id.pid).await;
    env.assert_no_read_errors();
    helper.reap();
    drop(cgroup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_killed_group_dead() {
    oom_kill("wdg-oom", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_killed_signal_live() {
    oom_kill("wdl-oom", true).await;
}
