//! A real `oma` server on a free port with its own SQLite file, and its REST API as the
//! operator sees it.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use oma::model::{AuditEntry, Job, JobStatus, VmContext};
use reqwest::Method;
use serde_json::{Value, json};

use crate::daemon::Daemon;
use crate::http::{Answer, JsonClient, free_port, metrics_flag, wait_for};
use crate::{HarnessError, Result};

/// How to run the OMA. Intervals are short so that tests see recovery and polling quickly.
#[derive(Debug, Clone)]
pub struct OmaConfig {
    /// Address to listen on (loopback, or the OMA's veth address in a namespace).
    pub ip: IpAddr,
    /// Network namespace to run in.
    pub netns: Option<String>,
    /// `--poll-interval-secs`.
    pub poll_interval_secs: f64,
    /// `--recovery-interval-secs`.
    pub recovery_interval_secs: f64,
    /// `--stale-threshold-secs`.
    pub stale_threshold_secs: f64,
    /// `--poll-max-backoff-secs`.
    pub poll_max_backoff_secs: f64,
    /// `--vma-timeout-secs`.
    pub vma_timeout_secs: f64,
    /// HTTPS with client certificates both ways (its API, its calls to VMAs).
    pub tls: Option<crate::tls::DaemonTls>,
    /// Serve `/metrics` (on a port of its own); `false` runs it with `--metrics-listen off`.
    pub metrics: bool,
    /// `--database`: `None` is a SQLite file in its temporary directory; a `postgres://` URL
    /// runs it on PostgreSQL (the kill tests' `--backend postgres`).
    pub database: Option<String>,
}

impl Default for OmaConfig {
    fn default() -> Self {
        Self {
            ip: IpAddr::from([127, 0, 0, 1]),
            netns: None,
            poll_interval_secs: 0.2,
            recovery_interval_secs: 2.0,
            stale_threshold_secs: 1800.0,
            poll_max_backoff_secs: 1.0,
            vma_timeout_secs: 2.0,
            tls: None,
            metrics: true,
            database: None,
        }
    }
}

impl OmaConfig {
    /// The intervals `oma` ships with (its flags' defaults, read from its own command-line
    /// definition, so they cannot drift from it), for benchmarks that measure the system as
    /// operators run it rather than the tests' busy settings.
    pub fn shipped() -> Self {
        use clap::CommandFactory;
        let command = oma::config::ServerArgs::command();
        let default = |flag: &str| -> f64 {
            command
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .and_then(|a| a.get_default_values().first()?.to_str()?.parse().ok())
                .unwrap_or_else(|| panic!("oma has no numeric default for --{flag}"))
        };
        Self {
            poll_interval_secs: default("poll-interval-secs"),
            recovery_interval_secs: default("recovery-interval-secs"),
            poll_max_backoff_secs: default("poll-max-backoff-secs"),
            vma_timeout_secs: default("vma-timeout-secs"),
            ..Self::default()
        }
    }
}

/// A running (or stopped) `oma`. Its database and logs live in a temporary directory that
/// outlives restarts.
#[derive(Debug)]
pub struct Oma {
    daemon: Daemon,
    dir: tempfile::TempDir,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The operator token.
    pub operator_token: String,
    /// The token the OMA presents to VMA watchdogs.
    pub vma_api_token: String,
    /// Where its `/metrics` is served (a port of its own), unless metrics are off.
    pub metrics: Option<std::net::SocketAddr>,
    client: JsonClient,
}

/// HTTPS requiring client certificates of the CA, and the same CA and a client certificate
/// for its calls to VMAs.
fn tls_args(tls: &crate::tls::DaemonTls) -> Vec<OsString> {
    [
        ("--tls-cert", &tls.server.cert),
        ("--tls-key", &tls.server.key),
        ("--tls-client-ca", &tls.ca),
        ("--vma-ca", &tls.ca),
        ("--vma-client-cert", &tls.client.cert),
        ("--vma-client-key", &tls.client.key),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [OsString::from(flag), path.into()])
    .collect()
}

fn token() -> String {
    format!("tok-{}", uuid::Uuid::new_v4().simple())
}

