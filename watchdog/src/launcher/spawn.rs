//! Spawning migratekit held at a gate until it is registered (see the module docs above).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use api::{JobId, ProcessIdentity, StartJobRequest};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use super::gate::{self, GateCommand, GateListener};
use super::template::{RenderedArg, TemplateError, render};
use super::{LauncherConfig, SystemdMode, proc_identity, systemd_running};

/// How long the launcher waits for a forked child to report its pid.
const PID_TIMEOUT: Duration = Duration::from_secs(10);

/// Why migratekit could not be started. `R` is the caller's registration error.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError<R> {
    /// The request does not fit the VMA's command template.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The configured program is missing or not executable.
    #[error(
        "the configured migratekit program {path} cannot be run: {source}; fix the VMA's launcher configuration"
    )]
    Program {
        /// The program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating the gate pipes or forking failed.
    #[error("starting migratekit failed: {0}; check the VMA's process and file limits")]
    Spawn(#[source] std::io::Error),
    /// The forked child never reported its pid, or its identity could not be read.
    #[error("the new migratekit process could not be identified: {0}; it was not started")]
    Identity(#[source] std::io::Error),
    /// The caller's registration refused the process; it was stopped before it ran.
    #[error("the new migratekit process was not registered, so it was not started: {0}")]
    Registration(#[source] R),
}

/// Where the launched process was placed so that it survives a watchdog restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A transient systemd service of its own, forked by systemd (see [`super::gate`]).
    SystemdService {
        /// The unit's name, without `.service`.
        unit: String,
    },
    /// Its own session; it stays in the watchdog's cgroups (no systemd).
    Session,
    /// Its own session, moved to the root cgroup of a cgroup v2 hierarchy.
    SessionRootCgroup,
}

/// A started migratekit process.
#[derive(Debug)]
pub struct Launched {
    /// Its identity, as registered.
    pub process: ProcessIdentity,
    /// The child handle (a `std` one: tokio's would reap it behind our back, see
    /// [`Launched::wait_for_exit`]); `None` in a systemd unit, where systemd is the parent.
    pub child: Option<Child>,
    /// Where it runs.
    pub placement: Placement,
    argv: Vec<RenderedArg>,
}

impl Launched {
    /// Blocks until the process has exited and returns how, WITHOUT reaping it: while it is
    /// a zombie, a detector that noticed the death can still read its status from `/proc`.
    /// Call [`Launched::reap`] after handing the status on.
    pub fn wait_for_exit(&self) -> std::io::Result<api::ExitStatus> {
        // SAFETY: waitid fills a zeroed siginfo_t for our own child.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            loop {
                let rc = libc::waitid(
                    libc::P_PID,
                    self.process.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                );
                if rc == 0 {
                    break;
                }
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::EINTR) {
                    return Err(error);
                }
            }
            let status = info.si_status();
            Ok(match info.si_code {
                libc::CLD_EXITED => api::ExitStatus {
                    code: Some(status),
                    ..Default::default()
                },
                code => api::ExitStatus {
                    signal: Some(status),
                    core_dumped: code == libc::CLD_DUMPED,
                    ..Default::default()
                },
            })
        }
    }

    /// Reaps the exited process (so no zombie is left) and returns its status; `None` when
    /// it is not the watchdog's child (systemd reaps it).
    pub fn reap(self) -> Option<std::io::Result<std::process::ExitStatus>> {
        self.child.map(|mut child| child.wait())
    }

    /// Its command line with secrets replaced by `<redacted>`, fit for a log line.
    pub fn redacted_argv(&self) -> Vec<String> {
        self.argv
            .iter()
            .map(|a| {
                if a.secret {
                    "<redacted>".to_owned()
                } else {
                    a.value.clone()
                }
            })
            .collect()
    }
}

/// Starts migratekit processes from the configured template.
#[derive(Debug)]
pub struct Launcher {
    config: LauncherConfig,
    /// One launch at a time, so that no other child of ours, forked at the same moment,
    /// holds a copy of this launch's gate pipes while it waits at its own gate.
    lock: tokio::sync::Mutex<()>,
}

