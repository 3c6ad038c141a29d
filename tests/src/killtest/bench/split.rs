//! Where the time of each kill goes: the watchdog's timing lines (monotonic microseconds,
//! logged at debug on `vma_watchdog::latency`) set against the kill's own monotonic time and
//! the OMA's commit, step by step.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::system::percentile;

/// One kill as the benchmark saw it.
#[derive(Debug, Clone)]
pub struct Kill {
    /// The job.
    pub job_id: String,
    /// The process killed.
    pub process: api::ProcessIdentity,
    /// `CLOCK_MONOTONIC` just before `kill(2)`, microseconds.
    pub killed_us: u64,
    /// The wall clock at the same moment, microseconds since the epoch (the OMA's timing
    /// lines use it).
    pub killed_wall_us: i64,
    /// Kill to the OMA's commit, microseconds.
    pub total_us: u64,
}

/// p50 and p99 of one step, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// What the step covers.
    pub name: &'static str,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Kills that had the timing lines for this step.
    pub samples: usize,
}

/// One of the slowest kills, step by step (milliseconds, `None` where a timing line is
/// missing), so that a tail can be told apart from a sum of medians.
#[derive(Debug, Clone, Serialize)]
pub struct SlowKill {
    /// The job.
    pub job_id: String,
    /// Kill to commit, milliseconds.
    pub total_ms: f64,
    /// Each of the steps of the split (`STEPS`), in order.
    pub steps_ms: Vec<Option<f64>>,
}

/// How many of the slowest kills [`split`] details.
const SLOWEST: usize = 3;

/// The steps, in order; each ends where the next begins, so they add up to the total.
const STEPS: [&str; 12] = [
    "kill -> the kernel's exit tracepoint",
    "tracepoint -> the daemon's event loop",
    "event loop -> the reporting thread",
    "reporting -> the outbox's lock taken",
    "the outbox's write(2)",
    "the outbox's fdatasync(2)",
    "outbox -> delivery POST starts",
    "POST -> OMA handler (HTTP, auth, JSON)",
    "handler -> transaction begun",
    "transaction's statements",
    "commit (fsync)",
    "commit -> its log line",
];

/// Monotonic time of the OMA's commit of `kill`.
fn committed_us(kill: &Kill) -> u64 {
    kill.killed_us + kill.total_us
}

/// The steps when the watchdog's delivery starts while the outbox flushes
/// (`--outbox-flush-order parallel`): the flush is off the path, timed beside it.
const PARALLEL_STEPS: [&str; 12] = [
    "kill -> the kernel's exit tracepoint",
    "tracepoint -> the daemon's event loop",
    "event loop -> the reporting thread",
    "reporting -> the outbox's lock taken",
    "the outbox's write(2)",
    "write -> delivery POST starts",
    "POST -> OMA handler (HTTP, auth, JSON)",
    "handler -> transaction begun",
    "transaction's statements",
    "commit (fsync)",
    "commit -> its log line",
    "(beside: the outbox's fdatasync(2))",
];

/// Reads the watchdog's log at `log` and the OMA's at `oma_log`, and splits every kill in
/// `kills`: the steps' percentiles, and the slowest kills one by one. With `parallel`, the
/// outbox's flush runs beside the POST: it is left out of the chain and timed on its own.
pub fn split(
    log: &Path,
    oma_log: &Path,
    kills: &[Kill],
    parallel: bool,
) -> (Vec<Step>, Vec<SlowKill>) {
    let (samples, slowest) = split_raw(log, oma_log, kills, parallel);
    (steps(parallel, &samples), slowest)
}

/// The steps' percentiles over `samples` (one list per step, as [`split_raw`] gives them,
/// possibly pooled over several runs).
pub fn steps(parallel: bool, samples: &[Vec<f64>]) -> Vec<Step> {
    let names = if parallel { PARALLEL_STEPS } else { STEPS };
    names
        .iter()
        .zip(samples)
        .map(|(name, s)| Step {
            name,
            p50_ms: percentile(s, 50.0).unwrap_or_default(),
            p99_ms: percentile(s, 99.0).unwrap_or_default(),
            samples: s.len(),
        })
        .collect()
}

/// [`split`] before the percentiles: every kill's time of each step, and the slowest kills.
pub fn split_raw(
    log: &Path,
    oma_log: &Path,
    kills: &[Kill],
    parallel: bool,
) -> (Vec<Vec<f64>>, Vec<SlowKill>) {
    let names = if parallel { PARALLEL_STEPS } else { STEPS };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let oma_text = std::fs::read_to_string(oma_log).unwrap_or_default();
    let oma = oma_timings(&oma_text);
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.contains("_timing\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let watchdog = WatchdogTimings::index(&lines);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut slowest: Vec<SlowKill> = Vec::new();
    for kill in kills {
        let steps_ms = kill_steps(kill, &watchdog, &oma, parallel);
        for (i, ms) in steps_ms.iter().enumerate() {
            samples[i].extend(*ms);
        }
        slowest.push(SlowKill {
            job_id: kill.job_id.clone(),
            total_ms: kill.total_us as f64 / 1e3,
            steps_ms,
        });
        slowest.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        slowest.truncate(SLOWEST);
    }
    (samples, slowest)
}

/// The OMA's timing lines in `oma_text` (tracing's JSON: the event's fields under `fields`),
/// merged by first event id: one delivery's intake is logged over two lines, `intake_timing`
/// from the handler and `tx_timing` from the store.
fn oma_timings(oma_text: &str) -> HashMap<String, Value> {
    let mut oma: HashMap<String, Value> = HashMap::new();
    for line in oma_text.lines().filter(|l| l.contains("_timing\"")) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let f = &v["fields"];
        if let Some(id) = f["first_event_id"].as_str() {
            let entry = oma
                .entry(id.to_owned())
                .or_insert_with(|| Value::Object(Default::default()));
            if let (Value::Object(into), Value::Object(from)) = (entry, f) {
                into.extend(from.clone());
            }
        }
    }
    oma
}

