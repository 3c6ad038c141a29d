//! Starting migratekit for a job, from a command template in the VMA's own configuration.
//!
//! The OMA sends parameters only ([`api::StartJobRequest`]); the program and its arguments
//! come from [`LauncherConfig`], whose `{placeholder}`s are filled from the request, the job
//! id and the configured vCenter credentials. The password reaches migratekit through its
//! argument vector only: every log line shows [`Launched::redacted_argv`] instead.
//!
//! Surviving a watchdog restart:
//! - when systemd runs (`/run/systemd/system` exists) and `systemd-run` and `migratekit-gate`
//!   are installed, each migratekit runs in a transient service of its own,
//!   `migratekit-<job>-<8 hex>`, forked by systemd: it inherits neither the watchdog's cgroup
//!   nor its sandbox, and systemd (not the watchdog) is its parent ([`gate`] tells how it is
//!   registered before migratekit runs);
//! - otherwise the child calls `setsid()` (own session and process group, no controlling
//!   terminal, so neither a signal to the watchdog's group nor a hang-up reaches it), its
//!   output goes to a file rather than a pipe to the watchdog, and on a pure cgroup v2
//!   hierarchy it is moved to the root cgroup when the watchdog runs in a sub-cgroup; on a
//!   cgroup v1 or hybrid hierarchy it stays in the watchdog's v1 cgroups: without systemd
//!   nothing kills a v1 cgroup as a whole when the watchdog stops, and moving it out of every
//!   v1 hierarchy would also escape limits an administrator set on purpose, so the session is
//!   what protects it there.
//!
//! [`Launcher::new`] logs which of the two it uses (`event=launcher_selected`).
//!
//! Registration before it can die unseen (without systemd): the child blocks in `pre_exec`
//! (after `fork`, before `exec`) writing its pid to one pipe and reading a go byte from
//! another. The launcher reads the pid, reads its start time from `/proc` (fixed at fork,
//! unchanged by exec), lets the caller register it, and only then releases it. If
//! registration fails, it sends a stop byte and the child exits without ever running
//! migratekit.

pub mod gate;
mod spawn;
mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use api::ProcessIdentity;

use crate::secret::Secret;
use crate::trust::MigratekitIdentity;
pub use spawn::{CHILD_ENV_REMOVED_PREFIX, LaunchError, Launched, Launcher, set_child_umask};
pub use template::{RenderedArg, TemplateError, render};

/// Where migratekit comes from and how it is called. Lives in the VMA's configuration.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    /// The migratekit binary.
    pub program: PathBuf,
    /// Its arguments, with `{placeholders}`: `{job_id}`, `{vm_path}`, `{nbd_targets}`,
    /// `{nbd_export_name}`, `{vmware_endpoint}`, `{vmware_username}`, `{vmware_password}`,
    /// or any key of the request's `parameters`.
    pub args: Vec<String>,
    /// vCenter credentials by the name the OMA refers to them with.
    pub credentials: BTreeMap<String, VmwareCredentials>,
    /// Directory for each job's output (`{job_id}.log`); `None` sends it to `/dev/null`.
    pub log_dir: Option<PathBuf>,
    /// Process names (`comm`) that the track endpoint accepts.
    pub match_names: Vec<String>,
    /// Whether to start each migratekit in a transient systemd service when systemd runs.
    pub systemd: SystemdMode,
    /// The nice value migratekit runs with (0, normal, by default), whatever the watchdog's
    /// own (see [`daemon_support::priority`]).
    pub nice: i32,
    /// What migratekit is: only a process running this binary as this user is adopted as a
    /// job's process (by the detector, the `/proc` scan or the track endpoint).
    pub migratekit: MigratekitIdentity,
}

impl LauncherConfig {
    /// A configuration that runs `program migrate --job-id {job_id}`.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        let program = program.into();
        Self {
            // The launcher runs the program itself, as the watchdog's own user.
            migratekit: MigratekitIdentity {
                path: program.clone(),
                uid: crate::trust::own_uid(),
            },
            program,
            args: ["migrate", "--job-id", "{job_id}"]
                .map(String::from)
                .to_vec(),
            credentials: BTreeMap::new(),
            log_dir: None,
            match_names: vec!["migratekit".to_owned()],
            systemd: SystemdMode::Auto,
            nice: 0,
        }
    }
}

/// Whether to start migratekit in a transient systemd service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemdMode {
    /// When `/run/systemd/system` exists.
    Auto,
    /// Never (tests, containers without a systemd bus).
    Never,
}

/// One set of vCenter credentials.
#[derive(Debug, Clone)]
pub struct VmwareCredentials {
    /// vCenter host name or URL.
    pub endpoint: String,
    /// User name.
    pub username: String,
    /// Password; never logged.
    pub password: Secret,
}

/// Reads a process's start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`).
pub fn proc_start_time(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_start_time(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no start time field"),
        )
    })
}

/// Field 22 of a `/proc/<pid>/stat` line. The name (field 2) may contain spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_stat_start_time(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: field 22 is the 20th of them.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Reads a process's name (`/proc/<pid>/comm`, at most 15 bytes).
pub fn proc_comm(pid: u32) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/comm"))?
        .trim_end_matches('\n')
        .to_owned())
}

/// Identity of a running process, read from `/proc`.
pub fn proc_identity(pid: u32) -> std::io::Result<ProcessIdentity> {
    Ok(ProcessIdentity {
        pid,
        start_time: proc_start_time(pid)?,
    })
}

/// True when systemd is the init system (the check `sd_booted()` makes).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_names() {
        let stat =
            "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 98765 1000 10";
        assert_eq!(parse_stat_start_time(stat), Some(98765));
        let own = proc_start_time(std::process::id()).unwrap();
        assert!(own > 0);
    }
}