impl Launcher {
    /// A launcher for `config`. Logs which way it will start migratekit
    /// (`event=launcher_selected`).
    pub fn new(config: LauncherConfig) -> Self {
        let launcher = Self {
            config,
            lock: tokio::sync::Mutex::new(()),
        };
        match launcher.systemd_tools() {
            Some(tools) => {
                tracing::info!(event = "launcher_selected", launcher = "systemd_service",
                systemd_run = tools.systemd_run, gate = %tools.gate.display(),
                "each migratekit runs in a transient systemd service of its own")
            }
            None => tracing::info!(event = "launcher_selected", launcher = "session",
                systemd = ?launcher.config.systemd, systemd_running = systemd_running(),
                "each migratekit runs in its own session, started by the watchdog"),
        }
        launcher
    }

    /// The configuration.
    pub fn config(&self) -> &LauncherConfig {
        &self.config
    }

    /// Starts migratekit for `job_id`. `register` runs after the process exists (its pid and
    /// start time are known) and before it can execute anything; if it fails, the process is
    /// stopped at the gate and the error is returned.
    pub async fn launch<T, R>(
        &self,
        job_id: &JobId,
        request: &StartJobRequest,
        register: impl FnOnce(ProcessIdentity) -> Result<T, R> + Send + 'static,
    ) -> Result<(Launched, T), LaunchError<R>>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        let argv = render(&self.config, job_id, request)?;
        check_executable(&self.config.program).map_err(|source| LaunchError::Program {
            path: self.config.program.clone(),
            source,
        })?;
        let _one_at_a_time = self.lock.lock().await;
        if let Some(tools) = self.systemd_tools() {
            return self.launch_unit(job_id, argv, &tools, register).await;
        }
        let (pid_r, pid_w) = pipe().map_err(LaunchError::Spawn)?;
        let (go_r, go_w) = pipe().map_err(LaunchError::Spawn)?;
        let (mut cmd, placement) = self.command(job_id, &argv).map_err(LaunchError::Spawn)?;
        install_gate(&mut cmd, pid_w, go_r, self.config.nice);
        let spawned = Arc::new(AtomicBool::new(false));
        let spawned_flag = Arc::clone(&spawned);
        let spawner = tokio::task::spawn_blocking(move || {
            let child = cmd.spawn();
            // Dropping the command closes the parent's copies of the child's pipe ends.
            drop(cmd);
            spawned_flag.store(true, Ordering::SeqCst);
            child
        });
        let move_cgroup = placement == Placement::SessionRootCgroup;
        let gate = tokio::task::spawn_blocking(move || {
            let pid = read_pid(&pid_r, &spawned).map_err(LaunchError::Identity)?;
            let identity = match proc_identity(pid) {
                Ok(identity) => identity,
                Err(e) => {
                    let _ = write_byte(&go_w, b'0');
                    return Err(LaunchError::Identity(e));
                }
            };
            if move_cgroup {
                move_to_root_cgroup(pid);
            }
            match register(identity) {
                Ok(registered) => {
                    write_byte(&go_w, b'1').map_err(LaunchError::Spawn)?;
                    Ok((identity, registered))
                }
                Err(e) => {
                    let _ = write_byte(&go_w, b'0');
                    Err(LaunchError::Registration(e))
                }
            }
        });
        // Await both before looking at either, so no child handle is dropped unreaped.
        let gate = gate.await;
        let child = spawner.await;
        let child = child
            .map_err(|e| LaunchError::Spawn(std::io::Error::other(e)))
            .and_then(|c| c.map_err(LaunchError::Spawn));
        let (process, registered) = match gate {
            Ok(Ok(registered)) => registered,
            Ok(Err(e)) => return Err(stop(child, e)),
            Err(e) => return Err(stop(child, LaunchError::Spawn(std::io::Error::other(e)))),
        };
        // Registered but exec failed: the registered process has already exited (std reaps
        // it), and the registry's detector reports that death like any other.
        let child = child?;
        Ok((
            started(job_id, process, Some(child), placement, argv),
            registered,
        ))
    }

    /// [`Launcher::launch`] in a transient systemd service (see [`super::gate`]): the unit
    /// runs the gate, the watchdog registers the gate's pid once it proves it is in the unit,
    /// then sends it migratekit's command line.
    async fn launch_unit<T, R>(
        &self,
        job_id: &JobId,
        argv: Vec<RenderedArg>,
        tools: &SystemdTools,
        register: impl FnOnce(ProcessIdentity) -> Result<T, R> + Send + 'static,
    ) -> Result<(Launched, T), LaunchError<R>>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let unit = format!("migratekit-{job_id}-{}", &suffix[..8]);
        let listener = GateListener::bind(gate::socket_name(&unit)).map_err(LaunchError::Spawn)?;
        let mut run = self
            .unit_command(tools, job_id, &unit, listener.name())
            .map_err(LaunchError::Spawn)?;
        let command = GateCommand {
            program: self.config.program.clone().into_os_string(),
            args: argv.iter().map(|a| a.value.clone().into()).collect(),
            env: child_env(job_id),
        };
        let gate_unit = unit.clone();
        let handoff = tokio::task::spawn_blocking(move || -> Result<_, LaunchError<R>> {
            let mut run = run.spawn().map_err(LaunchError::<R>::Spawn)?;
            let in_unit = |pid: u32| {
                std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .is_ok_and(|c| gate::in_unit(&c, &gate_unit))
            };
            let run_failed = || match run.try_wait() {
                Ok(Some(status)) if !status.success() => Err(std::io::Error::other(format!(
                    "systemd-run could not start unit {gate_unit} ({status})"
                ))),
                _ => Ok(()),
            };
            let accepted = listener.accept(PID_TIMEOUT, in_unit, run_failed);
            // systemd-run returns once the unit's process exists (Type=exec); reap it.
            let _ = run.kill();
            let _ = run.wait();
            let (stream, pid) = accepted.map_err(LaunchError::Identity)?;
            // On any failure below, the stream is dropped unanswered and the gate exits.
            let identity = proc_identity(pid).map_err(LaunchError::Identity)?;
            // Still in the unit after its start time was read: that start time is the gate's,
            // not a later process's that reused its pid.
            if !in_unit(pid) {
                return Err(LaunchError::Identity(std::io::Error::other(format!(
                    "the gate of unit {gate_unit} (pid {pid}) ended before it was registered"
                ))));
            }
            let registered = register(identity).map_err(LaunchError::Registration)?;
            gate::release(stream, &command).map_err(LaunchError::Spawn)?;
            Ok((identity, registered))
        });
        let (process, registered) = handoff
            .await
            .map_err(|e| LaunchError::Spawn(std::io::Error::other(e)))??;
        let placement = Placement::SystemdService { unit };
        Ok((started(job_id, process, None, placement, argv), registered))
    }

    /// `systemd-run` for one migratekit unit that runs the gate. The unit gets an explicit
    /// description (systemd would otherwise use its command line) and migratekit's priority,
    /// umask and output file as its own properties.
    fn unit_command(
        &self,
        tools: &SystemdTools,
        job_id: &str,
        unit: &str,
        socket: &str,
    ) -> std::io::Result<Command> {
        let mut cmd = Command::new(tools.systemd_run);
        cmd.args([
            "--quiet",
            "--collect",
            "--service-type=exec",
            "--unit",
            unit,
        ])
        .arg(format!("--description=migratekit job {job_id}"))
        .arg(format!("--property=Nice={}", self.config.nice));
        let umask = CHILD_UMASK.load(Ordering::Relaxed);
        if umask != KEEP_UMASK {
            cmd.arg(format!("--property=UMask={umask:04o}"));
        }
        if let Some(dir) = &self.config.log_dir {
            std::fs::create_dir_all(dir)?;
            let log = dir.join(format!("{job_id}.log"));
            for stream in ["StandardOutput", "StandardError"] {
                cmd.arg(format!("--property={stream}=append:{}", log.display()));
            }
        }
        cmd.arg("--").arg(&tools.gate).arg(socket);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        Ok(cmd)
    }

    /// `systemd-run` and the gate, when systemd is to be used and both exist. Checked before
    /// anything starts: a launch that failed after registration would look like a death.
    fn systemd_tools(&self) -> Option<SystemdTools> {
        if self.config.systemd != SystemdMode::Auto || !systemd_running() {
            return None;
        }
        let executable = |p: &std::path::Path| check_executable(p).is_ok();
        let systemd_run = ["/usr/bin/systemd-run", "/bin/systemd-run"]
            .into_iter()
            .find(|p| executable(std::path::Path::new(p)));
        let gate = gate_program().filter(|p| executable(p));
        match (systemd_run, gate) {
            (Some(systemd_run), Some(gate)) => Some(SystemdTools { systemd_run, gate }),
            (run, gate) => {
                tracing::warn!(event = "launcher_systemd_unavailable", systemd_run = ?run, gate = ?gate,
                    "systemd runs but systemd-run or migratekit-gate is missing; migratekit starts in its own session, so a stop of the watchdog's unit with KillMode=control-group would kill it: reinstall the vma-watchdog package");
                None
            }
        }
    }

    fn command(&self, job_id: &str, argv: &[RenderedArg]) -> std::io::Result<(Command, Placement)> {
        let program = &self.config.program;
        let placement = if in_cgroup_v2_subgroup() {
            Placement::SessionRootCgroup
        } else {
            Placement::Session
        };
        let mut cmd = Command::new(program);
        cmd.args(argv.iter().map(|a| &a.value))
            .env_clear()
            .envs(child_env(job_id))
            .stdin(Stdio::null());
        // Never a pipe to the watchdog: it would break (SIGPIPE) when the watchdog restarts.
        match &self.config.log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let log = crate::disk::open_append(&dir.join(format!("{job_id}.log")))?;
                cmd.stdout(log.try_clone()?).stderr(log);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        Ok((cmd, placement))
    }
}

