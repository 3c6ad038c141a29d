//! The soak behind `cargo xtask soak`: the real daemons (the kill tests' system, OMA and VMA
//! in two network namespaces) and stand-in migratekit processes under a long random fault
//! schedule that its seed reproduces ([`schedule`]), with the invariants checked about every
//! second while it runs (`invariants.rs`), not only at the end.
//!
//! A violation stops the run: the error names the invariant, the job, the seed and the last
//! faults, so that `cargo xtask soak --seed S --faults N` replays the same schedule.

mod exactly_once;
mod faults;
mod invariants;
mod jobs;
pub mod postgres;
pub mod schedule;
pub mod storage;
mod storage_faults;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::killtest::{Backend, FreshDatabase};
use crate::system::{System, SystemOptions};
use jobs::SoakJob;
use schedule::Fault;

/// How often the invariants are checked while the schedule runs.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How many of the last faults a violation prints.
const LAST_FAULTS: usize = 15;

/// What a soak is asked to do.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// Faults in the schedule.
    pub faults: usize,
    /// The schedule's seed.
    pub seed: u64,
    /// The OMA's store; on postgres, the soak runs a server of its own (it restarts it).
    pub postgres: bool,
    /// The watchdog's `--detector`.
    pub detector: String,
    /// The checkout, for the PostgreSQL script.
    pub workspace: std::path::PathBuf,
}

/// What a soak that ended without a violation reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    /// The seed.
    pub seed: u64,
    /// Faults run.
    pub faults: usize,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The detector that ran (as the watchdog's `/health` says).
    pub detector: String,
    /// Faults by kind.
    pub by_kind: BTreeMap<String, usize>,
    /// Jobs started.
    pub jobs: usize,
    /// Jobs judged final with a right verdict and exactly one final transition.
    pub judged: usize,
    /// The judged jobs by final status and failure class (e.g. `failed/process_killed`).
    pub verdicts: BTreeMap<String, usize>,
    /// Invariant checks done while the schedule ran (each covers every job).
    pub checks: usize,
    /// The largest resident set and open file count seen per daemon.
    pub max_rss_kib: BTreeMap<String, u64>,
    /// See `max_rss_kib`.
    pub max_fds: BTreeMap<String, usize>,
    /// Wall time, seconds.
    pub duration_secs: f64,
    /// Windows of injected write/fsync errors in which calls failed and the daemon logged it,
    /// by daemon.
    pub io_errors_reported: BTreeMap<String, usize>,
    /// Events of soak jobs appended to the watchdog's outbox (distinct ids), each checked
    /// acknowledged once and applied once.
    pub outbox_events: usize,
    /// Events the watchdog held in memory on a full disk (and wrote once it was freed).
    pub held_in_memory: usize,
    /// Injected failures of SQLite's automatic checkpoints (writes of the main database
    /// file), which SQLite retries without telling the OMA.
    pub sqlite_checkpoint_failures: usize,
    /// Times the OMA stopped itself on a SQLite I/O error (exit 75) and was started again,
    /// as systemd does, once its files could be written.
    pub oma_io_error_exits: usize,
}

/// The running soak: the system, its jobs, the outages now open, the faults so far.
struct Soak {
    sys: System,
    // Dropped after `sys`, whose OMA uses it.
    _database: Option<FreshDatabase>,
    cluster: Option<postgres::Cluster>,
    jobs: Vec<SoakJob>,
    cgroups: Vec<crate::cgroup::MemCgroup>,
    /// Processes forced onto dead jobs' pids; killed when the soak ends.
    decoys: Vec<std::process::Child>,
    outages: faults::Outages,
    detector: String,
    started: Instant,
    /// Since when reads of the OMA have failed, if they do.
    api_failing: Option<Instant>,
    last: VecDeque<String>,
    report: SoakReport,
    /// The small tmpfs under the watchdog's state directory (dropped after `sys`).
    state_fs: Option<storage::StateFs>,
    /// The watchdog's storage log lines when the disk last filled.
    disk_marks: storage_faults::DiskMarks,
    /// The outbox's records so far (exactly-once check).
    ledger: exactly_once::Ledger,
    /// The compiled `LD_PRELOAD` shim that injects write/fsync errors (dropped last: every
    /// process started until then loads it).
    shim: Option<storage::IoShim>,
}

