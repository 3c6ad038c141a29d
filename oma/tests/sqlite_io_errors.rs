//! A commit the OMA acknowledged on SQLite survives its SIGKILL and restart, also after write
//! and fsync errors on its SQLite files (the soak's open finding, seeds 2 and
//! 6984348877983463611): the real `oma` binary runs under an `LD_PRELOAD` shim that fails
//! `write`/`pwrite`/`fsync`/`fdatasync` on the database's directory while a control file
//! exists.
//!
//! The shim's C source is a copy of the soak's (tests/src/soak/storage.rs, `SHIM_C`), cut to
//! what this test needs: the `tests` crate is not a dependency of `oma`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::{KillOnDrop, free_port};

const TOKEN: &str = "sqlite-io-test-operator-token-42";
const VMA_TOKEN: &str = "sqlite-io-test-vma-token-0000042";

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

static int failing(int fd) {
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
    int err; char prefix[4096];
    if (sscanf(buf, "%d %4095s", &err, prefix) == 2
        && strncmp(path, prefix, strlen(prefix)) == 0) return err;
    errno = saved;
    return 0;
}

#define REAL(name) static __typeof__(&name) real_##name; \
    if (!real_##name) real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name)
#define FAIL(fd) do { int e = failing(fd); if (e) { errno = e; return -1; } } while (0)

ssize_t write(int fd, const void *b, size_t n) { REAL(write); FAIL(fd); return real_write(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite); FAIL(fd); return real_pwrite(fd, b, n, o);
}
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite64); FAIL(fd); return real_pwrite64(fd, b, n, o);
}
ssize_t writev(int fd, const struct iovec *v, int c) {
    REAL(writev); FAIL(fd); return real_writev(fd, v, c);
}
int fsync(int fd) { REAL(fsync); FAIL(fd); return real_fsync(fd); }
int fdatasync(int fd) { REAL(fdatasync); FAIL(fd); return real_fdatasync(fd); }
"#;

/// The compiled shim; `None` (the test skips) without `gcc`.
fn build_shim(dir: &Path) -> Option<PathBuf> {
    let source = dir.join("failio.c");
    std::fs::write(&source, SHIM_C).unwrap();
    let library = dir.join("libfailio.so");
    let out = Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "gcc could not build the shim: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(library)
}

/// The OMA under test, on a fixed port and database, started again (as systemd's
/// `Restart=on-failure` would) whenever it has ended by itself.
struct Oma {
    child: Option<KillOnDrop>,
    port: u16,
    dir: PathBuf,
    shim: PathBuf,
    starts: usize,
    /// Exit codes of the runs that ended by themselves.
    exits: Vec<Option<i32>>,
}

impl Oma {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("oma.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_oma"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--log-format", "json", "--poll-interval-secs", "0.2"])
            .arg("--database")
            .arg(self.dir.join("db").join("oma.db"))
            .env("OMA_OPERATOR_TOKEN", TOKEN)
            .env("LD_PRELOAD", &self.shim)
            .env("SOAK_FAILIO_CTL", self.ctl())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start oma");
        self.child = Some(KillOnDrop(child));
        self.starts += 1;
    }

    fn ctl(&self) -> PathBuf {
        self.dir.join("failio.ctl")
    }

    fn fail(&self, errno: i32) {
        let prefix = self.dir.join("db");
        std::fs::write(self.ctl(), format!("{errno} {}/\n", prefix.display())).unwrap();
    }

    fn heal(&self) {
        let _ = std::fs::remove_file(self.ctl());
    }

    /// Starts the OMA again if it has ended by itself.
    fn supervise(&mut self) {
        let child = self.child.as_mut().expect("started");
        if let Some(status) = child.0.try_wait().unwrap() {
            self.exits.push(status.code());
            self.start();
        }
    }

