//! The OMA's Prometheus metrics: one explicit registry (prefix `oma_`) and its typed families.
//!
//! The [`Store`](crate::store::Store) carries the [`Metrics`], because every part that has
//! something to count holds the store already: the commit of a job's change (transitions, in
//! `store/change.rs`, the one place every change passes after its commit), event intake,
//! recovery, the poller and the token checks. What the database knows (jobs by status, the
//! oldest active job's last progress, stalled jobs) is read with two cheap aggregate queries
//! when Prometheus scrapes, so the figures are never older than the scrape.
//!
//! No label ever holds a job id; the VMA id of `vma_last_contact_timestamp_seconds` is
//! bounded by the fleet.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use daemon_support::metrics::{DaemonMetrics, Scrape};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::AppState;
use crate::model::{FailureClass, JobStatus};
use crate::store::AuditDraft;

/// The default `--metrics-listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9182";

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    backend: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    to: &'static str,
    /// Empty for a change that sets no failure class.
    failure_class: &'static str,
    actor: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    trigger: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmaLabel {
    vma: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    state: &'static str,
}

/// Every metric of the OMA.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    daemon: Arc<DaemonMetrics>,
    build: Family<BuildLabels, Gauge>,
    jobs: Family<StatusLabel, Gauge>,
    oldest_progress_age: FloatGauge,
    stalled: Gauge,
    transitions: Family<TransitionLabels, Counter>,
    watchdog_events: Family<ResultLabel, Counter>,
    intake_commit: Histogram,
    background_write_wait: Histogram,
    recovery_runs: Family<RunLabels, Counter>,
    recovery_decisions: Family<DecisionLabel, Counter>,
    recovery_duration: Histogram,
    recovery_last_success: FloatGauge,
    recovery_interval: FloatGauge,
    stall_threshold: FloatGauge,
    polls: Family<ResultLabel, Counter>,
    poll_requests: Family<ProtocolLabel, Counter>,
    poll_fallbacks: Counter,
    poll_lag: FloatGauge,
    vma_contact: Family<VmaLabel, FloatGauge>,
    auth_failures: Family<ReasonLabel, Counter>,
    pool: Family<PoolLabel, Gauge>,
    poll_leases_owned: Gauge,
    oma_instances_live: Gauge,
    poll_lease_changes: Family<ReasonLabel, Counter>,
    stalled_sessions_ended: Counter,
}

