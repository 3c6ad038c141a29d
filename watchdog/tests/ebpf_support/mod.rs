//! Shared fixtures of the eBPF detector tests: a detector per test matching a name of its
//! own, the helper process started under that name, and a memory cgroup for OOM kills.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use api::{ExitStatus, ProcessIdentity};
use tokio::sync::mpsc::Receiver;
use vma_watchdog::detector::DetectorEvent;
use vma_watchdog::detector::ebpf::{
    EbpfDetector, EbpfOptions, ExitMode, VMLINUX_BTF, object_built,
};

pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long "no event" is waited for. Events arrive in well under a millisecond here.
pub const QUIET: Duration = Duration::from_millis(300);

pub fn skip_reason() -> Option<String> {
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
pub struct Env {
    pub detector: EbpfDetector,
    pub events: Receiver<DetectorEvent>,
    pub name: String,
    exe: PathBuf,
    dir: tempfile::TempDir,
}

impl Env {
    /// `None` (after printing SKIP) when the test cannot run here.
    pub fn start(name: &str, signal_live: bool) -> Option<Env> {
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
        let live = matches!(detector.exit_mode(), ExitMode::SignalLive);
        if signal_live {
            assert!(live, "the detector ignored force_signal_live");
        } else if live {
            // Kernels before `group_dead` (5.x, 6.1) take the signal->live path on their own;
            // the test's assertions hold on either path, so it runs on that one.
            eprintln!(
                "NOTE: this kernel's sched_process_exit has no group_dead field; {name} runs on the signal->live path"
            );
        }
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
    pub fn spawn(&self, args: &[&str]) -> Helper {
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
    pub async fn next_for(&mut self, pid: u32) -> DetectorEvent {
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
    pub async fn assert_quiet(&mut self, pid: u32) {
        let deadline = tokio::time::Instant::now() + QUIET;
        while let Ok(event) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            let event = event.expect("detector channel open");
            assert_ne!(event_pid(&event), pid, "unexpected event {event:?}");
        }
    }

    pub async fn expect_started(&mut self, helper: &Helper) {
        let event = self.next_for(helper.id.pid).await;
        assert_eq!(
            event,
            DetectorEvent::Started {
                process: helper.id,
                comm: self.name.clone()
            }
        );
    }

    pub async fn expect_exited(&mut self, helper: &Helper, exit: ExitStatus) {
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

    pub fn assert_no_read_errors(&self) {
        let stats = self.detector.stats().expect("stats readable");
        assert_eq!(
            stats.read_errors, 0,
            "kernel reads failed: offsets wrong? {stats:?}"
        );
        assert_eq!(stats.events_dropped, 0, "{stats:?}");
    }
}

pub struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
    pub id: ProcessIdentity,
}

impl Helper {
    pub fn kill(&self, signal: i32) {
        // SAFETY: kill() on our own child, which is not reaped yet, so the pid is still its.
        assert_eq!(unsafe { libc::kill(self.id.pid as i32, signal) }, 0);
    }

    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("helper output");
        line.trim().to_owned()
    }

    pub fn send_line(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin piped");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("write to helper");
    }

    pub fn reap(mut self) {
        let _ = self.child.wait();
    }
}

pub fn event_pid(event: &DetectorEvent) -> u32 {
    match event {
        DetectorEvent::Started { process, .. } | DetectorEvent::Exited { process, .. } => {
            process.pid
        }
    }
}

/// `(pid, start time)` from `/proc/<pid>/stat` field 22, as the rest of the watchdog reads it.
pub fn identity(pid: u32) -> ProcessIdentity {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    let after_comm = &stat[stat.rfind(')').expect("comm ends") + 1..];
    let start_time = after_comm
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .expect("field 22");
    ProcessIdentity { pid, start_time }
}

pub fn killed(signal: i32, core_dumped: bool) -> ExitStatus {
    ExitStatus {
        code: None,
        signal: Some(signal),
        core_dumped,
        oom_killed: false,
    }
}

pub fn exited(code: i32) -> ExitStatus {
    ExitStatus {
        code: Some(code),
        signal: None,
        core_dumped: false,
        oom_killed: false,
    }
}

/// Waits until the leader thread of `pid` is a zombie while the process lives on.
pub fn wait_leader_zombie(pid: u32) {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while std::time::Instant::now() < deadline {
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

/// A memory cgroup (v1) with a small limit, created under this process's own memory cgroup
/// and removed on drop.
pub struct MemCgroup(PathBuf);

impl MemCgroup {
    pub fn create(name: &str, limit_bytes: u64) -> Option<MemCgroup> {
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

    pub fn add(&self, pid: u32) {
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
