//! The progress poller: polls every active job's progress on its VMA, forever.
//!
//! Per VMA, not per job: each VMA with active jobs has a due time in a min-heap
//! (`schedule.rs`), and the loop sleeps until the earliest, so a tick costs O(VMAs due), never
//! O(jobs). A VMA whose watchdog has the progress feed (`GET /api/v1/progress?since=`) is
//! asked once per interval for every job that moved since the last answer, and the answer is
//! committed in one transaction ([`crate::store::Store::mutate_jobs`]); a job absent from the
//! answer did not move. A VMA whose watchdog answers 404/405 there (one older than the feed) is
//! polled job by job as before, and asked for the feed again every [`REPROBE`]
//! (`--poll-protocol per-job` polls every VMA job by job).
//!
//! The work list is the database's active set, re-read every interval, so a restart (or a job
//! created by another path) needs no hand-over. Errors back a VMA (feed) or a job (per job)
//! off exponentially up to a cap, but a job is never dropped while it is active. A job whose
//! bytes do not move for the stall threshold is flagged (`stalled_since` plus an audit
//! entry), never failed: a live process is not failed on age alone; deaths come from evidence
//! (events, recovery). What a report does to its job is [`crate::job::on_progress`]'s to say;
//! for a job the feed says did not move, [`crate::job::on_unmoved`]'s.

mod feed;
mod per_job;
mod schedule;

use crate::store::Store;
use crate::vma_client::VmaClient;
use chrono::{DateTime, Utc};
use schedule::{Schedule, Work};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use utoipa::ToSchema;

/// How often a VMA polled job by job because its watchdog had no feed is asked again.
pub const REPROBE: Duration = Duration::from_secs(600);

/// `poll_writes_behind` is logged at most this often.
const BEHIND_LOG_EVERY: Duration = Duration::from_secs(60);

/// Poller settings.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Time between polls of a healthy job.
    pub interval: Duration,
    /// Cap of the exponential backoff after errors.
    pub max_backoff: Duration,
    /// Polls in flight per VMA (job by job).
    pub per_vma_concurrency: usize,
    /// Bytes unmoved for this long flag the job as stalled.
    pub stall_threshold: Duration,
}

/// How the poller asks VMAs (`--poll-protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PollProtocol {
    /// One feed request per VMA and interval where the watchdog has the feed; job by job
    /// where it has not.
    #[default]
    Auto,
    /// One request per job and interval, as before the feed.
    PerJob,
}

/// How the poller is doing, for `GET /api/v1/recovery/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PollerHealth {
    /// Cycles completed since start (re-reads of the active set).
    pub cycles: u64,
    /// End of the latest cycle.
    pub last_cycle_at: Option<DateTime<Utc>>,
    /// Active jobs in the work list.
    pub jobs_tracked: usize,
    /// Jobs currently backing off after errors (every job of a VMA whose feed fails).
    pub jobs_backing_off: usize,
    /// Successful polls since start (requests: one per feed answer or per job).
    pub polls_ok: u64,
    /// Failed polls since start.
    pub polls_failed: u64,
    /// The latest error, if any.
    pub last_error: Option<String>,
}

/// The poller. Share it in an `Arc`; `run_forever` drives it.
#[derive(Debug)]
pub struct Poller {
    store: Store,
    client: VmaClient,
    config: PollerConfig,
    protocol: PollProtocol,
    health: Mutex<PollerHealth>,
    schedule: Mutex<Schedule>,
    /// Rung when a VMA's poll ends, so the loop sees its new due time.
    wake: Notify,
    /// The stall sweep of feed VMAs is running.
    sweeping: std::sync::atomic::AtomicBool,
    /// When `poll_writes_behind` was last logged (rate limit).
    behind_logged: Mutex<Option<Instant>>,
    /// Set at start: only the VMAs whose polling lease this OMA holds are polled.
    pub leases: std::sync::OnceLock<Arc<crate::lease::Leases>>,
}

impl Poller {
    /// A poller over `store`, asking VMAs through `client`, with the `auto` protocol.
    pub fn new(store: Store, client: VmaClient, config: PollerConfig) -> Self {
        Self {
            store,
            client,
            config,
            protocol: PollProtocol::Auto,
            health: Mutex::default(),
            schedule: Mutex::default(),
            wake: Notify::new(),
            sweeping: false.into(),
            behind_logged: Mutex::default(),
            leases: std::sync::OnceLock::new(),
        }
    }

    /// The same poller asking VMAs with `protocol`.
    pub fn with_protocol(mut self, protocol: PollProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// A snapshot of the poller's health.
    pub fn health(&self) -> PollerHealth {
        let mut health = self.health.lock().map(|h| h.clone()).unwrap_or_default();
        health.jobs_backing_off = self.lock_schedule().jobs_backing_off();
        health
    }

    fn lock_schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_error(&self, error: String) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.polls_failed += 1;
        health.last_error = Some(error);
    }

    fn note_ok(&self) {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .polls_ok += 1;
    }

