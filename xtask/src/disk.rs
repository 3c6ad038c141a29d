//! Free disk space under `target/`. A fresh `cargo xtask test` writes several GiB there, and a
//! disk that fills half-way shows up as a linker's bus error or "IO failure on output stream"
//! ten minutes in. A check before the build, and another after a failure, turn that into a
//! line that says what is wrong and what to do.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

const GIB: u64 = 1 << 30;

/// What a `cargo xtask test` from a fresh clone needs: it wrote 3.7 GiB under `target/` and
/// 0.4 GiB of crates under `~/.cargo` on a machine of the project's kind (README, "Disk
/// space"), with room to spare for PostgreSQL's package and cluster and for growth.
pub const TEST_NEEDS: u64 = 8 * GIB;

/// Bytes an unprivileged user could still write on the filesystem that holds `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value for it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated string and `stat` a writable statvfs, both alive
    // for the whole call.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs({})", path.display()));
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Warns (does not fail: a warm `target/` needs far less) when the disk under `dir` has less
/// than `needs` free.
pub fn warn_if_low(dir: &Path, needs: u64, what: &str) {
    match free_bytes(dir) {
        Ok(free) if free < needs => eprintln!(
            "{what}: WARNING: {} free on the disk that holds {}; a run from a fresh clone \
             needs about {}. If it fails with \"No space left on device\" or a linker's \
             bus error, free space (for example `cargo clean` in other checkouts) and run it again.",
            gib(free),
            dir.display(),
            gib(needs),
        ),
        Ok(_) => {}
        Err(err) => eprintln!("{what}: could not read the free disk space: {err:#}"),
    }
}

/// After a failure: when the disk under `dir` has less than `needs` free, says so, since the
/// tools' own messages for a full disk are cryptic. (Less than `needs`, not nothing: a compiler
/// or linker that fails for want of space deletes its partial output, so the disk is rarely
/// still full when this looks.)
pub fn check_room(dir: &Path, needs: u64) -> Result<()> {
    match free_bytes(dir) {
        Ok(free) if free < needs => bail!(
            "the disk that holds {} has {} free, less than the {} a run needs: if the output \
             above says \"No space left on device\" or shows a linker's bus error, free space \
             and run it again",
            dir.display(),
            gib(free),
            gib(needs),
        ),
        _ => Ok(()),
    }
}

fn gib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // A display figure with one decimal.
    let value = bytes as f64 / GIB as f64;
    format!("{value:.1} GiB")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// `df`, a program that reads the same figure its own way, agrees within what other
    /// writers on the machine can change in between (1 GiB).
    #[test]
    fn free_bytes_agrees_with_df() {
        let dir = std::env::temp_dir();
        let ours = free_bytes(&dir).unwrap();
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&dir)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let df: u64 = text.lines().nth(1).unwrap().trim().parse().unwrap();
        assert!(ours.abs_diff(df) < GIB, "statvfs {ours}, df {df}");
    }

    #[test]
    fn free_bytes_of_a_missing_path_says_which() {
        let err = free_bytes(Path::new("/nonexistent/xtask-disk-test")).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/xtask-disk-test"),
            "{err:#}"
        );
    }

    /// A disk without room is named, with its free space: a 4 MiB tmpfs filled for real.
    #[test]
    fn a_full_disk_is_named_after_a_failure() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP a_full_disk_is_named_after_a_failure: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile_dir();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "xtask-disk-test"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount tmpfs on {}", dir.display());
        // Writes fail with ENOSPC once the 4 MiB are taken.
        let filled = std::fs::write(dir.join("fill"), vec![0u8; 8 << 20]);
        let full = check_room(&dir, TEST_NEEDS);
        let roomy = check_room(&dir, 0);
        let unmounted = Command::new("umount").arg(&dir).status().unwrap();
        let _ = std::fs::remove_dir(&dir);
        assert!(unmounted.success());
        assert!(filled.is_err(), "8 MiB fitted in a 4 MiB tmpfs");
        let message = format!("{:#}", full.unwrap_err());
        let named = format!("{} has 0.0 GiB free, less than the 8.0 GiB", dir.display());
        assert!(message.contains(&named), "{message}");
        roomy.unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