/// Runs the soak; `Err` carries a violation (with the seed and the last faults) or a
/// harness failure.
pub fn run(config: &SoakConfig) -> Result<SoakReport, String> {
    let schedule = schedule::make(config.seed, config.faults, config.postgres);
    let mut soak = Soak::start(config)?;
    eprintln!(
        "soak: seed {} faults {} backend {} detector {} (replay: cargo xtask soak --seed {} --faults {} --backend {} --detector {})",
        config.seed,
        config.faults,
        soak.report.backend,
        soak.detector,
        config.seed,
        config.faults,
        soak.report.backend,
        config.detector
    );
    let outcome = soak.run_schedule(&schedule).and_then(|()| soak.finish());
    outcome.map_err(|violation| soak.explain(config, &violation))?;
    soak.report.duration_secs = soak.started.elapsed().as_secs_f64();
    soak.report.jobs = soak.jobs.len();
    Ok(soak.report.clone())
}

impl Soak {
    fn start(config: &SoakConfig) -> Result<Self, String> {
        let cluster = match config.postgres {
            true => Some(postgres::Cluster::start(&config.workspace)?),
            false => None,
        };
        let backend = match &cluster {
            Some(c) => Backend::Postgres {
                admin_url: c.url.clone(),
            },
            None => Backend::Sqlite,
        };
        // Built and put in the environment before any daemon starts (and before this process
        // has other threads): every daemon the soak starts inherits it.
        let shim = storage::IoShim::build()?;
        // SAFETY: no other thread runs yet (the system, its clients and their threads start
        // below), so nothing reads the environment concurrently.
        unsafe {
            std::env::set_var("LD_PRELOAD", &shim.library);
            std::env::set_var(storage::CTL_ENV, &shim.ctl);
        }
        let database = backend.fresh()?;
        let options = SystemOptions {
            partitioned: true,
            detector: config.detector.clone(),
            oma: crate::killtest::oma_config(database.as_ref(), true)?,
            ..SystemOptions::default()
        };
        let mut sys = System::start(&options).map_err(|e| format!("starting the system: {e}"))?;
        // The state directory onto a small tmpfs of its own, which the soak fills and frees.
        sys.watchdog
            .stop()
            .map_err(|e| format!("stopping the watchdog: {e}"))?;
        let state_fs = storage::StateFs::mount(&sys.watchdog.dir().join("state"))?;
        sys.watchdog
            .start_again()
            .map_err(|e| format!("starting the watchdog on its tmpfs: {e}"))?;
        let detector = sys
            .detector()
            .map_err(|e| format!("asking the watchdog's detector: {e}"))?;
        let report = SoakReport {
            seed: config.seed,
            backend: backend.name().to_owned(),
            detector: detector.clone(),
            ..SoakReport::default()
        };
        Ok(Self {
            sys,
            _database: database,
            cluster,
            jobs: Vec::new(),
            cgroups: Vec::new(),
            decoys: Vec::new(),
            outages: faults::Outages::new(),
            detector,
            started: Instant::now(),
            api_failing: None,
            last: VecDeque::new(),
            report,
            shim: Some(shim),
            state_fs: Some(state_fs),
            disk_marks: storage_faults::DiskMarks::default(),
            ledger: exactly_once::Ledger::default(),
        })
    }

    /// Runs every fault in order, checking the invariants about every second meanwhile.
    fn run_schedule(&mut self, schedule: &[Fault]) -> Result<(), String> {
        let mut next_check = Instant::now();
        for fault in schedule {
            let until = Instant::now() + Duration::from_millis(fault.pause_ms.into());
            loop {
                let now = Instant::now();
                if now >= next_check {
                    self.check()?;
                    next_check = Instant::now() + CHECK_EVERY;
                }
                if now >= until {
                    break;
                }
                std::thread::sleep((until - now).min(next_check.saturating_duration_since(now)));
            }
            let line = format!("[t={:8.3}s] {fault}", self.started.elapsed().as_secs_f64());
            let done = self.apply(fault)?;
            self.note(format!("{line} -> {done}"));
            *self.report.by_kind.entry(faults::kind(fault)).or_default() += 1;
            self.report.faults += 1;
        }
        Ok(())
    }