/// Every environment variable whose name starts with this is removed from migratekit's
/// environment: the watchdog's settings and secrets.
pub const CHILD_ENV_REMOVED_PREFIX: &str = "VMA_WATCHDOG_";

/// migratekit's environment: the watchdog's own, less its settings, plus the job id. The
/// watchdog's settings, its tokens among them (`VMA_WATCHDOG_API_TOKEN`,
/// `VMA_WATCHDOG_OMA_TOKEN`, the files they are read from), are none of migratekit's business:
/// a token in its environment is readable by whatever it runs and in every crash report of it.
fn child_env(job_id: &str) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut env: Vec<_> = std::env::vars_os()
        .filter(|(name, _)| {
            !name
                .as_encoded_bytes()
                .starts_with(CHILD_ENV_REMOVED_PREFIX.as_bytes())
                && !matches!(
                    name.to_str(),
                    Some("MIGRATEKIT_JOB_ID" | "MIGRATEKIT_PROGRESS_JOB_ID")
                )
        })
        .collect();
    for name in ["MIGRATEKIT_JOB_ID", "MIGRATEKIT_PROGRESS_JOB_ID"] {
        env.push((name.into(), job_id.into()));
    }
    env
}

/// What a systemd launch needs.
#[derive(Debug)]
struct SystemdTools {
    systemd_run: &'static str,
    gate: PathBuf,
}

