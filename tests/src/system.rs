//! The whole system on one machine: an OMA, a watchdog registered with it as VMA `vma-1`, and
//! the jobs a test starts through the OMA (which asks the watchdog to launch the stand-in).

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use api::ProcessIdentity;
use oma::model::{AuditEntry, Job, JobStatus};

use crate::netns::NetPair;
use crate::oma::{Oma, OmaConfig};
use crate::watchdog::{Watchdog, WatchdogConfig};
use crate::{HarnessError, Result};

/// How long a job may take to get its process, or a death to reach the OMA, before a test
/// fails: generous, since the machine is shared; the figures themselves are printed.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How long [`System::kill_and_measure`] leaves the OMA alone after a kill before it first
/// asks for the job (the figure itself comes from the OMA's log, not from this look).
const FIRST_LOOK: Duration = Duration::from_millis(25);

/// Options of [`System::start`].
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// OMA settings (its address and namespace are filled in by `start`).
    pub oma: OmaConfig,
    /// `--detector` of the watchdog.
    pub detector: String,
    /// Run OMA and VMA in two namespaces joined by a veth pair.
    pub partitioned: bool,
    /// Both daemons over HTTPS with mutual TLS (certificates for 127.0.0.1: not with
    /// `partitioned`).
    pub tls: bool,
    /// Both daemons serve `/metrics`; `false` runs both with `--metrics-listen off`.
    pub metrics: bool,
    /// The watchdog delivers deaths to the OMA; `false` runs it without `--oma-url`, so that
    /// only the OMA's polling and recovery learn of a death.
    pub deliver: bool,
    /// More arguments for the watchdog (e.g. `--outbox-flush-order serial`).
    pub watchdog_args: Vec<String>,
}

impl Default for SystemOptions {
    fn default() -> Self {
        Self {
            oma: OmaConfig::default(),
            detector: "auto".into(),
            partitioned: false,
            tls: false,
            metrics: true,
            deliver: true,
            watchdog_args: Vec::new(),
        }
    }
}

/// OMA + watchdog. Dropping it kills every migratekit it started, then both daemons, then
/// the namespaces.
#[derive(Debug)]
pub struct System {
    /// The OMA.
    pub oma: Oma,
    /// The VMA's watchdog.
    pub watchdog: Watchdog,
    jobs: Mutex<Vec<String>>,
    // Declared last so it is dropped after the daemons that run inside it.
    /// The namespaces, when partitioned.
    pub net: Option<NetPair>,
    /// The certificates, with TLS.
    pub pki: Option<crate::tls::Pki>,
}