    /// Logs a fault and keeps it among the last ones.
    fn note(&mut self, line: String) {
        eprintln!("soak: {line}");
        self.last.push_back(line);
        if self.last.len() > LAST_FAULTS {
            self.last.pop_front();
        }
    }

    /// One round of the invariants, counted.
    fn check(&mut self) -> Result<(), String> {
        self.supervise_oma()?;
        invariants::check(self).map_err(|v| format!("VIOLATION: {v}"))?;
        self.report.checks += 1;
        Ok(())
    }

    /// Heals every outage, kills what still runs, and waits until every job is final and
    /// judged; then checks every job's audit trail once more.
    fn finish(&mut self) -> Result<(), String> {
        self.heal()?;
        let targets: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| self.jobs[i].runs_until_killed())
            .collect();
        for i in targets {
            self.kill(i, libc::SIGKILL);
        }
        let deadline = Instant::now() + jobs::ACTIVE_AFTER_DEATH + Duration::from_secs(10);
        loop {
            self.check()?;
            if self.jobs.iter().all(|j| j.judged) {
                break;
            }
            if Instant::now() > deadline {
                let left: Vec<String> = self
                    .jobs
                    .iter()
                    .filter(|j| !j.judged)
                    .map(|j| match self.sys.oma.job(&j.id) {
                        Ok(o) => format!(
                            "{} ({:?}, {:?}, process {:?} alive {}, pid at the OMA {:?})",
                            j.id,
                            j.fate,
                            o.status,
                            j.process,
                            j.process.is_some_and(crate::procs::is_alive),
                            o.pid
                        ),
                        Err(e) => format!("{} (unreadable: {e})", j.id),
                    })
                    .collect();
                return Err(format!(
                    "jobs never became final after the soak healed everything: {left:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        invariants::final_audit(self).map_err(|v| format!("VIOLATION: {v}"))
    }

    /// The violation with what a replay needs: the seed, the counts, the last faults.
    fn explain(&self, config: &SoakConfig, violation: &str) -> String {
        let mut out = format!(
            "soak stopped after {} faults ({:.1} s), seed {} backend {} detector {}:\n  {violation}\n\
             replay: cargo xtask soak --seed {} --faults {} --backend {} --detector {}\nlast faults:\n",
            self.report.faults,
            self.started.elapsed().as_secs_f64(),
            config.seed,
            self.report.backend,
            self.detector,
            config.seed,
            config.faults,
            self.report.backend,
            config.detector,
        );
        for line in &self.last {
            out.push_str(&format!("  {line}\n"));
        }
        out.push_str(&self.keep_logs(config.seed));
        out
    }

    /// Copies both daemons' logs and the stand-ins' launch logs out of their temporary
    /// directories (removed when the soak ends) into `target/soak/failed-<seed>/`.
    fn keep_logs(&self, seed: u64) -> String {
        let dir = std::path::PathBuf::from(format!("target/soak/failed-{seed}"));
        let jobs = dir.join("jobs");
        let copy = || -> std::io::Result<()> {
            std::fs::create_dir_all(&jobs)?;
            std::fs::copy(self.sys.oma.log_path(), dir.join("oma.log"))?;
            std::fs::copy(self.sys.watchdog.log_path(), dir.join("watchdog.log"))?;
            for entry in std::fs::read_dir(self.sys.watchdog.dir().join("jobs"))?.flatten() {
                std::fs::copy(entry.path(), jobs.join(entry.file_name()))?;
            }
            Ok(())
        };
        match copy() {
            Ok(()) => format!("logs kept in {}", dir.display()),
            Err(e) => format!(
                "logs (not kept: {e}): OMA {}, watchdog {}",
                self.sys.oma.log_path().display(),
                self.sys.watchdog.log_path().display()
            ),
        }
    }
}

impl Drop for Soak {
    fn drop(&mut self) {
        if let Some(shim) = &self.shim {
            let _ = shim.heal();
        }
        let _ = self.sys.watchdog.sigkill();
        let ids: Vec<String> = self.jobs.iter().map(|j| j.id.clone()).collect();
        crate::procs::kill_all_of(&ids);
        for decoy in &mut self.decoys {
            let _ = decoy.kill();
            let _ = decoy.wait();
        }
    }
}