    fn sigkill_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.0.kill().unwrap();
            child.0.wait().unwrap();
        }
        self.start();
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// POSTs a job; its status code (0 if the server did not answer).
async fn create(http: &reqwest::Client, oma: &Oma, id: &str) -> u16 {
    let body = serde_json::json!({"id": id, "vm_context_id": format!("ctx-{id}"),
        "vm_name": "v", "vma_id": "vma-1"});
    match http
        .post(format!("{}/api/v1/jobs", oma.base()))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Creates a job until the OMA acknowledges it (202), starting the OMA again if it ended.
async fn create_acknowledged(http: &reqwest::Client, oma: &mut Oma, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        oma.supervise();
        match create(http, oma, id).await {
            202 | 409 => return,
            _ => {}
        }
        assert!(Instant::now() < deadline, "job {id} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /api/v1/jobs/<id>`'s status once the OMA answers.
async fn job_status(http: &reqwest::Client, oma: &mut Oma, id: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        oma.supervise();
        if let Ok(r) = http
            .get(format!("{}/api/v1/jobs/{id}", oma.base()))
            .bearer_auth(TOKEN)
            .send()
            .await
            && r.status().as_u16() != 503
        {
            return r.status().as_u16();
        }
        assert!(Instant::now() < deadline, "the OMA never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn register_vma(http: &reqwest::Client, oma: &mut Oma) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        oma.supervise();
        if let Ok(r) = http
            .put(format!("{}/api/v1/vmas/vma-1", oma.base()))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"base_url": "http://127.0.0.1:9", "token": VMA_TOKEN}))
            .send()
            .await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "the VMA was never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_job_acknowledged_after_write_errors_on_sqlite_survives_a_sigkill_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(shim) = build_shim(dir.path()) else {
        eprintln!("SKIP: no gcc to build the LD_PRELOAD shim");
        return;
    };
    std::fs::create_dir(dir.path().join("db")).unwrap();
    let mut oma = Oma {
        child: None,
        port: free_port("127.0.0.1".parse().unwrap()).unwrap(),
        dir: dir.path().to_owned(),
        shim,
        starts: 0,
        exits: Vec::new(),
    };
    oma.start();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    register_vma(&http, &mut oma).await;
    let mut acknowledged = Vec::new();
    for round in 0..6 {
        let errno = if round % 2 == 0 {
            libc::EIO
        } else {
            libc::ENOSPC
        };
        oma.fail(errno);
        for attempt in 0..3 {
            let _ = create(&http, &oma, &format!("fail-{round}-{attempt}")).await;
        }
        // Long enough for the background checkpoint (every 5 s) to meet some windows.
        tokio::time::sleep(Duration::from_millis(if round % 3 == 2 {
            5_500
        } else {
            300
        }))
        .await;
        oma.heal();
        let id = format!("after-{round}");
        create_acknowledged(&http, &mut oma, &id).await;
        acknowledged.push(id);
    }
    oma.sigkill_and_restart();
    let mut lost = Vec::new();
    for id in &acknowledged {
        let status = job_status(&http, &mut oma, id).await;
        if status != 200 {
            lost.push((id.clone(), status));
        }
    }
    let log = std::fs::read_to_string(dir.path().join("oma.log")).unwrap_or_default();
    assert!(
        lost.is_empty(),
        "acknowledged jobs lost after a SIGKILL restart: {lost:?} (starts {}, exits {:?}); \
         log:\n{}",
        oma.starts,
        oma.exits,
        log.lines().rev().take(60).collect::<Vec<_>>().join("\n")
    );
    // How: the OMA ended itself on the I/O error (code 75) and was started again.
    assert!(
        oma.exits.contains(&Some(oma::store::EXIT_SQLITE_IO_ERROR)),
        "the OMA never exited with its SQLite I/O error code: exits {:?}",
        oma.exits
    );
    assert!(
        log.contains("\"event\":\"sqlite_io_error\""),
        "no sqlite_io_error event logged"
    );
}
