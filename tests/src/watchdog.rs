//! A real `vma-watchdog` with its own state directory and port, launching the stand-in
//! migratekit through a small wrapper that the harness controls per job.
//!
//! The watchdog's launch template runs `launch-mk.sh {job_id}`. The wrapper (written here)
//! reads `behaviour/<job>.args` for the stand-in's `--standin-*` flags and, when
//! `behaviour/<job>.cgroup` names a `cgroup.procs` file, moves itself there; then it execs the
//! stand-in with the original's flags, `--vmware-password` included, so that a secret on the
//! command line is exercised by every test. The pid, and so the identity the watchdog
//! registered, is unchanged by the exec.

use std::ffi::OsString;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use api::{StoredProgress, VmaJobStatus};
use reqwest::Method;

use crate::daemon::Daemon;
use crate::http::{Answer, JsonClient, free_port, metrics_flag};
use crate::{HarnessError, Result};

/// The vCenter password every launched stand-in carries on its command line. Tests assert it
/// never shows up in a log, a database row or an API answer.
pub const SECRET_PASSWORD: &str = "S3cret-vCenter-Passw0rd";

/// How to run the watchdog.
#[derive(Debug, Clone)]
pub struct WatchdogConfig {
    /// The VMA's id at the OMA.
    pub vma_id: String,
    /// Address to listen on: loopback, or `0.0.0.0` in a namespace so that both the OMA
    /// (over the veth pair) and migratekit (over loopback) reach it.
    pub ip: IpAddr,
    /// Address the OMA uses to reach it (differs from `ip` when that is `0.0.0.0`).
    pub advertised_ip: IpAddr,
    /// Network namespace to run in.
    pub netns: Option<String>,
    /// The OMA's base URL for event delivery.
    pub oma_url: String,
    /// The token the OMA presents to this watchdog (the OMA's `--vma-api-token`).
    pub api_token: String,
    /// `--detector`: `auto`, `ebpf` or `procfs`.
    pub detector: String,
    /// HTTPS with client certificates both ways (its API, its delivery to the OMA);
    /// migratekit's progress then goes to a plain loopback listener of its own.
    pub tls: Option<crate::tls::DaemonTls>,
    /// Serve `/metrics` (on a port of its own); `false` runs it with `--metrics-listen off`.
    pub metrics: bool,
    /// Deliver deaths to `oma_url`; `false` runs it without `--oma-url`.
    pub deliver: bool,
    /// More arguments, appended to the command line.
    pub extra_args: Vec<String>,
}

/// A running (or stopped) watchdog; its state directory outlives restarts.
#[derive(Debug)]
pub struct Watchdog {
    daemon: Daemon,
    dir: tempfile::TempDir,
    /// Base URL as the OMA reaches it.
    pub url: String,
    /// The token this watchdog presents to the OMA (register it with the OMA).
    pub vma_token: String,
    /// The VMA id.
    pub vma_id: String,
    /// Where its `/metrics` is served (a port of its own, as the OMA reaches it), unless
    /// metrics are off.
    pub metrics: Option<std::net::SocketAddr>,
    api_token: String,
    client: JsonClient,
    /// Starts so far, each confirmed by its `watchdog_ready` line.
    starts: usize,
    /// The wall clock just before each SIGKILL or SIGTERM the harness sent (see
    /// [`crate::observed`]).
    stops: Vec<SystemTime>,
}

