//! Kill-to-commit benchmark: SIGKILL a running migratekit, time until the OMA has committed
//! the job's transition to `failed` (the time of the OMA's log line written right after the
//! commit, microsecond resolution, same clock as the kill).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::oma::OmaConfig;
use crate::system::{System, SystemOptions, percentile};

mod split;

pub use split::Step;

/// Figures of one benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchFigures {
    /// Kills measured.
    pub kills: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Worst, milliseconds.
    pub max_ms: f64,
    /// Kill to the watchdog's `observed_at`: p50, p99, milliseconds (microsecond resolution).
    pub detect_p50_ms: f64,
    /// See `detect_p50_ms`.
    pub detect_p99_ms: f64,
    /// The watchdog's detector (`auto` picks eBPF when it loads).
    pub detector: String,
    /// The OMA's polling and recovery intervals during the run.
    pub intervals: String,
    /// Where the time goes, step by step (from the watchdog's timing lines).
    pub steps: Vec<Step>,
}

impl fmt::Display for BenchFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kill-to-commit over {} SIGKILLs (detector {}, {}): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             of which kill to the watchdog's observation: p50 {:.2} ms, p99 {:.2} ms",
            self.kills,
            self.detector,
            self.intervals,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.detect_p50_ms,
            self.detect_p99_ms
        )?;
        for step in &self.steps {
            write!(f, "\n{step}")?;
        }
        Ok(())
    }
}

/// Starts one system and measures `kills` SIGKILLs, one job at a time. The OMA runs with the
/// intervals it ships with (polling every 5 s), or with `busy` with the tests' (polling every
/// 0.2 s, recovery every 2 s), so that polls and recovery runs share the disk and the
/// database with the deaths far more often.
pub fn kill_to_commit(kills: usize, busy: bool) -> crate::Result<BenchFigures> {
    let oma = if busy {
        OmaConfig::default()
    } else {
        OmaConfig::shipped()
    };
    let intervals = format!(
        "OMA polling every {} s, recovery every {} s",
        oma.poll_interval_secs, oma.recovery_interval_secs
    );
    let sys = System::start(&SystemOptions {
        oma,
        ..SystemOptions::default()
    })?;
    // The detector that actually runs, as the watchdog's /health reports it.
    let detector = sys
        .watchdog
        .client()
        .raw(reqwest::Method::GET, "/health", None, None)
        .ok()
        .and_then(|a| serde_json::from_str::<serde_json::Value>(&a.body).ok())
        .and_then(|v| crate::system::json_find(&v, "detector").cloned())
        .map_or_else(|| "unknown".to_owned(), |d| d.to_string());
    let mut ms = Vec::with_capacity(kills);
    let mut detect_ms = Vec::with_capacity(kills);
    let mut measured = Vec::with_capacity(kills);
    for i in 0..kills {
        let job = format!("bench-{i}");
        let p = sys.start_job(&job, "")?;
        sys.wait_recorded(&job, p)?;
        // Let the process settle (the launcher's registration and the exec are done).
        std::thread::sleep(Duration::from_millis(20));
        let killed_us = split::monotonic_us();
        let killed_wall_us = chrono::Utc::now().timestamp_micros();
        let (_, latency, detect) = sys.kill_and_measure(&job, p, libc::SIGKILL)?;
        ms.push(latency.as_secs_f64() * 1e3);
        measured.push(split::Kill {
            job_id: job.clone(),
            process: p,
            killed_us,
            killed_wall_us,
            total_us: latency.as_micros() as u64,
        });
        if let Some(d) = detect {
            detect_ms.push(d.as_secs_f64() * 1e3);
        }
        if (i + 1) % 50 == 0 {
            eprintln!("  {} kills measured", i + 1);
        }
    }
    Ok(BenchFigures {
        kills,
        p50_ms: percentile(&ms, 50.0).unwrap_or_default(),
        p99_ms: percentile(&ms, 99.0).unwrap_or_default(),
        max_ms: ms.iter().copied().fold(0.0, f64::max),
        detect_p50_ms: percentile(&detect_ms, 50.0).unwrap_or_default(),
        detect_p99_ms: percentile(&detect_ms, 99.0).unwrap_or_default(),
        detector,
        intervals,
        steps: split::split(sys.watchdog.log_path(), sys.oma.log_path(), &measured),
    })
}