impl System {
    /// The detector the watchdog runs (`ebpf` or `procfs`), as its `/health` reports it:
    /// with `--detector auto` it depends on the machine.
    pub fn detector(&self) -> Result<String> {
        let what = "the watchdog's /health";
        let answer = self
            .watchdog
            .client()
            .raw(reqwest::Method::GET, "/health", None, None)?;
        let health: serde_json::Value =
            serde_json::from_str(&answer.body).map_err(|source| HarnessError::Parse {
                what: what.into(),
                source,
            })?;
        json_find(&health, "detector")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| HarnessError::Status {
                what: format!("{what} names no detector (is the watchdog older than the tests?)"),
                status: answer.status,
                body: answer.body.clone(),
            })
    }

    /// Starts both daemons and registers the VMA.
    pub fn start(options: &SystemOptions) -> Result<Self> {
        crate::procs::reap_orphans();
        let net = if options.partitioned {
            Some(NetPair::create()?)
        } else {
            None
        };
        let mut oma_config = options.oma.clone();
        oma_config.metrics = options.metrics;
        let (oma_http, vma_http, vma_ip, vma_advertised) = match &net {
            Some(n) => {
                oma_config.ip = n.oma_ip;
                oma_config.netns = Some(n.oma_ns.clone());
                (
                    NetPair::client_in(&n.oma_ns)?,
                    NetPair::client_in(&n.vma_ns)?,
                    IpAddr::from([0, 0, 0, 0]),
                    n.vma_ip,
                )
            }
            None => {
                let lo = IpAddr::from([127, 0, 0, 1]);
                (crate::http::client(), crate::http::client(), lo, lo)
            }
        };
        let (pki, oma_http, vma_http) = match options.tls {
            true => {
                let pki = crate::tls::Pki::new()?;
                oma_config.tls = Some(pki.daemon("oma")?);
                let (oma_http, vma_http) = (pki.harness_client()?, pki.harness_client()?);
                (Some(pki), oma_http, vma_http)
            }
            false => (None, oma_http, vma_http),
        };
        let oma = Oma::start(&oma_config, oma_http)?;
        let watchdog = Watchdog::start(
            &WatchdogConfig {
                vma_id: "vma-1".into(),
                ip: vma_ip,
                advertised_ip: vma_advertised,
                netns: net.as_ref().map(|n| n.vma_ns.clone()),
                oma_url: oma.url.clone(),
                api_token: oma.vma_api_token.clone(),
                detector: options.detector.clone(),
                tls: pki.as_ref().map(|p| p.daemon("vma-1")).transpose()?,
                metrics: options.metrics,
                deliver: options.deliver,
                extra_args: options.watchdog_args.clone(),
            },
            vma_http,
        )?;
        oma.register_vma("vma-1", &watchdog.url, &watchdog.vma_token)?;
        Ok(Self {
            oma,
            watchdog,
            jobs: Mutex::new(Vec::new()),
            net,
            pki,
        })
    }

    /// Creates job `job_id` (VM context `ctx-<job_id>`) with the stand-in told `standin_args`,
    /// and returns its process: as the OMA recorded it from the watchdog's start answer, or
    /// else as found in `/proc`.
    pub fn start_job(&self, job_id: &str, standin_args: &str) -> Result<ProcessIdentity> {
        self.watchdog.set_behaviour(job_id, standin_args)?;
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job_id.to_owned());
        let job = self
            .oma
            .create_job(job_id, &format!("ctx-{job_id}"), "vma-1")?;
        if let (Some(pid), Some(start)) = (job.pid, job.process_start_time) {
            return Ok(ProcessIdentity {
                pid: pid as u32,
                start_time: start as u64,
            });
        }
        crate::procs::wait_migratekit(job_id, PATIENCE)
    }

    /// Waits until the OMA records `process` for the job (the watchdog's start reached it).
    pub fn wait_recorded(&self, job_id: &str, process: ProcessIdentity) -> Result<Job> {
        self.oma.wait_job(job_id, PATIENCE, |j| {
            j.pid == Some(i64::from(process.pid))
                && j.process_start_time == Some(process.start_time as i64)
        })
    }

    /// Sends `sig` to the job's process and waits for the OMA to fail it. Returns the job and
    /// the time from the kill to the committed transition (the audit entry's timestamp).
    pub fn kill_and_wait(
        &self,
        job_id: &str,
        process: ProcessIdentity,
        sig: i32,
    ) -> Result<(Job, Duration)> {
        self.kill_and_measure(job_id, process, sig)
            .map(|(job, total, _)| (job, total))
    }

    /// Like [`System::kill_and_wait`], also returning the detection part (kill to the
    /// watchdog's `observed_at`) when the transition's evidence carries it.
    pub fn kill_and_measure(
        &self,
        job_id: &str,
        process: ProcessIdentity,
        sig: i32,
    ) -> Result<(Job, Duration, Option<Duration>)> {
        let before = SystemTime::now();
        crate::procs::kill_process(process, sig)?;
        // The first look at the OMA waits until the death has most likely been committed
        // (a few ms), so that the harness's own request does not compete for the two cores
        // and the OMA's database with the very path it measures.
        std::thread::sleep(FIRST_LOOK);
        let job = self
            .oma
            .wait_job_every(job_id, PATIENCE, Duration::from_millis(50), |j| {
                j.status.is_final()
            })?;
        let audit = self.oma.audit(job_id)?;
        // The commit's own log line when there is one (microseconds, after the commit);
        // otherwise the audit entry's time (milliseconds, inside the transaction).
        let logged = self
            .oma
            .final_commit_logged_at(job_id)
            .map(|at| at.duration_since(before).unwrap_or_default());
        let latency = logged
            .or_else(|| commit_latency(&audit, before))
            .ok_or_else(|| HarnessError::Status {
                what: format!("job {job_id} has no transition to a final state in its audit trail"),
                status: 0,
                body: format!("{audit:?}"),
            })?;
        Ok((job, latency, detect_latency(&audit, before)))
    }

    /// Job ids started through [`System::start_job`].
    pub fn job_ids(&self) -> Vec<String> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Time from `since` to the audit entry that made the job final (millisecond resolution: the
/// OMA stores unix milliseconds).
pub fn commit_latency(audit: &[AuditEntry], since: SystemTime) -> Option<Duration> {
    let entry = audit
        .iter()
        .find(|a| a.to_status.is_final() && a.from_status.is_some_and(|f| f.is_active()))?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(entry.at.timestamp_millis() as u64);
    // The kill instant is truncated to the same millisecond grid so that a commit within
    // the same millisecond reads as 0, never as negative.
    let since_ms = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    Some(
        at.duration_since(SystemTime::UNIX_EPOCH + Duration::from_millis(since_ms))
            .unwrap_or_default(),
    )
}

/// Time from `since` to the watchdog's `observed_at` of the death that made the job final
/// (from the transition's evidence): the detection part of [`commit_latency`].
pub fn detect_latency(audit: &[AuditEntry], since: SystemTime) -> Option<Duration> {
    let entry = final_transitions(audit).into_iter().next()?;
    let observed = json_find(&entry.evidence, "observed_at")?.as_str()?;
    let observed: chrono::DateTime<chrono::Utc> = observed.parse().ok()?;
    let observed = SystemTime::UNIX_EPOCH
        + Duration::from_nanos(u64::try_from(observed.timestamp_nanos_opt()?).ok()?);
    Some(observed.duration_since(since).unwrap_or_default())
}

/// The audit entries that record a final transition of the job.
pub fn final_transitions(audit: &[AuditEntry]) -> Vec<&AuditEntry> {
    audit
        .iter()
        .filter(|a| a.to_status.is_final() && a.from_status.is_some_and(JobStatus::is_active))
        .collect()
}

impl Drop for System {
    fn drop(&mut self) {
        crate::procs::kill_all_of(&self.job_ids());
    }
}

/// p-th percentile (0..=100) of `values` (sorted copy, nearest rank).
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The first value under `key` anywhere in `value` (depth first), for evidence whose exact
/// nesting is the OMA's business.
pub fn json_find<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| json_find(v, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| json_find(v, key)),
        _ => None,
    }
}

/// Scans the daemons' logs and the OMA's database file for the vCenter password that every
/// launched stand-in carries; returns the files it was found in.
pub fn files_with_secret(system: &System) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    for dir in [system.oma.dir(), system.watchdog.dir()] {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().is_some_and(|n| n != "launch-mk.sh")
                    && std::fs::read(&p).is_ok_and(|b| {
                        b.windows(crate::watchdog::SECRET_PASSWORD.len())
                            .any(|w| w == crate::watchdog::SECRET_PASSWORD.as_bytes())
                    })
                {
                    hits.push(p);
                }
            }
        }
    }
    hits
}