fn wrapper_script(migratekit: &Path, dir: &Path, progress_url: &str) -> String {
    format!(
        r#"#!/bin/sh
# Written by the system-tests harness: runs the stand-in migratekit for job $1 the way the
# harness asked in {dir}/behaviour/.
job="$1"
b="{dir}/behaviour/$job"
if [ -f "$b.cgroup" ]; then echo $$ > "$(cat "$b.cgroup")" || exit 97; fi
args=""
if [ -f "$b.args" ]; then args="$(cat "$b.args")"; fi
export MIGRATEKIT_JOB_ID="$job" MIGRATEKIT_PROGRESS_JOB_ID="$job"
export MIGRATEKIT_STANDIN_PROGRESS_URL="{progress_url}"
# shellcheck disable=SC2086
exec {mk} migrate --vmware-endpoint vcenter.example --vmware-username admin \
  --vmware-password {secret} --vmware-path /dc/vm/$job --nbd-export-name $job \
  --job-id "$job" --standin-total-bytes 107374182400 --standin-rate 104857600 \
  --standin-progress-interval-ms 100 $args
"#,
        dir = dir.display(),
        mk = migratekit.display(),
        secret = SECRET_PASSWORD,
    )
}

impl Watchdog {
    /// Starts a watchdog and waits for `/health`.
    pub fn start(config: &WatchdogConfig, http: reqwest::blocking::Client) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vma-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the watchdog's temporary directory", e))?;
        let port = free_port(if config.netns.is_some() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            config.ip
        })?;
        let behaviour = dir.path().join("behaviour");
        std::fs::create_dir_all(&behaviour)
            .map_err(|e| HarnessError::io(format!("creating {}", behaviour.display()), e))?;
        let vma_token = format!("vma-{}", uuid::Uuid::new_v4().simple());
        let (args, metrics) = command_line(config, dir.path(), port, &vma_token)?;
        let daemon = Daemon::new(
            "vma-watchdog",
            crate::bins::watchdog()?,
            args,
            config.netns.clone(),
            dir.path().join("watchdog.log"),
        )
        // The timing lines of each death, for the kill-to-commit benchmark's split.
        .with_env("RUST_LOG", "info,vma_watchdog::latency=debug");
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{}:{port}", config.advertised_ip);
        let client = JsonClient::new(http, url.clone(), Some(config.api_token.clone()));
        let mut w = Self {
            daemon,
            dir,
            url,
            vma_token,
            vma_id: config.vma_id.clone(),
            metrics: metrics.map(|m| std::net::SocketAddr::new(config.advertised_ip, m.port())),
            api_token: config.api_token.clone(),
            client,
            starts: 0,
            stops: Vec::new(),
        };
        w.start_again()?;
        Ok(w)
    }

    /// Starts the stopped watchdog again with the same state directory and port, and waits
    /// for its `watchdog_ready` line (the end of its downtime; the API answers only after it,
    /// but the line may reach the log a moment later).
    ///
    /// The waits are generous on purpose: a start takes 3 s in a VM under qemu's emulation
    /// alone, and 30 s was measured too short there with the host loaded. Nothing is judged
    /// from how long it takes (the downtime ends at the ready line, whenever it comes).
    pub fn start_again(&mut self) -> Result<()> {
        if self.daemon.is_running() {
            return Ok(());
        }
        self.daemon.start()?;
        self.client
            .wait_healthy(Duration::from_secs(120))
            .map_err(|e| self.daemon.error_with_log("watchdog", &e))?;
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::observed::ready_times(&self.log()).len() < self.starts {
            if Instant::now() > deadline {
                let e = HarnessError::Status {
                    what: "the watchdog answers /health but logged no watchdog_ready line in 30 s"
                        .into(),
                    status: 0,
                    body: String::new(),
                };
                return Err(self.daemon.error_with_log("watchdog", &e));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL (a crash).
    pub fn sigkill(&mut self) -> Result<()> {
        if self.daemon.is_running() {
            self.stops.push(SystemTime::now());
        }
        self.daemon.sigkill()
    }

    /// SIGTERM (a clean stop).
    pub fn stop(&mut self) -> Result<()> {
        if self.daemon.is_running() {
            self.stops.push(SystemTime::now());
        }
        self.daemon.stop(Duration::from_secs(10))
    }

    /// When the harness stopped the watchdog (SIGKILL or SIGTERM), in order.
    pub fn stops(&self) -> &[SystemTime] {
        &self.stops
    }

    /// The watchdog's whole log (JSON lines, every start appended).
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// The daemon (pid, log).
    pub fn daemon(&mut self) -> &mut Daemon {
        &mut self.daemon
    }

    /// The watchdog's log file.
    pub fn log_path(&self) -> &Path {
        self.daemon.log_path()
    }

    /// The temporary directory (state, logs, wrapper).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The client with the OMA's token.
    pub fn client(&self) -> &JsonClient {
        &self.client
    }

    /// Sets the stand-in flags for `job_id` (e.g. `--standin-run-for 2 --standin-exit-code 3`).
    pub fn set_behaviour(&self, job_id: &str, standin_args: &str) -> Result<()> {
        let p = self
            .dir
            .path()
            .join("behaviour")
            .join(format!("{job_id}.args"));
        std::fs::write(&p, standin_args)
            .map_err(|e| HarnessError::io(format!("writing {}", p.display()), e))
    }

    /// Makes the launched stand-in of `job_id` move itself into the cgroup whose
    /// `cgroup.procs` file is `procs`.
    pub fn set_cgroup(&self, job_id: &str, procs: &Path) -> Result<()> {
        let p = self
            .dir
            .path()
            .join("behaviour")
            .join(format!("{job_id}.cgroup"));
        std::fs::write(&p, procs.as_os_str().as_encoded_bytes())
            .map_err(|e| HarnessError::io(format!("writing {}", p.display()), e))
    }

    /// `GET /api/v1/jobs/{id}`: `None` for the contract's 404 `unknown_job`.
    pub fn job(&self, job_id: &str) -> Result<Option<VmaJobStatus>> {
        let path = format!("/api/v1/jobs/{job_id}");
        let answer = self
            .client
            .raw(Method::GET, &path, Some(self.api_token_of_client()), None)?;
        match answer.status {
            200 => serde_json::from_str(&answer.body)
                .map(Some)
                .map_err(|source| HarnessError::Parse { what: path, source }),
            404 => Ok(None),
            status => Err(HarnessError::Status {
                what: path,
                status,
                body: answer.body,
            }),
        }
    }

    /// Waits until the watchdog's stored progress of `job_id` satisfies `done`.
    pub fn wait_progress(
        &self,
        job_id: &str,
        timeout: Duration,
        done: impl Fn(&StoredProgress) -> bool,
    ) -> Result<StoredProgress> {
        crate::http::wait_for(
            &format!("the progress of {job_id} at the watchdog"),
            timeout,
            Duration::from_millis(20),
            || self.progress(job_id).ok().flatten().filter(|s| done(s)),
        )
    }

    /// `GET /api/v1/progress/{id}`: `None` before the first update.
    pub fn progress(&self, job_id: &str) -> Result<Option<StoredProgress>> {
        let path = format!("/api/v1/progress/{job_id}");
        let answer = self
            .client
            .raw(Method::GET, &path, Some(self.api_token_of_client()), None)?;
        match answer.status {
            200 => serde_json::from_str(&answer.body)
                .map(Some)
                .map_err(|source| HarnessError::Parse { what: path, source }),
            404 => Ok(None),
            status => Err(HarnessError::Status {
                what: path,
                status,
                body: answer.body,
            }),
        }
    }

    /// Any request, for tests of refusals.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer> {
        self.client.raw(method, path, token, body)
    }

    /// The token the OMA presents to this watchdog.
    fn api_token_of_client(&self) -> &str {
        &self.api_token
    }
}

/// Writes `text` to `name` in `dir`; returns the file's path.
fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text)
        .map_err(|e| HarnessError::io(format!("writing {}", p.display()), e))?;
    Ok(p)
}

