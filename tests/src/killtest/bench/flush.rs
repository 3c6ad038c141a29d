//! Kill-to-commit with the watchdog's two flush orders side by side, and with its delivery
//! turned off (only the OMA's polling and periodic recovery, at their shipped intervals, can
//! notice a death: the way the original system learned of one), all in one run.
//!
//! The two orders alternate in rounds (a fresh system each), so that a bad spell of the disk
//! falls on both; the isolated `fdatasync` baseline is measured after each round on the same
//! file system.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::split::{self, SlowKill, Step};
use crate::oma::OmaConfig;
use crate::system::{System, SystemOptions, percentile};

/// One arm's distribution, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    /// What ran.
    pub name: String,
    /// Kills measured.
    pub kills: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Worst.
    pub max_ms: f64,
    /// Where the time goes (empty for the arm without delivery).
    pub steps: Vec<Step>,
    /// The slowest kills, split.
    pub slowest: Vec<SlowKill>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct FlushComparison {
    /// The detector that ran.
    pub detector: String,
    /// Rounds of the two orders.
    pub rounds: usize,
    /// `--outbox-flush-order serial`: the outbox's flush, then the POST and the OMA's commit.
    pub serial: Arm,
    /// `--outbox-flush-order parallel`: the POST while the outbox flushes.
    pub parallel: Arm,
    /// No `--oma-url`: the OMA's poller (5 s) and recovery (60 s) find the death.
    pub unwatched: Option<Arm>,
    /// One isolated append + `fdatasync(2)` on the same file system, same run: p50.
    pub fdatasync_p50_ms: f64,
    /// See `fdatasync_p50_ms`: p99.
    pub fdatasync_p99_ms: f64,
}

/// Runs `kills` kills with each flush order (in `rounds` alternating rounds), then
/// `unwatched_kills` with the watchdog's delivery off.
pub fn flush_compare(
    kills: usize,
    rounds: usize,
    unwatched_kills: usize,
    detector: &str,
) -> crate::Result<FlushComparison> {
    let rounds = rounds.clamp(1, kills.max(1));
    let mut serial = Pooled::default();
    let mut parallel = Pooled::default();
    let mut syncs = Vec::new();
    let mut ran = String::new();
    for round in 0..rounds {
        let n = kills / rounds + usize::from(round < kills % rounds);
        for (order, pooled) in [("serial", &mut serial), ("parallel", &mut parallel)] {
            eprintln!(
                "round {}/{rounds}: {n} kills, --outbox-flush-order {order}",
                round + 1
            );
            let sys = system(detector, true, &["--outbox-flush-order", order])?;
            ran = sys.detector()?;
            let measured = measure(&sys, n, &format!("{order}-{round}"))?;
            let (samples, slowest) = split::split_raw(
                sys.watchdog.log_path(),
                sys.oma.log_path(),
                &measured,
                order == "parallel",
            );
            pooled.add(&measured, samples, slowest);
            syncs.extend(super::fdatasync_baseline(sys.oma.dir(), 100)?);
        }
    }
    let unwatched = if unwatched_kills > 0 {
        eprintln!("{unwatched_kills} kills with the watchdog's delivery off");
        let sys = system(detector, false, &[])?;
        let recovery = Duration::from_secs_f64(OmaConfig::shipped().recovery_interval_secs);
        let mut pooled = Pooled::default();
        let mut done = 0;
        while done < unwatched_kills {
            let n = UNWATCHED_BATCH.min(unwatched_kills - done);
            let measured = measure_unwatched(&sys, n, done, recovery)?;
            pooled.add(&measured, Vec::new(), Vec::new());
            done += n;
            eprintln!("  {done} kills measured");
        }
        syncs.extend(super::fdatasync_baseline(sys.oma.dir(), 100)?);
        Some(pooled.arm("delivery off: the OMA's polling and recovery", false))
    } else {
        None
    };
    Ok(FlushComparison {
        detector: ran,
        rounds,
        serial: serial.arm("serial: flush, then POST", false),
        parallel: parallel.arm("parallel: POST while flushing", true),
        unwatched,
        fdatasync_p50_ms: percentile(&syncs, 50.0).unwrap_or_default(),
        fdatasync_p99_ms: percentile(&syncs, 99.0).unwrap_or_default(),
    })
}

/// A system with the OMA at its shipped intervals and metrics off.
fn system(detector: &str, deliver: bool, args: &[&str]) -> crate::Result<System> {
    System::start(&SystemOptions {
        oma: OmaConfig::shipped(),
        detector: detector.to_owned(),
        metrics: false,
        deliver,
        watchdog_args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..SystemOptions::default()
    })
}

/// `n` jobs one after another, each SIGKILLed 20 ms after the OMA recorded its process.
fn measure(sys: &System, n: usize, tag: &str) -> crate::Result<Vec<split::Kill>> {
    let mut measured = Vec::with_capacity(n);
    for i in 0..n {
        let job = format!("{tag}-{i}");
        let p = sys.start_job(&job, "")?;
        sys.wait_recorded(&job, p)?;
        std::thread::sleep(Duration::from_millis(20));
        let killed_us = split::monotonic_us();
        let killed_wall_us = chrono::Utc::now().timestamp_micros();
        let (_, latency, _) = sys.kill_and_measure(&job, p, libc::SIGKILL)?;
        measured.push(split::Kill {
            job_id: job,
            process: p,
            killed_us,
            killed_wall_us,
            total_us: latency.as_micros() as u64,
        });
        if (i + 1) % 50 == 0 {
            eprintln!("  {} kills measured", i + 1);
        }
    }
    Ok(measured)
}