/// The gate: `migratekit-gate` next to the running watchdog (a build tree), else where the
/// package installs it.
fn gate_program() -> Option<PathBuf> {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("migratekit-gate")))
        .filter(|p| p.is_file());
    sibling.or_else(|| {
        Some(PathBuf::from("/usr/libexec/vma-watchdog/migratekit-gate")).filter(|p| p.is_file())
    })
}

/// Logs a started migratekit and wraps it up.
fn started(
    job_id: &str,
    process: ProcessIdentity,
    child: Option<Child>,
    placement: Placement,
    argv: Vec<RenderedArg>,
) -> Launched {
    let launched = Launched {
        process,
        child,
        placement,
        argv,
    };
    tracing::info!(event = "migratekit_started", job_id = %job_id, pid = process.pid,
        start_time = process.start_time, placement = ?launched.placement,
        argv = ?launched.redacted_argv(), "started migratekit");
    launched
}

/// [`CHILD_UMASK`] when the child keeps the watchdog's umask.
const KEEP_UMASK: u32 = u32::MAX;

/// The umask migratekit is started with, see [`set_child_umask`].
static CHILD_UMASK: AtomicU32 = AtomicU32::new(KEEP_UMASK);

/// Starts migratekit with `umask` rather than the watchdog's own. The watchdog runs with
/// 0o077 so that its state is nobody else's to read; migratekit keeps the umask the
/// watchdog was started with, so the files it creates are as they were before.
pub fn set_child_umask(umask: u32) {
    CHILD_UMASK.store(umask & 0o777, Ordering::Relaxed);
}