/// The watchdog's timing lines, indexed by what each kill knows when it looks them up.
#[derive(Default)]
struct WatchdogTimings<'a> {
    /// `exit_timing`, by process (pid, start time).
    seen: HashMap<(u64, u64), &'a Value>,
    /// `receive_timing`, by process (pid, start time).
    received: HashMap<(u64, u64), &'a Value>,
    /// `death_timing`, by job.
    deaths: HashMap<&'a str, &'a Value>,
    /// `delivery_timing`, by the first event id of the delivery.
    deliveries: HashMap<&'a str, &'a Value>,
    /// `append_timing`, by event id.
    appends: HashMap<&'a str, &'a Value>,
}

impl<'a> WatchdogTimings<'a> {
    /// Indexes `lines`, the watchdog's timing lines; a later line replaces an earlier one with
    /// the same key.
    fn index(lines: &'a [Value]) -> Self {
        let mut t = Self::default();
        for v in lines {
            match v["event"].as_str() {
                Some(kind @ ("exit_timing" | "receive_timing")) => {
                    if let (Some(pid), Some(start)) = (v["pid"].as_u64(), v["start_time"].as_u64())
                    {
                        let into = if kind == "exit_timing" {
                            &mut t.seen
                        } else {
                            &mut t.received
                        };
                        into.insert((pid, start), v);
                    }
                }
                Some("death_timing") => {
                    if let Some(job) = v["job_id"].as_str() {
                        t.deaths.insert(job, v);
                    }
                }
                Some("append_timing") => {
                    if let Some(id) = v["event_id"].as_str() {
                        t.appends.insert(id, v);
                    }
                }
                Some("delivery_timing") => {
                    if let Some(id) = v["first_event_id"].as_str() {
                        t.deliveries.insert(id, v);
                    }
                }
                _ => {}
            }
        }
        t
    }
}

/// `kill`'s time in each step, milliseconds (`None` where a timing line is missing), in the
/// order of `STEPS`, or of `PARALLEL_STEPS` with `parallel`.
fn kill_steps(
    kill: &Kill,
    watchdog: &WatchdogTimings<'_>,
    oma: &HashMap<String, Value>,
    parallel: bool,
) -> Vec<Option<f64>> {
    let us = |v: Option<&&Value>, k: &str| v.and_then(|v| v[k].as_u64());
    let process = (u64::from(kill.process.pid), kill.process.start_time);
    let exit = watchdog.seen.get(&process);
    let receipt = watchdog.received.get(&process);
    let death = watchdog.deaths.get(kill.job_id.as_str());
    let event_id = death.and_then(|d| d["event_id"].as_str());
    let delivery = event_id.and_then(|id| watchdog.deliveries.get(id));
    let append = event_id.and_then(|id| watchdog.appends.get(id));
    let intake = event_id.and_then(|id| oma.get(id));
    // The OMA's wall-clock microseconds on the monotonic clock of this kill.
    let offset = kill.killed_wall_us - kill.killed_us as i64;
    let wall = |k: &str| {
        intake
            .and_then(|v| v[k].as_i64())
            .and_then(|w| u64::try_from(w - offset).ok())
    };
    let points = [
        Some(kill.killed_us),
        us(exit, "kernel_us"),
        us(exit, "seen_us"),
        us(receipt, "received_us"),
        us(append, "locked_us"),
        us(append, "written_us"),
        us(append, "synced_us"),
        us(delivery, "post_us"),
        wall("entered_us"),
        wall("begun_us"),
        wall("commit_us"),
        wall("committed_us"),
        Some(committed_us(kill)),
    ];
    let step = |from: Option<u64>, to: Option<u64>| match (from, to) {
        (Some(from), Some(to)) => Some(to.saturating_sub(from) as f64 / 1e3),
        _ => None,
    };
    let mut steps_ms: Vec<Option<f64>> = points
        .windows(2)
        .map(|pair| step(pair[0], pair[1]))
        .collect();
    if parallel {
        // Out of the chain: written -> POST replaces fdatasync and synced -> POST.
        steps_ms.splice(5..7, [step(points[5], points[7])]);
        steps_ms.push(step(points[5], points[6]));
    }
    steps_ms
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  {:<40} p50 {:>6.2} ms  p99 {:>6.2} ms  ({} kills)",
            self.name, self.p50_ms, self.p99_ms, self.samples
        )
    }
}

impl fmt::Display for SlowKill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "  {} {:.2} ms:", self.job_id, self.total_ms)?;
        for ms in &self.steps_ms {
            match ms {
                Some(ms) => write!(f, " {ms:.2}")?,
                None => write!(f, " -")?,
            }
        }
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` in microseconds: the clock of the watchdog's timing lines and of
/// `bpf_ktime_get_ns`.
pub use vma_watchdog::clock::monotonic_us;