/// Jobs killed per batch with the delivery off.
const UNWATCHED_BATCH: usize = 40;

/// With the delivery off, a death waits for the OMA's next recovery run (every 60 s shipped):
/// one kill after another would take half an hour per hundred. So `n` jobs run at once and
/// are killed one by one, spread evenly over one recovery interval (each kill lands at its
/// own phase of the recovery's period, as a death at a random moment would), and each is
/// timed from its own kill to its own commit.
fn measure_unwatched(
    sys: &System,
    n: usize,
    first: usize,
    recovery: Duration,
) -> crate::Result<Vec<split::Kill>> {
    let mut jobs = Vec::with_capacity(n);
    for i in first..first + n {
        let job = format!("unwatched-{i}");
        let p = sys.start_job(&job, "")?;
        sys.wait_recorded(&job, p)?;
        jobs.push((job, p));
    }
    let gap = recovery / n.max(1) as u32;
    let mut killed = Vec::with_capacity(n);
    for (job, p) in jobs {
        let at = std::time::SystemTime::now();
        crate::procs::kill_process(p, libc::SIGKILL)?;
        killed.push((job, p, at));
        std::thread::sleep(gap);
    }
    let patience = recovery * 2 + Duration::from_secs(30);
    let mut measured = Vec::with_capacity(n);
    for (job, p, at) in killed {
        sys.oma.wait_job(&job, patience, |j| j.status.is_final())?;
        let committed =
            sys.oma
                .final_commit_logged_at(&job)
                .ok_or_else(|| crate::HarnessError::Status {
                    what: format!("job {job} has no job_transition line in the OMA's log"),
                    status: 0,
                    body: String::new(),
                })?;
        let total = committed.duration_since(at).unwrap_or_default();
        measured.push(split::Kill {
            job_id: job,
            process: p,
            killed_us: 0,
            killed_wall_us: 0,
            total_us: total.as_micros() as u64,
        });
    }
    Ok(measured)
}

/// Kills and step samples of one arm, over its rounds.
#[derive(Default)]
struct Pooled {
    ms: Vec<f64>,
    samples: Vec<Vec<f64>>,
    slowest: Vec<SlowKill>,
}

impl Pooled {
    fn add(&mut self, kills: &[split::Kill], samples: Vec<Vec<f64>>, slowest: Vec<SlowKill>) {
        self.ms
            .extend(kills.iter().map(|k| k.total_us as f64 / 1e3));
        self.samples
            .resize(samples.len().max(self.samples.len()), Vec::new());
        for (into, from) in self.samples.iter_mut().zip(samples) {
            into.extend(from);
        }
        self.slowest.extend(slowest);
        self.slowest
            .sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        self.slowest.truncate(3);
    }

    fn arm(self, name: &str, parallel: bool) -> Arm {
        Arm {
            name: name.to_owned(),
            kills: self.ms.len(),
            p50_ms: percentile(&self.ms, 50.0).unwrap_or_default(),
            p99_ms: percentile(&self.ms, 99.0).unwrap_or_default(),
            max_ms: self.ms.iter().copied().fold(0.0, f64::max),
            steps: if self.samples.is_empty() {
                Vec::new()
            } else {
                split::steps(parallel, &self.samples)
            },
            slowest: self.slowest,
        }
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} over {} SIGKILLs: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.name, self.kills, self.p50_ms, self.p99_ms, self.max_ms
        )?;
        for step in &self.steps {
            write!(f, "\n{step}")?;
        }
        if !self.steps.is_empty() {
            write!(
                f,
                "\n the slowest kills, the same steps in the same order (ms):"
            )?;
            for kill in &self.slowest {
                write!(f, "\n{kill}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for FlushComparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let budget = 2.0 * self.fdatasync_p99_ms + 1.0;
        writeln!(
            f,
            "kill-to-commit, one flush against two (detector {}, {} alternating rounds, OMA at \
             its shipped intervals, metrics off)",
            self.detector, self.rounds
        )?;
        writeln!(f, "{}\n", self.serial)?;
        writeln!(f, "{}\n", self.parallel)?;
        writeln!(
            f,
            "baseline, same run and file system: one isolated append + fdatasync p50 {:.2} ms, \
             p99 {:.2} ms",
            self.fdatasync_p50_ms, self.fdatasync_p99_ms
        )?;
        writeln!(
            f,
            "parallel against the goal: p50 {:.2} ms (goal <= 2.50: {}), p99 {:.2} ms (goal <= \
             2 x fdatasync p99 + 1 = {budget:.2}: {})",
            self.parallel.p50_ms,
            verdict(self.parallel.p50_ms <= 2.5),
            self.parallel.p99_ms,
            verdict(self.parallel.p99_ms <= budget)
        )?;
        write!(
            f,
            "serial -> parallel: p50 {:.2} -> {:.2} ms, p99 {:.2} -> {:.2} ms, max {:.2} -> {:.2} ms",
            self.serial.p50_ms,
            self.parallel.p50_ms,
            self.serial.p99_ms,
            self.parallel.p99_ms,
            self.serial.max_ms,
            self.parallel.max_ms
        )?;
        if let Some(u) = &self.unwatched {
            write!(
                f,
                "\n\n{u}\ndelivery off / parallel: p50 x{:.0}, p99 x{:.0}, max x{:.0}",
                ratio(u.p50_ms, self.parallel.p50_ms),
                ratio(u.p99_ms, self.parallel.p99_ms),
                ratio(u.max_ms, self.parallel.max_ms)
            )?;
        }
        Ok(())
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}
