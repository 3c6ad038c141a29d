//! Real `oma` processes on a PostgreSQL cluster of a test's own (so that it can restart it, or
//! end sessions, without disturbing other tests): the helpers of `ha.rs` and `ha_stall.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Operator token of the OMAs these tests start.
pub const OPERATOR: &str = "operator-token-for-ha-tests-01";

/// A PostgreSQL cluster of this test's own.
pub struct Cluster {
    pub dir: PathBuf,
    pub admin: String,
}

fn pg_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|d| d.join("pg_ctl").is_file())
        .collect();
    dirs.sort();
    dirs.pop()
}

impl Cluster {
    /// Starts (or restarts) the cluster in `<target>/<dir_name>` on a free port; `None`
    /// without PostgreSQL's binaries.
    pub fn start(dir_name: &str) -> Option<Self> {
        pg_bindir()?;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        let dir = std::path::absolute(target.join(dir_name)).ok()?;
        let port = test_support::free_port([127, 0, 0, 1].into()).ok()?;
        // A cluster left by an earlier run is reused: its port is in its options, so stop it
        // first and start it on the free port.
        let cluster = Self {
            dir: dir.clone(),
            admin: String::new(),
        };
        let _ = cluster.pg_ctl(&["stop", "-m", "immediate"]);
        std::mem::forget(cluster); // Its drop would stop the cluster started below.
        let out = Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/start-test-postgres.sh"),
        )
        .arg(&dir)
        .arg(port.to_string())
        .output()
        .ok()?;
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        let admin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Some(Self { dir, admin })
    }

    pub fn pg_ctl(&self, args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
        let pg_ctl = pg_bindir().expect("pg_ctl").join("pg_ctl");
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        cmd.arg("-D")
            .arg(&self.dir)
            .args(["-w", "-t", "60"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    }

    /// Stops the server (fast: sessions are ended), keeps it down for a second, starts it
    /// again on the same port.
    pub fn restart(&self) {
        let status = self.pg_ctl(&["stop", "-m", "fast"]).expect("pg_ctl stop");
        assert!(status.success(), "pg_ctl stop: {status}");
        std::thread::sleep(Duration::from_secs(1));
        let port = self
            .admin
            .rsplit(':')
            .next()
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=200",
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        let log = log.to_str().unwrap();
        let status = self
            .pg_ctl(&["-l", log, "-o", &options, "start"])
            .expect("pg_ctl start");
        assert!(status.success(), "pg_ctl start: {status}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate"]);
    }
}

/// One `oma` process.
pub struct OmaProc {
    pub url: String,
    pub log: PathBuf,
    pub child: Child,
}

impl OmaProc {
    /// Starts `oma` as `name` on `database` with a lease period of `lease`, logging JSON to
    /// `<dir>/<name>.log`, and waits for its `/health`.
    pub async fn start(name: &str, database: &str, dir: &Path, lease: Duration) -> Self {
        let port = test_support::free_port([127, 0, 0, 1].into()).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_oma"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database",
                database,
            ])
            .args(["--operator-token", OPERATOR, "--oma-name", name])
            .args([
                "--poll-interval-secs",
                "0.5",
                "--recovery-interval-secs",
                "600",
            ])
            .args(["--vma-timeout-secs", "20", "--poll-max-backoff-secs", "1"])
            .args(["--poll-lease-secs", &lease.as_secs_f64().to_string()])
            .args([
                "--log-format",
                "json",
                "--metrics-listen",
                "off",
                "--nice",
                "0",
            ])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn oma");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        super::eventually(60, "the OMA's /health", || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(format!("{url}/health")).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        Self { url, log, child }
    }

    /// How many lines of its log carry `"event":"<event>"`.
    pub fn log_events(&self, event: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(&format!("\"event\":\"{event}\"")))
            .count()
    }
}

impl Drop for OmaProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh database `name` on the cluster; its URL.
pub async fn fresh_database(cluster: &Cluster, name: &str) -> String {
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.admin)
        .await
        .unwrap();
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::query(&sql).execute(&mut admin).await.unwrap();
    }
    let server = cluster.admin.strip_suffix("/postgres").unwrap();
    format!("{server}/{name}")
}

/// Every job `<prefix>-<vma>-<k>` of `vmas` x `jobs_per_vma` is final, and its audit trail holds
/// exactly one transition into a final state: nothing was finalized twice.
pub async fn each_job_finalized_once(
    store: &oma::store::Store,
    prefix: &str,
    vmas: usize,
    jobs_per_vma: usize,
) {
    for i in 0..vmas {
        for k in 0..jobs_per_vma {
            let job = format!("{prefix}-{i}-{k}");
            let rec = store.get_job(&job).await.unwrap().job;
            assert!(rec.status.is_final(), "{job} is {:?}", rec.status);
            let audit = store.audit(&job).await.unwrap();
            let finals = audit
                .iter()
                .filter(|a| a.to_status.is_final() && a.from_status.is_none_or(|s| !s.is_final()))
                .count();
            assert_eq!(finals, 1, "{job}: one final transition: {audit:#?}");
        }
    }
}
