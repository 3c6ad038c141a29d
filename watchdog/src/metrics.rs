//! The watchdog's Prometheus metrics: one explicit registry (prefix `vma_watchdog_`) and its
//! typed families, counted where things happen (a death in the event loop, a delivery attempt,
//! a launch or a progress update at the REST API), plus what other parts keep already (the
//! outbox's depth, the registry's write errors, the kernel programs' counters), copied when
//! Prometheus scrapes. `/metrics` itself is served by `daemon_support::metrics`.
//!
//! No label ever holds a job id or a pid: a series per job would grow without bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use api::DeathClass;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::MethodRouter;
use chrono::{DateTime, Utc};
use daemon_support::metrics::{DaemonMetrics, Scrape, mirror};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::daemon::Tracker;

/// The class of a death that happened while no watchdog ran (found at start).
pub const DIED_WHILE_UNWATCHED: &str = "died_while_unwatched";

/// The default `--metrics-listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9181";

/// Labels of `build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    detector: &'static str,
    exit_mode: &'static str,
}

/// A death's class (`process_exited`, `process_killed`, `oom_killed`, `status_unknown`,
/// `died_while_unwatched`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

/// An outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// A kernel program (`watchdog_exit`, `watchdog_exec`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabel {
    program: &'static str,
}

/// Every metric of the watchdog.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    daemon: Arc<DaemonMetrics>,
    build: Family<BuildLabels, Gauge>,
    deaths: Family<ClassLabel, Counter>,
    impostors: Counter,
    delivery_attempts: Family<ResultLabel, Counter>,
    delivery_failovers: Counter,
    death_to_ack: Histogram,
    launches: Family<ResultLabel, Counter>,
    progress_updates: Family<ResultLabel, Counter>,
    progress_feed_requests: Counter,
    progress_feed_jobs: Counter,
    watched: Gauge,
    outbox_events: Gauge,
    outbox_bytes: Gauge,
    outbox_max_events: Gauge,
    outbox_max_bytes: Gauge,
    outbox_oldest_age: Gauge<f64, AtomicU64>,
    outbox_refused: Counter,
    resident_memory: Gauge,
    resident_memory_peak: Gauge,
    outbox_flush_failures: Counter,
    storage_degraded: Gauge,
    events_held_in_memory: Gauge,
    outbox_write_errors: Counter,
    registry_write_errors: Counter,
    ring_lost: Counter,
    kernel_read_errors: Counter,
    program_runs: Family<ProgramLabel, Counter>,
    program_run_time: Family<ProgramLabel, Counter<f64, AtomicU64>>,
}

