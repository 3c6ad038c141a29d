//! A commit the OMA acknowledged on SQLite survives its SIGKILL and restart, also after write
//! and fsync errors on its SQLite files (the soak's open finding, seeds 2 and
//! 6984348877983463611): the real `oma` binary runs under an `LD_PRELOAD` shim that fails
//! `write`/`pwrite`/`fsync`/`fdatasync` on the database's directory while a control file
//! exists.
//! The shim is the soak's (`test_support::failio`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_support::failio::{CTL_ENV, IoShim};
use test_support::{KillOnDrop, free_port};

const TOKEN: &str = "sqlite-io-test-operator-token-42";
const VMA_TOKEN: &str = "sqlite-io-test-vma-token-0000042";

/// The OMA under test, on a fixed port and database, started again (as systemd's
/// `Restart=on-failure` would) whenever it has ended by itself.
struct Oma {
    child: Option<KillOnDrop>,
    port: u16,
    dir: PathBuf,
    shim: IoShim,
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
            .env("LD_PRELOAD", &self.shim.library)
            .env(CTL_ENV, &self.shim.ctl)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start oma");
        self.child = Some(KillOnDrop(child));
        self.starts += 1;
    }

    /// Fails writes and fsyncs of the database's directory (its files, not the log).
    fn fail(&self, errno: i32) {
        self.shim
            .fail(&self.dir.join("db").join(""), errno)
            .unwrap();
    }

    fn heal(&self) {
        self.shim.heal().unwrap();
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
    if Command::new("gcc").arg("--version").output().is_err() {
        eprintln!("SKIP: no gcc to build the LD_PRELOAD shim");
        return;
    }
    let shim = IoShim::build().unwrap();
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