/// Writes the launch wrapper and the token files into `dir`, and returns the watchdog's
/// arguments for `config`, listening on `port` and presenting `vma_token` to the OMA, with
/// the address its `/metrics` listens on (none when metrics are off).
fn command_line(
    config: &WatchdogConfig,
    dir: &Path,
    port: u16,
    vma_token: &str,
) -> Result<(Vec<OsString>, Option<std::net::SocketAddr>)> {
    // With TLS the API's port speaks HTTPS only: migratekit posts to the plain progress
    // listener on a port of its own.
    let progress_port = match config.tls {
        Some(_) => free_port(IpAddr::from([127, 0, 0, 1]))?,
        None => port,
    };
    let progress_url = format!("http://127.0.0.1:{progress_port}");
    let migratekit = crate::bins::migratekit()?;
    let wrapper = write_file(
        dir,
        "launch-mk.sh",
        &wrapper_script(&migratekit, dir, &progress_url),
    )?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| HarnessError::io("making the launch wrapper executable", e))?;
    let oma_token_file = write_file(dir, "oma.token", vma_token)?;
    let api_token_file = write_file(dir, "api.token", &config.api_token)?;
    let mut args = wiring_args(&WiringArgs {
        state_dir: dir.join("state"),
        listen: format!("{}:{port}", config.ip),
        oma_url: config.deliver.then(|| config.oma_url.clone()),
        vma_id: config.vma_id.clone(),
        oma_token_file,
        api_token_file,
        wrapper,
        migratekit,
        log_dir: dir.join("jobs"),
        detector: config.detector.clone(),
    });
    if let Some(tls) = &config.tls {
        args.extend(tls_args(tls, progress_port));
    }
    let (metrics, metrics_flag) = metrics_flag(config.ip, config.netns.is_some(), config.metrics)?;
    args.extend(metrics_flag);
    args.extend(config.extra_args.iter().map(OsString::from));
    Ok((args, metrics))
}

