//! A write and fsync error injector for the daemons' files: an `LD_PRELOAD` shim
//! ([`IoShim`]) compiled with `gcc` at run time into a temporary directory. The soak and
//! `oma/tests/sqlite_io_errors.rs` use it.
//!
//! The shim wraps `write`, `pwrite`, `pwrite64`, `writev`, `fsync` and `fdatasync`. While its
//! control file (`SOAK_FAILIO_CTL`) exists, a call on a descriptor whose path (read from
//! `/proc/self/fd`) starts with a prefix listed there fails with that line's errno, and one line
//! `<pid> <errno> <call> <path>` is appended to `<control file>.hits`. Without the control file
//! every call goes straight to libc.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable naming the shim's control file.
pub const CTL_ENV: &str = "SOAK_FAILIO_CTL";

const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int failing(int fd, const char *op) {
    const char *ctl = getenv("SOAK_FAILIO_CTL");
    if (!ctl) return 0;
    int saved = errno;
    int cfd = open(ctl, O_RDONLY | O_CLOEXEC);
    if (cfd < 0) { errno = saved; return 0; }
    char buf[4096];
    ssize_t n = read(cfd, buf, sizeof buf - 1);
    close(cfd);
    if (n <= 0) { errno = saved; return 0; }
    buf[n] = 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t m = readlink(link, path, sizeof path - 1);
    if (m <= 0) { errno = saved; return 0; }
    path[m] = 0;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        int err; char prefix[4096];
        if (sscanf(line, "%d %4095s", &err, prefix) == 2
            && strncmp(path, prefix, strlen(prefix)) == 0) {
            char hits[4200], note[4200];
            snprintf(hits, sizeof hits, "%s.hits", ctl);
            int h = open(hits, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
            if (h >= 0) {
                int len = snprintf(note, sizeof note, "%d %d %s %s\n", (int)getpid(), err, op, path);
                ssize_t (*real)(int, const void *, size_t) = dlsym(RTLD_NEXT, "write");
                if (real) real(h, note, (size_t)len);
                close(h);
            }
            return err;
        }
    }
    errno = saved;
    return 0;
}

#define REAL(name) static __typeof__(&name) real_##name; \
    if (!real_##name) real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name)
#define FAIL(fd, op) do { int e = failing(fd, op); if (e) { errno = e; return -1; } } while (0)

ssize_t write(int fd, const void *b, size_t n) {
    REAL(write); FAIL(fd, "write"); return real_write(fd, b, n);
}
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite); FAIL(fd, "pwrite"); return real_pwrite(fd, b, n, o);
}
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite64); FAIL(fd, "pwrite64"); return real_pwrite64(fd, b, n, o);
}
ssize_t writev(int fd, const struct iovec *v, int c) {
    REAL(writev); FAIL(fd, "writev"); return real_writev(fd, v, c);
}
int fsync(int fd) { REAL(fsync); FAIL(fd, "fsync"); return real_fsync(fd); }
int fdatasync(int fd) { REAL(fdatasync); FAIL(fd, "fdatasync"); return real_fdatasync(fd); }
"#;

/// The compiled shim and its control file.
#[derive(Debug)]
pub struct IoShim {
    _dir: tempfile::TempDir,
    /// The shared object for `LD_PRELOAD`.
    pub library: PathBuf,
    /// The control file (absent: no errors).
    pub ctl: PathBuf,
}

impl IoShim {
    /// Compiles the shim with `gcc` into a temporary directory.
    pub fn build() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("soak-failio-")
            .tempdir()
            .map_err(|e| format!("temporary directory for the I/O shim: {e}"))?;
        let source = dir.path().join("failio.c");
        std::fs::write(&source, SHIM_C).map_err(|e| format!("writing the shim: {e}"))?;
        let library = dir.path().join("libfailio.so");
        let out = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&library)
            .arg(&source)
            .arg("-ldl")
            .output()
            .map_err(|e| format!("running gcc for the I/O shim: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "gcc could not build the I/O shim: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let ctl = dir.path().join("failio.ctl");
        Ok(Self {
            _dir: dir,
            library,
            ctl,
        })
    }

    /// Fails writes and fsyncs under `prefix` with `errno` from now on.
    pub fn fail(&self, prefix: &Path, errno: i32) -> Result<(), String> {
        let line = format!("{errno} {}\n", prefix.display());
        std::fs::write(&self.ctl, line).map_err(|e| format!("writing the shim's control: {e}"))
    }

    /// Stops failing.
    pub fn heal(&self) -> Result<(), String> {
        match std::fs::remove_file(&self.ctl) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("removing the shim's control: {e}"))
            }
            _ => Ok(()),
        }
    }

    /// How many calls the shim has failed so far.
    pub fn hits(&self) -> usize {
        self.hit_paths().len()
    }

    /// The call (`write`, `fsync`, ...) and path of each call the shim has failed so far.
    pub fn hit_paths(&self) -> Vec<(String, PathBuf)> {
        let hits = self.ctl.with_extension("ctl.hits");
        let text = std::fs::read_to_string(hits).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut fields = l.splitn(4, ' ').skip(2);
                Some((fields.next()?.to_owned(), PathBuf::from(fields.next()?)))
            })
            .collect()
    }
}