impl Oma {
    /// Starts an OMA with `config` and waits for `/health`. `http` is the client to reach it
    /// with (see [`crate::netns::NetPair::client_in`] for a namespaced OMA).
    pub fn start(config: &OmaConfig, http: reqwest::blocking::Client) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("oma-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the OMA's temporary directory", e))?;
        let port = free_port(if config.netns.is_some() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            config.ip
        })?;
        let operator_token = token();
        let vma_api_token = token();
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, text)
                .map_err(|e| HarnessError::io(format!("writing {}", p.display()), e))?;
            Ok(p)
        };
        let operator_file = write("operator.token", &operator_token)?;
        let vma_file = write("vma-api.token", &vma_api_token)?;
        let f = |v: f64| OsString::from(v.to_string());
        let mut args: Vec<OsString> = vec![
            "--listen".into(),
            format!("{}:{port}", config.ip).into(),
            "--database".into(),
            match &config.database {
                Some(url) => url.into(),
                None => dir.path().join("oma.db").into(),
            },
            "--operator-token-file".into(),
            operator_file.into(),
            "--vma-api-token-file".into(),
            vma_file.into(),
            "--poll-interval-secs".into(),
            f(config.poll_interval_secs),
            "--recovery-interval-secs".into(),
            f(config.recovery_interval_secs),
            "--stale-threshold-secs".into(),
            f(config.stale_threshold_secs),
            "--poll-max-backoff-secs".into(),
            f(config.poll_max_backoff_secs),
            "--vma-timeout-secs".into(),
            f(config.vma_timeout_secs),
            "--log-format".into(),
            "json".into(),
        ];
        if let Some(tls) = &config.tls {
            args.extend(tls_args(tls));
        }
        let (metrics, metrics_flag) =
            metrics_flag(config.ip, config.netns.is_some(), config.metrics)?;
        args.extend(metrics_flag);
        let daemon = Daemon::new(
            "oma",
            crate::bins::oma()?,
            args,
            config.netns.clone(),
            dir.path().join("oma.log"),
        )
        // The timing lines of event intake, for the kill-to-commit benchmark's split.
        .with_env("RUST_LOG", "info,oma::latency=debug");
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}:{port}", config.ip);
        let client = JsonClient::new(http, url.clone(), Some(operator_token.clone()));
        let mut oma = Self {
            daemon,
            dir,
            url,
            operator_token,
            vma_api_token,
            metrics,
            client,
        };
        oma.start_again()?;
        Ok(oma)
    }

    /// Starts the stopped server again on the same port and database; waits for `/health`,
    /// generously, as [`crate::watchdog::Watchdog::start_again`] does: in an emulated VM on a
    /// loaded host a start takes long, and nothing is judged from how long.
    pub fn start_again(&mut self) -> Result<()> {
        self.daemon.start()?;
        self.client
            .wait_healthy(Duration::from_secs(120))
            .map_err(|e| self.with_log(&e))
    }

    /// Appends the end of the OMA's log to an error, so a failure explains itself.
    pub fn with_log(&self, e: &HarnessError) -> HarnessError {
        self.daemon.error_with_log("oma", e)
    }

    /// SIGKILL (a crash).
    pub fn sigkill(&mut self) -> Result<()> {
        self.daemon.sigkill()
    }

    /// SIGTERM (a clean stop).
    pub fn stop(&mut self) -> Result<()> {
        self.daemon.stop(Duration::from_secs(10))
    }

    /// The daemon (pid, log).
    pub fn daemon(&mut self) -> &mut Daemon {
        &mut self.daemon
    }

    /// When the OMA logged that `job_id` became final: the line is written right after the
    /// transaction committed, so this is the commit's time (wall clock, microseconds), where
    /// the audit entry's own time (milliseconds) is taken inside the transaction, before it.
    /// Waits up to a second for the line to reach the log file.
    pub fn final_commit_logged_at(&self, job_id: &str) -> Option<std::time::SystemTime> {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            let log = std::fs::read_to_string(self.daemon.log_path()).unwrap_or_default();
            let found = log.lines().rev().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                let f = &v["fields"];
                let to: JobStatus = serde_json::from_value(f["to"].clone()).ok()?;
                let wanted =
                    f["event"] == "job_transition" && f["job_id"] == job_id && to.is_final();
                let at: chrono::DateTime<chrono::Utc> = v["timestamp"].as_str()?.parse().ok()?;
                wanted.then(|| std::time::SystemTime::from(at))
            });
            if found.is_some() || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The OMA's log file.
    pub fn log_path(&self) -> &std::path::Path {
        self.daemon.log_path()
    }

    /// The temporary directory (database, log, token files).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The operator's client.
    pub fn client(&self) -> &JsonClient {
        &self.client
    }

    /// `PUT /api/v1/vmas/{id}`: registers a VMA's watchdog URL and the token it posts events with.
    pub fn register_vma(&self, vma_id: &str, base_url: &str, token: &str) -> Result<()> {
        let _: Value = self.client.call(
            Method::PUT,
            &format!("/api/v1/vmas/{vma_id}"),
            Some(&json!({ "base_url": base_url, "token": token })),
            200,
        )?;
        Ok(())
    }

    /// `POST /api/v1/jobs`: creates job `job_id` for VM context `context` on `vma_id`, which
    /// the OMA starts on the VMA at once. 201 when the VMA started it, 202 when the VMA could
    /// not be reached (the job stays pending for recovery); anything else is an error.
    pub fn create_job(&self, job_id: &str, context: &str, vma_id: &str) -> Result<Job> {
        let body = json!({
            "id": job_id,
            "vm_context_id": context,
            "vm_name": format!("vm-{context}"),
            "vma_id": vma_id,
            "sync_type": "full",
        });
        let bytes = serde_json::to_vec(&body).map_err(|source| HarnessError::Parse {
            what: "encoding a job".into(),
            source,
        })?;
        let what = format!("POST /api/v1/jobs ({job_id})");
        let a = self.client.raw(
            Method::POST,
            "/api/v1/jobs",
            Some(&self.operator_token),
            Some(("application/json", bytes)),
        )?;
        if a.status != 201 && a.status != 202 {
            return Err(HarnessError::Status {
                what,
                status: a.status,
                body: a.body,
            });
        }
        serde_json::from_str(&a.body).map_err(|source| HarnessError::Parse { what, source })
    }

    /// `GET /api/v1/jobs/{id}`.
    pub fn job(&self, job_id: &str) -> Result<Job> {
        self.client.get(&format!("/api/v1/jobs/{job_id}"))
    }

    /// `GET /api/v1/jobs` (up to 1000, newest first).
    pub fn jobs(&self) -> Result<Vec<Job>> {
        self.client.get("/api/v1/jobs?limit=1000")
    }

    /// `GET /api/v1/jobs/{id}/audit`, oldest first.
    pub fn audit(&self, job_id: &str) -> Result<Vec<AuditEntry>> {
        self.client.get(&format!("/api/v1/jobs/{job_id}/audit"))
    }

    /// `GET /api/v1/vm-contexts/{id}`.
    pub fn context(&self, context_id: &str) -> Result<VmContext> {
        self.client
            .get(&format!("/api/v1/vm-contexts/{context_id}"))
    }

    /// `GET /api/v1/recovery/status`.
    pub fn recovery_status(&self) -> Result<Value> {
        self.client.get("/api/v1/recovery/status")
    }

    /// Any request, with any token, for tests of refusals.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer> {
        self.client.raw(method, path, token, body)
    }

    /// Waits until job `job_id` satisfies `done` and returns it.
    pub fn wait_job(
        &self,
        job_id: &str,
        timeout: Duration,
        done: impl Fn(&Job) -> bool,
    ) -> Result<Job> {
        self.wait_job_every(job_id, timeout, Duration::from_millis(2), done)
    }

    /// [`Oma::wait_job`], asking every `every`: a latency measurement that takes its times
    /// from the OMA's log asks rarely, so that its questions do not compete with what it
    /// measures for the OMA's CPU and its database connection.
    pub fn wait_job_every(
        &self,
        job_id: &str,
        timeout: Duration,
        every: Duration,
        done: impl Fn(&Job) -> bool,
    ) -> Result<Job> {
        wait_for(
            &format!("job {job_id} to reach the expected state"),
            timeout,
            every,
            || self.job(job_id).ok().filter(|j| done(j)),
        )
        .map_err(|e| match self.job(job_id) {
            Ok(j) => HarnessError::Status {
                what: e.to_string(),
                status: 0,
                body: format!("job is {:?} / {:?}", j.status, j.failure_class),
            },
            Err(_) => e,
        })
    }

    /// Waits until the job is final.
    pub fn wait_final(&self, job_id: &str, timeout: Duration) -> Result<Job> {
        self.wait_job(job_id, timeout, |j| j.status.is_final())
    }

    /// Jobs still in an active state.
    pub fn active_jobs(&self) -> Result<Vec<Job>> {
        Ok(self
            .jobs()?
            .into_iter()
            .filter(|j| j.status.is_active())
            .collect())
    }
}

/// Audit entries that moved the job into `to` (a real transition, not a note).
pub fn transitions_to(audit: &[AuditEntry], to: JobStatus) -> Vec<&AuditEntry> {
    audit
        .iter()
        .filter(|a| a.to_status == to && a.from_status.is_some_and(|f| f != to))
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn shipped_intervals_are_what_oma_runs_with_no_flags() {
        let shipped = super::OmaConfig::shipped();
        let oma = oma::config::ServerArgs::try_parse_from(["oma"]).unwrap();
        assert_eq!(
            (
                shipped.poll_interval_secs,
                shipped.recovery_interval_secs,
                shipped.poll_max_backoff_secs,
                shipped.vma_timeout_secs
            ),
            (
                oma.poll_interval_secs,
                oma.recovery_interval_secs,
                oma.poll_max_backoff_secs,
                oma.vma_timeout_secs
            )
        );
    }
}