impl Metrics {
    /// A registry with every family, at zero.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("oma");
        let daemon = DaemonMetrics::register(&mut registry);
        let m = Self {
            daemon,
            build: Family::default(),
            jobs: Family::default(),
            oldest_progress_age: FloatGauge::default(),
            stalled: Gauge::default(),
            transitions: Family::default(),
            watchdog_events: Family::default(),
            // 0.5 ms to about 4 s: a batch commits in milliseconds (one fsync on SQLite).
            intake_commit: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            // 0.1 ms to about 26 s: the poller's commits wait for each other, not for deaths.
            background_write_wait: Histogram::new(exponential_buckets(0.0001, 2.0, 19)),
            recovery_runs: Family::default(),
            recovery_decisions: Family::default(),
            // 1 ms to about 65 s: a run asks every VMA with active jobs.
            recovery_duration: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            recovery_last_success: FloatGauge::default(),
            recovery_interval: FloatGauge::default(),
            stall_threshold: FloatGauge::default(),
            polls: Family::default(),
            poll_requests: Family::default(),
            poll_fallbacks: Counter::default(),
            poll_lag: FloatGauge::default(),
            vma_contact: Family::default(),
            auth_failures: Family::default(),
            pool: Family::default(),
            poll_leases_owned: Gauge::default(),
            oma_instances_live: Gauge::default(),
            poll_lease_changes: Family::default(),
            stalled_sessions_ended: Counter::default(),
            registry,
        };
        Arc::new(m.registered())
    }

    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        // Name, help, (unit,) family: one line each, as the exported name reads.
        daemon_support::register! { r,
            "build_info", "Version and database backend of this OMA (value 1)", self.build.clone();
            "jobs", "Replication jobs, by status", self.jobs.clone();
            "oldest_active_progress_age" in Seconds, "Time since the last progress of the active job that has gone longest without (0 when none is active)", self.oldest_progress_age.clone();
            "stalled_jobs", "Active jobs flagged stalled (bytes unmoved past the stall threshold)", self.stalled.clone();
            "stall_threshold" in Seconds, "The stall threshold (--stall-threshold-secs)", self.stall_threshold.clone();
            "transitions", "Job status changes committed, by new status, failure class and actor", self.transitions.clone();
            "watchdog_events", "Process events received from watchdogs, by outcome", self.watchdog_events.clone();
            "intake_commit_duration" in Seconds, "Time to apply and commit one batch of watchdog events", self.intake_commit.clone();
            "background_write_wait" in Seconds, "Time a poller transaction waited for its place in the lane of writes that can wait (deaths never wait there)", self.background_write_wait.clone();
            "recovery_runs", "Recovery runs, by trigger and result", self.recovery_runs.clone();
            "recovery_decisions", "Decisions of recovery runs, by decision", self.recovery_decisions.clone();
            "recovery_run_duration" in Seconds, "Time a recovery run took", self.recovery_duration.clone();
            "recovery_last_success_timestamp" in Seconds, "When the last recovery run finished without error (unix time)", self.recovery_last_success.clone();
            "recovery_interval" in Seconds, "The periodic recovery interval (--recovery-interval-secs)", self.recovery_interval.clone();
            "polls", "Progress polls of VMAs, by result", self.polls.clone();
            "poll_requests", "Progress requests sent to VMAs, by protocol (feed: one per VMA; per_job: one per job)", self.poll_requests.clone();
            "poll_feed_fallbacks", "Feed polls answered 404/405 (a watchdog without the progress feed), so polled job by job", self.poll_fallbacks.clone();
            "poll_cycle_lag" in Seconds, "How far the poller's last cycle is behind its schedule", self.poll_lag.clone();
            "vma_last_contact_timestamp" in Seconds, "When each VMA last answered a poll or delivered events (unix time)", self.vma_contact.clone();
            "auth_failures", "Requests refused by the token check, by reason", self.auth_failures.clone();
            "db_pool_connections", "Database pool connections, by state (idle, in_use)", self.pool.clone();
            "poll_leases_owned", "VMAs whose progress polling this OMA holds the lease of", self.poll_leases_owned.clone();
            "instances_live", "OMAs alive on this database (heartbeat not expired), this one included", self.oma_instances_live.clone();
            "poll_lease_changes", "Lease changes made by this OMA, by reason (claimed, taken_over, adopted, rebalanced, lost, instance_expired, rejoined)", self.poll_lease_changes.clone();
            "stalled_sessions_ended", "Database sessions of expired OMAs (stalled, or dead with their connections still open) that this OMA ended", self.stalled_sessions_ended.clone();
        }
        self
    }

    /// The registry, for `/metrics` and for checks that dashboards and alerts name metrics
    /// that exist.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The HTTP families, for the router's layer.
    pub fn daemon(&self) -> &Arc<DaemonMetrics> {
        &self.daemon
    }

    /// Records the backend (`build_info`) and the settings the alerts compare against.
    pub fn set_settings(
        &self,
        backend: &'static str,
        recovery_interval: Duration,
        stall: Duration,
    ) {
        self.build.clear();
        self.build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                backend,
            })
            .set(1);
        self.recovery_interval.set(recovery_interval.as_secs_f64());
        self.stall_threshold.set(stall.as_secs_f64());
    }

    /// Counts the status changes among `drafts`, just committed (entries that keep the
    /// status are evidence, not transitions).
    pub fn transitions(&self, drafts: &[AuditDraft]) {
        for d in drafts.iter().filter(|d| d.from != Some(d.to)) {
            let labels = TransitionLabels {
                to: d.to.as_str(),
                failure_class: d.failure_class.map_or("", FailureClass::as_str),
                actor: d.actor.as_str(),
            };
            self.transitions.get_or_create(&labels).inc();
        }
    }

    /// Counts a watchdog event's outcome (`applied`, `stale_attempt`, `duplicate`, ...).
    pub fn watchdog_event(&self, result: &'static str, n: u64) {
        self.watchdog_events
            .get_or_create(&ResultLabel { result })
            .inc_by(n);
    }

    /// Observes the time one batch took to apply and commit.
    pub fn intake_committed(&self, took: Duration) {
        self.intake_commit.observe(took.as_secs_f64());
    }

    /// Observes how long a background write waited for its lane.
    pub fn background_write_waited(&self, took: Duration) {
        self.background_write_wait.observe(took.as_secs_f64());
    }

    /// Counts a recovery run, its decisions and its duration.
    pub fn recovery_run(
        &self,
        trigger: &'static str,
        result: &'static str,
        decisions: &[&'static str],
        took: Duration,
    ) {
        self.recovery_runs
            .get_or_create(&RunLabels { trigger, result })
            .inc();
        for &decision in decisions {
            self.recovery_decisions
                .get_or_create(&DecisionLabel { decision })
                .inc();
        }
        if result == "ok" {
            self.recovery_duration.observe(took.as_secs_f64());
            self.recovery_last_success.set(unix_now());
        }
    }

    /// Counts a progress poll.
    pub fn poll(&self, result: &'static str) {
        self.polls.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a progress request sent to a VMA (`feed` or `per_job`).
    pub fn poll_request(&self, protocol: &'static str) {
        self.poll_requests
            .get_or_create(&ProtocolLabel { protocol })
            .inc();
    }

    /// Counts a VMA found without the progress feed.
    pub fn poll_fallback(&self) {
        self.poll_fallbacks.inc();
    }

    /// Sets how far the poller's cycle is behind its schedule.
    pub fn poll_lag(&self, lag: Duration) {
        self.poll_lag.set(lag.as_secs_f64());
    }

    /// Notes that `vma` answered or called just now.
    pub fn vma_contact(&self, vma: &str) {
        let label = VmaLabel {
            vma: vma.to_owned(),
        };
        self.vma_contact.get_or_create(&label).set(unix_now());
    }

    /// Sets the leases this OMA owns and the OMAs alive (see `crate::lease`).
    pub fn poll_leases(&self, owned: usize, live: i64) {
        self.poll_leases_owned.set(owned as i64);
        self.oma_instances_live.set(live);
    }

    /// Counts a lease change (`claimed`, `taken_over`, `adopted`, `rebalanced`, `lost`), an expired
    /// OMA removed (`instance_expired`) or this OMA found expired itself (`rejoined`).
    pub fn poll_lease_change(&self, reason: &'static str, n: u64) {
        self.poll_lease_changes
            .get_or_create(&ReasonLabel { reason })
            .inc_by(n);
    }

    /// Counts the database sessions of expired OMAs this OMA ended (see `crate::lease`).
    pub fn stalled_sessions_ended(&self, n: u64) {
        self.stalled_sessions_ended.inc_by(n);
    }

    /// Counts a request refused by the token check (`missing_token`, `unknown_token`,
    /// `wrong_role`).
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Reads what the database knows, at scrape.
    async fn refresh(&self, state: &AppState) {
        self.daemon.refresh();
        let pool = state.store.pool();
        let (size, idle) = (pool.size() as i64, pool.num_idle() as i64);
        self.pool
            .get_or_create(&PoolLabel { state: "idle" })
            .set(idle);
        self.pool
            .get_or_create(&PoolLabel { state: "in_use" })
            .set((size - idle).max(0));
        self.poll_lag(state.poller.cycle_lag());
        match state.store.job_gauges().await {
            Ok(gauges) => {
                for status in JobStatus::ALL {
                    let n = gauges.by_status.get(status).copied().unwrap_or(0);
                    let label = StatusLabel {
                        status: status.as_str(),
                    };
                    self.jobs.get_or_create(&label).set(n);
                }
                let age_ms = gauges
                    .oldest_active_progress_ms
                    .map_or(0, |at| (crate::model::now_ms() - at).max(0));
                self.oldest_progress_age.set(age_ms as f64 / 1000.0);
                self.stalled.set(gauges.stalled);
            }
            Err(error) => {
                tracing::warn!(event = "metrics_query_failed", %error,
                    "cannot read job counts for the metrics; they keep their last values")
            }
        }
    }
}

fn unix_now() -> f64 {
    crate::model::now_ms() as f64 / 1000.0
}

/// What `/metrics` serves: the metrics, refreshed from the database at each scrape.
#[derive(Debug)]
pub struct Scraped {
    /// The server's state (its store carries the metrics).
    pub state: AppState,
}

impl Scrape for Scraped {
    fn registry(&self) -> &Registry {
        &self.state.store.metrics().registry
    }

    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.state.store.metrics().refresh(&self.state))
    }
}
