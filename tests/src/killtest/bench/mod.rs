//! Kill-to-commit benchmark: SIGKILL a running migratekit, time until the OMA has committed
//! the job's transition to `failed` (the time of the OMA's log line written right after the
//! commit, microsecond resolution, same clock as the kill).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::oma::OmaConfig;
use crate::system::{System, SystemOptions, percentile};

mod flush;
mod split;

pub use flush::{FlushComparison, flush_compare};

pub use split::{SlowKill, Step};

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
    /// The slowest kills, each split into the same steps.
    pub slowest: Vec<SlowKill>,
    /// The baseline, measured in the same run on the same filesystem: one append and
    /// `fdatasync(2)` every 20 ms, as isolated as a death's; p50 and p99, milliseconds. A death
    /// has one on its path (the OMA's commit); the outbox's runs beside the POST with the
    /// watchdog's default `--outbox-flush-order parallel` (`serial` puts both on the path).
    pub fdatasync_p50_ms: f64,
    /// See `fdatasync_p50_ms`.
    pub fdatasync_p99_ms: f64,
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
        write!(
            f,
            "\nthe slowest kills, the same steps in the same order (ms):"
        )?;
        for kill in &self.slowest {
            write!(f, "\n{kill}")?;
        }
        write!(
            f,
            "\nbaseline, same run and filesystem: one isolated append + fdatasync p50 {:.2} ms, \
             p99 {:.2} ms (a death has one on its path, the OMA's commit; the outbox's runs beside it)",
            self.fdatasync_p50_ms, self.fdatasync_p99_ms
        )
    }
}

/// Starts one system and measures `kills` SIGKILLs, one job at a time. The OMA runs with the
/// intervals it ships with (polling every 5 s), or with `busy` with the tests' (polling every
/// 0.2 s, recovery every 2 s), so that polls and recovery runs share the disk and the
/// database with the deaths far more often. The watchdog runs with `--detector detector`;
/// with `tls`, both daemons run HTTPS with mutual TLS, so a death's delivery pays for TLS
/// (a handshake only when the kept-alive connection was closed). With `metrics`, both serve
/// `/metrics` and are scraped every second while the kills go on (Prometheus's default is
/// 15 s); without, both run with `--metrics-listen off`.
pub fn kill_to_commit(
    kills: usize,
    busy: bool,
    detector: &str,
    tls: bool,
    metrics: bool,
) -> crate::Result<BenchFigures> {
    let oma = if busy {
        OmaConfig::default()
    } else {
        OmaConfig::shipped()
    };
    let intervals = intervals(&oma, tls, metrics);
    let sys = System::start(&SystemOptions {
        oma,
        tls,
        detector: detector.to_owned(),
        metrics,
        ..SystemOptions::default()
    })?;
    let _scraper = Scraper::start([sys.oma.metrics, sys.watchdog.metrics]);
    // The detector that actually runs, as the watchdog's /health reports it.
    let detector = sys.detector()?;
    let Samples {
        ms,
        detect_ms,
        measured,
    } = measure(&sys, kills)?;
    let syncs = fdatasync_baseline(sys.oma.dir(), 200)?;
    let (steps, slowest) = split::split(
        sys.watchdog.log_path(),
        sys.oma.log_path(),
        &measured,
        // The watchdog runs with its default order: delivery beside the outbox's flush.
        true,
    );
    Ok(BenchFigures {
        kills,
        p50_ms: percentile(&ms, 50.0).unwrap_or_default(),
        p99_ms: percentile(&ms, 99.0).unwrap_or_default(),
        max_ms: ms.iter().copied().fold(0.0, f64::max),
        detect_p50_ms: percentile(&detect_ms, 50.0).unwrap_or_default(),
        detect_p99_ms: percentile(&detect_ms, 99.0).unwrap_or_default(),
        detector,
        intervals,
        steps,
        slowest,
        fdatasync_p50_ms: percentile(&syncs, 50.0).unwrap_or_default(),
        fdatasync_p99_ms: percentile(&syncs, 99.0).unwrap_or_default(),
    })
}

/// How the run was set up, for [`BenchFigures::intervals`]: the OMA's intervals, the
/// transport and the scraping.
fn intervals(oma: &OmaConfig, tls: bool, metrics: bool) -> String {
    format!(
        "OMA polling every {} s, recovery every {} s, {}, {}",
        oma.poll_interval_secs,
        oma.recovery_interval_secs,
        if tls { "mutual TLS" } else { "plain HTTP" },
        if metrics {
            "metrics scraped every 1 s"
        } else {
            "metrics off"
        }
    )
}

/// What [`measure`] saw of the kills.
struct Samples {
    /// Kill to commit of each kill, milliseconds.
    ms: Vec<f64>,
    /// Kill to the watchdog's observation, milliseconds, for the kills that carried one.
    detect_ms: Vec<f64>,
    /// Each kill, for the split.
    measured: Vec<split::Kill>,
}

/// Starts `kills` jobs on `sys` one at a time and SIGKILLs each once the OMA has recorded it.
fn measure(sys: &System, kills: usize) -> crate::Result<Samples> {
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
    Ok(Samples {
        ms,
        detect_ms,
        measured,
    })
}

/// Scrapes `/metrics` of the given endpoints every second on a thread of its own, as a
/// Prometheus server would, until dropped.
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scraper {
    fn start(endpoints: [Option<std::net::SocketAddr>; 2]) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let endpoints: Vec<_> = endpoints.into_iter().flatten().collect();
        let stopping = std::sync::Arc::clone(&stop);
        let thread = (!endpoints.is_empty()).then(|| {
            std::thread::spawn(move || {
                let http = crate::http::client();
                while !stopping.load(Ordering::Relaxed) {
                    for addr in &endpoints {
                        // A failed scrape is Prometheus's problem, not the benchmark's.
                        let _ = http.get(format!("http://{addr}/metrics")).send();
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        });
        Self { stop, thread }
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `n` appends of a death-sized line to a file in `dir`, each followed by `fdatasync(2)`, 20 ms
/// apart (as isolated as the deaths of the benchmark, which a lone flush on a virtual disk
/// pays more for than a burst); milliseconds each.
pub(crate) fn fdatasync_baseline(dir: &std::path::Path, n: usize) -> crate::Result<Vec<f64>> {
    use std::io::Write;
    let path = dir.join("fdatasync-baseline");
    let io = |e| crate::HarnessError::io(format!("measuring fdatasync in {}", dir.display()), e);
    let mut file = std::fs::File::create(&path).map_err(io)?;
    let line = [b'x'; 700];
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(20));
        let start = std::time::Instant::now();
        file.write_all(&line).map_err(io)?;
        file.sync_data().map_err(io)?;
        took.push(start.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(took)
}
