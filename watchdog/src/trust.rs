//! Which processes are migratekit: the VMA's own configuration says, not a process's name.
//!
//! Any user can run a binary called `migratekit` with `--job-id job-b`. Were the name enough,
//! such a process would be adopted as job-b's, and its `exit(0)` would complete job-b at the
//! OMA. So a process counts as migratekit only when its executable is the configured binary,
//! compared by `(st_dev, st_ino)` (a copy or a symlink elsewhere is another file), and it runs
//! as the configured user (real and effective uid). `stat` on `/proc/<pid>/exe` follows the
//! magic link to the inode the process runs, also when that file has since been deleted or
//! replaced on disk. Nothing here reads a process's arguments.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An executable file, by device and inode: what a path or `/proc/<pid>/exe` resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExeId {
    /// `st_dev` of the file.
    pub dev: u64,
    /// `st_ino` of the file.
    pub ino: u64,
}

impl ExeId {
    /// The file `path` names, following symlinks.
    pub fn of_path(path: &Path) -> io::Result<Self> {
        let meta = fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The file process `pid` runs (`/proc/<pid>/exe`), even when it is deleted on disk.
    pub fn of_process(pid: u32) -> io::Result<Self> {
        first_exe(pid, Self::of_path)
    }
}

/// `f` on `/proc/<pid>/exe`, else on the `exe` of its other threads: a leader thread that has
/// exited while the others run has no memory map left, and its own link reads as missing.
fn first_exe<T>(pid: u32, f: impl Fn(&Path) -> io::Result<T>) -> io::Result<T> {
    let leader = f(&PathBuf::from(format!("/proc/{pid}/exe")));
    let Err(error) = leader else {
        return leader;
    };
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Err(error);
    };
    tasks
        .flatten()
        .take(8)
        .find_map(|task| f(&task.path().join("exe")).ok())
        .ok_or(error)
}

/// The path process `pid` runs, as the kernel shows it (`... (deleted)` for a replaced file),
/// for log lines; `None` when it cannot be read (the process is gone, or is a kernel thread).
pub fn exe_path(pid: u32) -> Option<PathBuf> {
    first_exe(pid, |link| fs::read_link(link)).ok()
}

/// The real and effective uid of process `pid`, from the `Uid:` line of `/proc/<pid>/status`.
pub fn process_uids(pid: u32) -> io::Result<(u32, u32)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_uids(&status).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/status has no readable Uid: line"),
        )
    })
}

/// Real and effective uid from the text of a `/proc/<pid>/status` file.
fn parse_uids(status: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(str::parse::<u32>);
    let real = ids.next()?.ok()?;
    let effective = ids.next()?.ok()?;
    Some((real, effective))
}

/// What the VMA's configuration says migratekit is: its binary and the user it runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigratekitIdentity {
    /// The migratekit binary (`--migratekit-path`; by default the launcher's program).
    pub path: PathBuf,
    /// The uid it runs as (`--migratekit-uid`; by default the watchdog's own, which is the one
    /// the launcher starts it with).
    pub uid: u32,
}

/// Why a process is not taken for migratekit. The messages name files and numbers only.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Its executable is not the configured binary.
    #[error(
        "its executable is not the configured migratekit {expected} (compared by device and inode)"
    )]
    WrongExe {
        /// The configured binary.
        expected: PathBuf,
    },
    /// It runs as another user.
    #[error("it runs as uid {real} (effective {effective}), not as uid {expected} like migratekit")]
    WrongUser {
        /// Its real uid.
        real: u32,
        /// Its effective uid.
        effective: u32,
        /// The configured uid.
        expected: u32,
    },
    /// The configured binary cannot be read, so nothing can be compared with it.
    #[error("the configured migratekit {path} cannot be read ({source}); check --migratekit-path")]
    NoBinary {
        /// The configured binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The process's executable or user cannot be read (it is gone, or a kernel thread).
    #[error("its executable or user cannot be read: {0}")]
    Unreadable(#[source] io::Error),
}

impl Refusal {
    /// A stable code for log lines and API answers.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::WrongExe { .. } => "wrong_executable",
            Self::WrongUser { .. } => "wrong_user",
            Self::NoBinary { .. } => "migratekit_binary_unreadable",
            Self::Unreadable(_) => "unreadable",
        }
    }
}

impl MigratekitIdentity {
    /// Checks that process `pid` runs the configured binary as the configured user, and
    /// returns the executable it runs.
    pub fn check(&self, pid: u32) -> Result<ExeId, Refusal> {
        let exe = ExeId::of_process(pid).map_err(Refusal::Unreadable)?;
        let expected = ExeId::of_path(&self.path).map_err(|source| Refusal::NoBinary {
            path: self.path.clone(),
            source,
        })?;
        if exe != expected {
            return Err(Refusal::WrongExe {
                expected: self.path.clone(),
            });
        }
        self.check_user(pid)?;
        Ok(exe)
    }

    /// Checks that process `pid` runs as the configured user (real and effective uid).
    pub fn check_user(&self, pid: u32) -> Result<(), Refusal> {
        let (real, effective) = process_uids(pid).map_err(Refusal::Unreadable)?;
        if real != self.uid || effective != self.uid {
            return Err(Refusal::WrongUser {
                real,
                effective,
                expected: self.uid,
            });
        }
        Ok(())
    }
}

/// The uid of this process: the one the launcher starts migratekit with.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_read_from_the_status_text() {
        let status = "Name:\tmigratekit\nUmask:\t0022\nUid:\t65534\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_uids(status), Some((65534, 0)));
        assert_eq!(parse_uids("Name:\tx\n"), None);
        assert_eq!(parse_uids("Uid:\tx\t0\n"), None);
        let me = process_uids(std::process::id()).unwrap();
        assert_eq!(me.1, own_uid());
    }

    #[test]
    fn this_process_is_its_own_binary_and_a_copy_is_not() {
        let me = std::process::id();
        let own = std::env::current_exe().unwrap();
        let identity = MigratekitIdentity {
            path: own.clone(),
            uid: own_uid(),
        };
        assert_eq!(identity.check(me).unwrap(), ExeId::of_path(&own).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        fs::copy(&own, &copy).unwrap();
        let copied = MigratekitIdentity {
            path: copy,
            uid: identity.uid,
        };
        assert!(matches!(copied.check(me), Err(Refusal::WrongExe { .. })));
        let other_user = MigratekitIdentity {
            uid: own_uid().wrapping_add(1),
            ..identity.clone()
        };
        assert!(matches!(
            other_user.check(me),
            Err(Refusal::WrongUser { .. })
        ));
        let missing = MigratekitIdentity {
            path: dir.path().join("missing"),
            ..identity
        };
        let refusal = missing.check(me).unwrap_err();
        assert_eq!(refusal.reason(), "migratekit_binary_unreadable");
    }
}