impl Metrics {
    /// A registry with every family, all at zero.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("vma_watchdog");
        let daemon = DaemonMetrics::register(&mut registry);
        let m = Self {
            daemon,
            build: Family::default(),
            deaths: Family::default(),
            impostors: Counter::default(),
            delivery_attempts: Family::default(),
            delivery_failovers: Counter::default(),
            // 1 ms to about 65 s: a death is acknowledged in milliseconds while the OMA is
            // up; anything slower waited for it in the outbox.
            death_to_ack: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            launches: Family::default(),
            progress_updates: Family::default(),
            progress_feed_requests: Counter::default(),
            progress_feed_jobs: Counter::default(),
            watched: Gauge::default(),
            outbox_events: Gauge::default(),
            outbox_bytes: Gauge::default(),
            outbox_max_events: Gauge::default(),
            outbox_max_bytes: Gauge::default(),
            outbox_oldest_age: Gauge::default(),
            outbox_refused: Counter::default(),
            resident_memory: Gauge::default(),
            resident_memory_peak: Gauge::default(),
            outbox_flush_failures: Counter::default(),
            storage_degraded: Gauge::default(),
            events_held_in_memory: Gauge::default(),
            outbox_write_errors: Counter::default(),
            registry_write_errors: Counter::default(),
            ring_lost: Counter::default(),
            kernel_read_errors: Counter::default(),
            program_runs: Family::default(),
            program_run_time: Family::default(),
            registry,
        };
        // Every death class at 0 from the start: `increase()` misses the first death of a
        // series that appears at 1.
        for class in [
            DeathClass::Exited,
            DeathClass::Killed,
            DeathClass::OomKilled,
            DeathClass::Unknown,
        ] {
            let _ = m.deaths.get_or_create(&ClassLabel {
                class: class.as_str(),
            });
        }
        let _ = m.deaths.get_or_create(&ClassLabel {
            class: DIED_WHILE_UNWATCHED,
        });
        Arc::new(m.registered())
    }

    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        // Name, help, (unit,) family: one line each, as the exported name reads.
        daemon_support::register! { r,
            "build_info", "Version, detector and kernel exit mode of this watchdog (value 1)", self.build.clone();
            "processes_watched", "migratekit processes registered and running", self.watched.clone();
            "deaths", "migratekit deaths recorded for the OMA, by class", self.deaths.clone();
            "impostors_ignored", "Processes named like migratekit that were not adopted", self.impostors.clone();
            "ebpf_ring_events_lost", "Events the kernel program could not put in the full ring buffer", self.ring_lost.clone();
            "ebpf_read_errors", "Failed kernel memory reads in the kernel programs", self.kernel_read_errors.clone();
            "ebpf_program_runs", "Runs of each kernel program (counted while kernel.bpf_stats_enabled is 1)", self.program_runs.clone();
            "ebpf_program_run" in Seconds, "Time spent in each kernel program (counted while kernel.bpf_stats_enabled is 1)", self.program_run_time.clone();
            "outbox_events", "Events in the outbox, not yet acknowledged by the OMA", self.outbox_events.clone();
            "outbox" in Bytes, "Size of the outbox's unacknowledged events on disk", self.outbox_bytes.clone();
            "outbox_max_events", "Bound on outbox_events (--outbox-max-events)", self.outbox_max_events.clone();
            "outbox_max" in Bytes, "Bound on outbox_bytes (--outbox-max-bytes)", self.outbox_max_bytes.clone();
            "outbox_oldest_event_age" in Seconds, "Age of the oldest unacknowledged event (0 when none)", self.outbox_oldest_age.clone();
            "outbox_refused_events", "Events refused because the outbox was full", self.outbox_refused.clone();
            "resident_memory" in Bytes, "The daemon's resident memory (VmRSS)", self.resident_memory.clone();
            "resident_memory_peak" in Bytes, "The most the daemon has had resident since it started (VmHWM)", self.resident_memory_peak.clone();
            "outbox_flush_failures", "Appended events whose fdatasync failed (kept in memory and delivered)", self.outbox_flush_failures.clone();
            "storage_degraded", "1 while the outbox cannot be written (full or failing disk) and events are held in memory", self.storage_degraded.clone();
            "events_held_in_memory", "Events held in memory because the outbox could not write them", self.events_held_in_memory.clone();
            "outbox_write_errors", "Failed writes (write or fdatasync) of the outbox's events", self.outbox_write_errors.clone();
            "delivery_attempts", "Attempts to deliver a batch of events to the OMA, by result", self.delivery_attempts.clone();
            "delivery_failovers", "Moves to the next --oma-url after an OMA was unreachable or failed (5xx)", self.delivery_failovers.clone();
            "death_to_ack" in Seconds, "Time from a death's observation to the OMA's acknowledgement", self.death_to_ack.clone();
            "launches", "Requests to start migratekit, by result", self.launches.clone();
            "progress_updates", "Progress updates posted by migratekit, by result", self.progress_updates.clone();
            "progress_feed_requests", "Answers to the OMA's progress feed (GET /api/v1/progress)", self.progress_feed_requests.clone();
            "progress_feed_jobs", "Jobs' progress sent in answers to the progress feed", self.progress_feed_jobs.clone();
            "registry_write_errors", "Failed writes of the process registry's file", self.registry_write_errors.clone();
        }
        self
    }

    /// Counts one answer of the progress feed and the jobs it carried.
    pub fn progress_feed(&self, jobs: usize) {
        self.progress_feed_requests.inc();
        self.progress_feed_jobs.inc_by(jobs as u64);
    }

    /// Says which detector runs and how the kernel decides deaths (`build_info`).
    pub fn set_build(&self, detector: &'static str, exit_mode: &'static str) {
        self.build.clear();
        self.build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                detector,
                exit_mode,
            })
            .set(1);
    }

    /// The registry, for `/metrics` and for checks that dashboards and alerts name metrics
    /// that exist.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The HTTP families, for the routers' layer.
    pub fn daemon(&self) -> &Arc<DaemonMetrics> {
        &self.daemon
    }

    /// Counts a death recorded for the OMA.
    pub fn death(&self, class: &'static str) {
        self.deaths.get_or_create(&ClassLabel { class }).inc();
    }

    /// Counts a process named like migratekit that was not adopted.
    pub fn impostor(&self) {
        self.impostors.inc();
    }

    /// Counts a move to the next OMA (see `crate::outbox::omas`).
    pub fn delivery_failover(&self) {
        self.delivery_failovers.inc();
    }

    /// Counts a delivery attempt.
    pub fn delivery_attempt(&self, result: &'static str) {
        self.delivery_attempts
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Observes the time from each acknowledged death's observation to now.
    pub fn deaths_acknowledged(&self, observed: &[DateTime<Utc>]) {
        let now = Utc::now();
        for at in observed {
            let ms = (now - *at).num_milliseconds().max(0);
            self.death_to_ack.observe(ms as f64 / 1000.0);
        }
    }

    /// Brings the values other parts keep up to date (called at each scrape).
    pub fn refresh(&self, tracker: &Tracker) {
        self.daemon.refresh();
        self.watched.set(tracker.registry().running().len() as i64);
        let outbox = tracker.outbox().stats();
        self.outbox_events.set(outbox.queued as i64);
        self.outbox_bytes.set(outbox.queued_bytes as i64);
        self.outbox_max_events.set(outbox.max_events as i64);
        self.outbox_max_bytes.set(outbox.max_bytes as i64);
        self.outbox_oldest_age
            .set(outbox.oldest_age_seconds.unwrap_or(0.0));
        mirror(&self.outbox_refused, outbox.refused);
        if let Some(resident) = crate::memory::resident_of(None) {
            self.resident_memory
                .set(i64::try_from(resident.rss).unwrap_or(i64::MAX));
            self.resident_memory_peak
                .set(i64::try_from(resident.peak).unwrap_or(i64::MAX));
        }
        let storage = tracker.spill().health();
        self.storage_degraded
            .set(i64::from(storage.state == "degraded"));
        self.events_held_in_memory
            .set(storage.held_in_memory as i64);
        mirror(&self.outbox_write_errors, storage.write_errors);
        mirror(
            &self.outbox_flush_failures,
            tracker.outbox().flush_failures(),
        );
        mirror(
            &self.registry_write_errors,
            tracker.registry().write_errors(),
        );
        if let Some(kernel) = tracker.kernel_counters() {
            mirror(&self.ring_lost, kernel.stats.events_dropped);
            mirror(&self.kernel_read_errors, kernel.stats.read_errors);
            for run in kernel.runs {
                let label = ProgramLabel {
                    program: run.program,
                };
                mirror(&self.program_runs.get_or_create(&label), run.run_count);
                let time = self.program_run_time.get_or_create(&label);
                let grown = run.run_time.as_secs_f64() - time.get();
                if grown > 0.0 {
                    time.inc_by(grown);
                }
            }
        }
    }

    /// `route` (the start route) with each launch counted by its answer: `started`,
    /// `already_running`, `invalid`, `failed`.
    pub fn count_launches<S: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        route: MethodRouter<S>,
    ) -> MethodRouter<S> {
        route.layer(axum::middleware::from_fn_with_state(
            Arc::clone(self),
            count_launch,
        ))
    }

    /// Counts a progress update by its answer: `accepted`, `refused` (not from the job's own
    /// process, or not from this host), `invalid`, `failed`.
    fn progress_update(&self, status: StatusCode) {
        let result = match status.as_u16() {
            200..=299 => "accepted",
            403 => "refused",
            400..=499 => "invalid",
            _ => "failed",
        };
        self.progress_updates
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

async fn count_launch(State(m): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let result = match response.status().as_u16() {
        200..=299 => "started",
        409 => "already_running",
        400..=499 => "invalid",
        _ => "failed",
    };
    m.launches.get_or_create(&ResultLabel { result }).inc();
    response
}

/// Middleware of the progress route (outside its loopback and job-process checks, so that
/// refusals are counted too).
pub async fn count_progress(
    State(m): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    m.progress_update(response.status());
    response
}

/// What `/metrics` serves: the metrics, refreshed from the daemon's state at each scrape.
#[derive(Debug)]
pub struct Scraped {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The daemon's state.
    pub tracker: Tracker,
}

impl Scrape for Scraped {
    fn registry(&self) -> &Registry {
        &self.metrics.registry
    }

    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.metrics.refresh(&self.tracker);
        Box::pin(async {})
    }
}