/// A child can only get past its gate with the go byte, so a failed gate means a failed
/// spawn; should a child exist anyway, it is killed and reaped rather than left running
/// unregistered.
fn stop<R>(child: Result<Child, LaunchError<R>>, error: LaunchError<R>) -> LaunchError<R> {
    if let Ok(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
    error
}

/// Makes the child, between fork and exec, take migratekit's umask and priority, start its
/// own session, report its pid on `pid_w` and wait for the go byte on `go_r` (see
/// [`child_gate`]). The command keeps both descriptors open until it is dropped.
fn install_gate(cmd: &mut Command, pid_w: OwnedFd, go_r: OwnedFd, nice: i32) {
    let (pid_w_raw, go_r_raw) = (pid_w.as_raw_fd(), go_r.as_raw_fd());
    let umask = CHILD_UMASK.load(Ordering::Relaxed);
    let held = (pid_w, go_r);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (umask, setpriority, setsid, getpid, write, read) on descriptors it
    // keeps alive.
    unsafe {
        cmd.pre_exec(move || {
            let _keep_open = &held;
            if umask != KEEP_UMASK {
                libc::umask(umask as libc::mode_t);
            }
            child_gate(pid_w_raw, go_r_raw, nice)
        });
    }
}

/// Runs in the forked child: migratekit's own priority (not the watchdog's), new session,
/// report the pid, wait for the go byte.
fn child_gate(pid_w: RawFd, go_r: RawFd, nice: i32) -> std::io::Result<()> {
    // SAFETY: plain system calls on descriptors the closure keeps open.
    unsafe {
        if libc::setpriority(libc::PRIO_PROCESS, 0, nice) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pid = (libc::getpid() as u32).to_ne_bytes();
        loop {
            let n = libc::write(pid_w, pid.as_ptr().cast(), pid.len());
            if n == pid.len() as isize {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(std::io::Error::from_raw_os_error(libc::EPIPE));
        }
        let mut go = [0u8; 1];
        loop {
            let n = libc::read(go_r, go.as_mut_ptr().cast(), 1);
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if n == 1 && go[0] == b'1' {
                return Ok(());
            }
            return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
        }
    }
}

/// Reads the 4-byte pid the child writes, polling so that a spawn that failed before the
/// child wrote anything is noticed even if another process holds the pipe open.
fn read_pid(pid_r: &OwnedFd, spawned: &AtomicBool) -> std::io::Result<u32> {
    let deadline = Instant::now() + PID_TIMEOUT;
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        let finished = spawned.load(Ordering::SeqCst);
        let mut fds = libc::pollfd {
            fd: pid_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut fds, 1, 50) };
        if ready > 0 {
            // SAFETY: reading into the rest of a local buffer.
            let n = unsafe {
                libc::read(
                    pid_r.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    buf.len() - got,
                )
            };
            if n > 0 {
                got += n as usize;
                continue;
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the child exited before reporting its pid",
                ));
            }
        }
        if finished || Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the child did not report its pid",
            ));
        }
    }
    Ok(u32::from_ne_bytes(buf))
}

fn write_byte(fd: &OwnedFd, byte: u8) -> std::io::Result<()> {
    // SAFETY: writing one byte from a local to an open descriptor.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&byte as *const u8).cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn check_executable(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "not an executable file",
        ))
    }
}

/// True when this process sits below the root of a pure cgroup v2 hierarchy (its
/// `/proc/self/cgroup` has the single `0::/path` line, and path is not `/`).
fn in_cgroup_v2_subgroup() -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return false;
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    matches!(lines.as_slice(), [only] if only.starts_with("0::") && only.trim_end() != "0::/")
}

/// Moves `pid` to the root cgroup of the v2 hierarchy; a failure (a container that does not
/// delegate the root) is logged and the process still runs in its own session.
fn move_to_root_cgroup(pid: u32) {
    if let Err(error) = std::fs::write("/sys/fs/cgroup/cgroup.procs", pid.to_string()) {
        tracing::warn!(pid, %error, "could not move migratekit to the root cgroup; it runs in its own session but a stop of the watchdog's cgroup would kill it");
    }
}
