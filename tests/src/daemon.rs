//! One child process of the system under test: started with its output in a log file,
//! stopped with SIGTERM or SIGKILL, and started again with the same command line.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{HarnessError, Result};

/// A daemon the harness runs. Dropping it kills the process.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    netns: Option<String>,
    log: PathBuf,
    envs: Vec<(OsString, OsString)>,
    child: Option<Child>,
}

impl Daemon {
    /// Describes a daemon; nothing runs until [`Daemon::start`]. With `netns`, it runs
    /// through `nsenter --net=/run/netns/<ns>`, which enters only the network namespace and
    /// execs it (so the pid is the daemon's own). Not `ip netns exec`: that also gives the
    /// process a mount namespace with a fresh /sys, without /sys/kernel/btf or tracefs, so the
    /// watchdog would silently fall back from eBPF to procfs.
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<OsString>,
        netns: Option<String>,
        log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args,
            netns,
            log: log.into(),
            envs: Vec::new(),
            child: None,
        }
    }

    /// Sets an environment variable for every start of the process.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Starts the process (appending to its log file, so restarts keep the earlier output).
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log.display()), e))?;
        let err = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating a log file handle", e))?;
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        // In its own temporary directory: a core dump (the kernel's `core_pattern` is often a
        // plain `core`, written to the crashing process's working directory) of the daemon or
        // of a migratekit it starts must never land in the checkout.
        if let Some(dir) = self.log.parent() {
            command.current_dir(dir);
        }
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = command.spawn().map_err(|source| HarnessError::Spawn {
            what: self.name.clone(),
            source,
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the process ended, when it ended on its own: it is reaped, and a later
    /// [`Daemon::start`] runs it again. `None` while it runs, or when it was not started.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// True while the process runs (it is reaped if it has exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process with SIGKILL and reaps it: a crash, as far as the daemon can tell.
    pub fn sigkill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child
                .wait()
                .map_err(|e| HarnessError::io(format!("reaping {}", self.name), e))?;
        }
        Ok(())
    }

    /// Stops the process with SIGTERM (a clean shutdown), SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        crate::procs::signal(child.id(), libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(());
                }
            }
        }
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `e` with the end of this daemon's log appended, so a failure explains itself.
    pub fn error_with_log(&self, label: &str, e: &HarnessError) -> HarnessError {
        HarnessError::Status {
            what: format!("{e}; {label} log tail"),
            status: 0,
            body: self.log_tail(30),
        }
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.sigkill();
    }
}
