//! The soak's storage faults: the watchdog's state directory on a small tmpfs that it fills
//! and frees ([`StateFs`]), and write and fsync errors injected into the daemons' files by an
//! `LD_PRELOAD` shim ([`IoShim`], in `test-support`, which `oma/tests/sqlite_io_errors.rs`
//! uses too). Every process the soak starts inherits it (`LD_PRELOAD`), so the daemons need
//! no flag; only the listed files fail (not the logs, not the stand-ins' output).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use test_support::failio::{CTL_ENV, IoShim};

/// A tmpfs mounted on the watchdog's state directory; the soak fills and frees it.
#[derive(Debug)]
pub struct StateFs {
    mount: PathBuf,
    filler: PathBuf,
}

/// The tmpfs's size: room for the watchdog's files many times over.
const SIZE: &str = "16m";

impl StateFs {
    /// Moves `state` (the stopped watchdog's state directory) onto a new tmpfs.
    pub fn mount(state: &Path) -> Result<Self, String> {
        let old = state.with_extension("before-tmpfs");
        std::fs::rename(state, &old).map_err(|e| format!("moving {}: {e}", state.display()))?;
        std::fs::create_dir(state).map_err(|e| format!("creating {}: {e}", state.display()))?;
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={SIZE},mode=0700"),
                "soak-state",
            ])
            .arg(state))?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", old.display()))
            .arg(state)
            .status();
        if !copied.is_ok_and(|s| s.success()) {
            return Err(format!(
                "copying the state into the tmpfs at {}",
                state.display()
            ));
        }
        let _ = std::fs::remove_dir_all(&old);
        Ok(Self {
            mount: state.to_owned(),
            filler: state.join("soak-filler"),
        })
    }

    /// Writes zeros until the file system is full; returns the bytes written.
    pub fn fill(&self) -> Result<u64, String> {
        let mut file =
            std::fs::File::create(&self.filler).map_err(|e| format!("creating the filler: {e}"))?;
        let block = vec![0u8; 64 << 10];
        let mut written = 0u64;
        for size in [block.len(), 4096, 1] {
            loop {
                match file.write(&block[..size]) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => return Err(format!("filling the state's tmpfs: {e}")),
                }
            }
        }
        Ok(written)
    }

    /// Frees what [`StateFs::fill`] took.
    pub fn free(&self) -> Result<(), String> {
        match std::fs::remove_file(&self.filler) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("removing the filler: {e}"))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for StateFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        // The watchdog's temporary directory could not be removed around the mount point.
        if let Some(parent) = self.mount.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Lines of a daemon's log that report a storage error (an injected `EIO`/`ENOSPC` or what
/// SQLite makes of it), for the check that no such error is swallowed.
pub fn storage_error_lines(log: &str) -> usize {
    const SIGNS: [&str; 6] = [
        "os error 5)",
        "os error 28)",
        "disk I/O error",
        "database or disk is full",
        "Input/output error",
        "No space left on device",
    ];
    log.lines()
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real process under the shim: its write to a file under the prefix fails with the
    /// errno while the control file exists, and succeeds again once it is gone.
    #[test]
    fn the_shim_fails_writes_under_its_prefix_only_while_its_control_exists() {
        let shim = IoShim::build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (failing, other) = (dir.path().join("failing"), dir.path().join("other"));
        std::fs::create_dir(&failing).unwrap();
        let write = |path: &Path| {
            // dd calls write(2) through libc's exported symbol (bash's echo goes through
            // stdio's internal one, which no preload can wrap, as for most C programs' stdio).
            let script = format!(
                "echo x | dd of={} oflag=append conv=notrunc status=none",
                path.display()
            );
            Command::new("bash")
                .args(["-c", &script])
                .env("LD_PRELOAD", &shim.library)
                .env(CTL_ENV, &shim.ctl)
                .output()
                .unwrap()
        };
        shim.fail(&failing, libc::EIO).unwrap();
        let out = write(&failing.join("f"));
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"));
        assert!(write(&other).status.success());
        assert_eq!(shim.hits(), 1);
        shim.heal().unwrap();
        assert!(write(&failing.join("f")).status.success());
        assert_eq!(std::fs::read_to_string(failing.join("f")).unwrap(), "x\n");
    }
}