    /// Polls until `stop` says true (or the task is dropped). Polls under way finish on
    /// their own timeout.
    pub async fn run_forever(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let stopped = daemon_support::stopped(stop);
        tokio::pin!(stopped);
        // Stamped between passes: a pass stuck on the database stops systemd's watchdog pings.
        let heartbeat = daemon_support::notify::Heartbeat::new("poller");
        let mut next_refresh = Instant::now();
        let mut next_sweep = Instant::now() + self.config.interval;
        loop {
            heartbeat.beat();
            let now = Instant::now();
            if now >= next_refresh {
                if let Err(e) = self.refresh().await {
                    tracing::error!(error = %e, "poller cycle failed; retrying");
                    self.health
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last_error = Some(e.to_string());
                }
                next_refresh = Instant::now() + self.refresh_every();
            }
            if now >= next_sweep {
                feed::spawn_stall_sweep(&self);
                next_sweep = now + self.config.interval;
            }
            let wake_at = self.start_due().min(next_refresh).min(next_sweep);
            tokio::select! {
                () = heartbeat.waiting(tokio::time::sleep_until(wake_at)) => {}
                () = self.wake.notified() => {}
                () = &mut stopped => return,
            }
        }
    }

    /// One pass: re-read the active set, then start the poll of every VMA that is due.
    pub async fn cycle(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        self.refresh().await?;
        self.start_due();
        Ok(())
    }

    /// Re-reads the active set and the VMAs into the schedule.
    async fn refresh(&self) -> Result<(), crate::store::StoreError> {
        let mut active = self.store.active_job_ids().await?;
        // Another OMA polls the VMAs whose lease it holds (several OMAs on one database).
        active.retain(|(_, vma)| self.leases.get().is_none_or(|l| l.owns(vma)));
        let vmas = self.store.list_vmas().await?;
        let unknown = self
            .lock_schedule()
            .refresh(active, vmas, self.protocol, Instant::now());
        for (job_id, vma_id) in &unknown {
            self.store.metrics().poll("unknown_vma");
            self.note_error(format!(
                "job {job_id}: no VMA is registered under id {vma_id}"
            ));
        }
        if let Some((job_id, vma_id)) = unknown.first() {
            tracing::warn!(event = "poll_unknown_vma", job_id = %job_id, vma_id = %vma_id,
                jobs = unknown.len(), "active jobs name a VMA that is not registered; they are not polled");
        }
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.cycles += 1;
        health.last_cycle_at = Some(Utc::now());
        health.jobs_tracked = self.lock_schedule().jobs_tracked();
        self.wake.notify_one();
        Ok(())
    }

    /// Starts the poll of every VMA due now; returns when the next one is due.
    fn start_due(self: &Arc<Self>) -> Instant {
        let now = Instant::now();
        let (work, next) = self.lock_schedule().take_due(now, self.config.interval);
        for item in work {
            let poller = Arc::clone(self);
            tokio::spawn(async move { poller.poll_vma(item).await });
        }
        next.unwrap_or(now + self.refresh_every())
    }

    /// Polls one VMA: the feed where it has one, job by job where not.
    async fn poll_vma(self: Arc<Self>, work: Work) {
        if work.try_feed {
            if let Some(outcome) = feed::poll(&self, &work).await {
                let back =
                    self.lock_schedule()
                        .finish_feed(&work, outcome, self.config.interval, |f| self.backoff(f));
                if back {
                    tracing::info!(event = "poll_feed_available", vma_id = %work.vma_id,
                        "the VMA's watchdog now has the progress feed; polling it once per interval");
                }
                self.wake.notify_one();
                return;
            }
            self.fell_back(&work);
        }
        let due = self
            .lock_schedule()
            .per_job_due(&work.vma_id, Instant::now());
        let results = per_job::round(&self, &work, due).await;
        self.lock_schedule()
            .finish_per_job(&work, results, self.config.interval, |f| self.backoff(f));
        self.wake.notify_one();
    }

    /// A VMA answered 404/405 for the feed: it is polled job by job until the next probe.
    fn fell_back(&self, work: &Work) {
        self.store.metrics().poll_fallback();
        let first = self
            .lock_schedule()
            .fall_back(&work.vma_id, Instant::now() + REPROBE);
        if first {
            tracing::warn!(event = "poll_feed_fallback", vma_id = %work.vma_id,
                reprobe_secs = REPROBE.as_secs(),
                "the VMA's watchdog has no progress feed (HTTP 404/405); polling its jobs one by one");
        }
    }

    /// How far the poller is behind its schedule: how late the most overdue VMA poll started
    /// lately, or the VMA most overdue now (zero while it keeps up).
    pub fn cycle_lag(&self) -> Duration {
        self.lock_schedule()
            .lag(Instant::now(), self.config.interval)
    }

    /// A place in the store's lane of writes that can wait, taken before each of the
    /// poller's transactions so that deaths never queue behind them. A wait longer than the
    /// poll interval means the database cannot keep up with the fleet's progress: said at
    /// most once a minute.
    async fn write_lane(&self) -> crate::store::LanePermit {
        let permit = self.store.background_lane().await;
        if permit.waited > self.config.interval {
            let mut last = self.behind_logged.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|at| at.elapsed() >= BEHIND_LOG_EVERY) {
                *last = Some(Instant::now());
                tracing::warn!(
                    event = "poll_writes_behind",
                    waited_ms = u64::try_from(permit.waited.as_millis()).unwrap_or(u64::MAX),
                    "a progress commit waited longer than the poll interval for the database; \
                     progress at the OMA is late (deaths are not delayed): check the disk's \
                     latency, or move to PostgreSQL"
                );
            }
        }
        permit
    }

    /// The pause between re-reads of the active set.
    fn refresh_every(&self) -> Duration {
        self.config.interval.min(Duration::from_secs(5))
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.min(20));
        self.config
            .interval
            .saturating_mul(factor)
            .min(self.config.max_backoff)
    }

    fn stall_ms(&self) -> i64 {
        i64::try_from(self.config.stall_threshold.as_millis()).unwrap_or(i64::MAX)
    }
}