/// Everything the watchdog's command line carries.
#[derive(Debug)]
struct WiringArgs {
    state_dir: PathBuf,
    listen: String,
    oma_url: Option<String>,
    vma_id: String,
    oma_token_file: PathBuf,
    api_token_file: PathBuf,
    wrapper: PathBuf,
    migratekit: PathBuf,
    log_dir: PathBuf,
    detector: String,
}

/// HTTPS requiring client certificates of the CA, the plain progress listener on
/// `progress_port`, and the CA and a client certificate for the delivery to the OMA.
fn tls_args(tls: &crate::tls::DaemonTls, progress_port: u16) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        ("--tls-cert", &tls.server.cert),
        ("--tls-key", &tls.server.key),
        ("--tls-client-ca", &tls.ca),
        ("--oma-ca", &tls.ca),
        ("--oma-client-cert", &tls.client.cert),
        ("--oma-client-key", &tls.client.key),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [OsString::from(flag), path.into()])
    .collect();
    args.push("--progress-listen".into());
    args.push(format!("127.0.0.1:{progress_port}").into());
    args
}

/// The watchdog's command line, in one place so that a renamed flag is fixed once.
fn wiring_args(w: &WiringArgs) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: OsString| {
        args.push(name.into());
        args.push(value);
    };
    flag("--state-dir", w.state_dir.clone().into());
    flag("--listen", w.listen.clone().into());
    if let Some(url) = &w.oma_url {
        flag("--oma-url", url.into());
    }
    flag("--vma-id", w.vma_id.clone().into());
    flag("--oma-token-file", w.oma_token_file.clone().into());
    flag("--api-token-file", w.api_token_file.clone().into());
    flag("--launch-program", w.wrapper.clone().into());
    // The program is a wrapper that execs the stand-in: the stand-in is what migratekit is.
    flag("--migratekit-path", w.migratekit.clone().into());
    flag("--launch-arg", "{job_id}".into());
    flag("--launch-log-dir", w.log_dir.clone().into());
    flag("--detector", w.detector.clone().into());
    // Redeliver within a second once the OMA is back, so tests do not wait out 30 s.
    flag("--oma-max-backoff-ms", "1000".into());
    flag("--log-format", "json".into());
    args.push("--launch-no-systemd".into());
    args
}
