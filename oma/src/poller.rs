//! The progress poller: polls every active job's progress on its VMA, forever.
//!
//! Its work list is the database's active set, re-read every cycle, so a restart (or a job
//! created by another path) needs no hand-over. Errors back a job off exponentially up to a
//! cap, but a job is never dropped while it is active. A job whose bytes do not move for the
//! stall threshold is flagged (`stalled_since` plus an audit entry), never failed: a live
//! process is not failed on age alone; deaths come from evidence (events, recovery). What a
//! report does to its job is [`crate::job::on_progress`]'s to say.

use crate::job::on_progress;
use crate::store::Store;
use crate::vma_client::VmaClient;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use utoipa::ToSchema;

/// Poller settings.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// Time between polls of a healthy job.
    pub interval: Duration,
    /// Cap of the exponential backoff after errors.
    pub max_backoff: Duration,
    /// Polls in flight per VMA.
    pub per_vma_concurrency: usize,
    /// Bytes unmoved for this long flag the job as stalled.
    pub stall_threshold: Duration,
}

/// How the poller is doing, for `GET /api/v1/recovery/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PollerHealth {
    /// Cycles completed since start.
    pub cycles: u64,
    /// End of the latest cycle.
    pub last_cycle_at: Option<DateTime<Utc>>,
    /// Active jobs in the work list.
    pub jobs_tracked: usize,
    /// Jobs currently backing off after errors.
    pub jobs_backing_off: usize,
    /// Successful polls since start.
    pub polls_ok: u64,
    /// Failed polls since start.
    pub polls_failed: u64,
    /// The latest error, if any.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy)]
struct JobPoll {
    next_at: Instant,
    failures: u32,
    in_flight: bool,
}

/// The poller. Share it in an `Arc`; `run_forever` drives it.
#[derive(Debug)]
pub struct Poller {
    store: Store,
    client: VmaClient,
    config: PollerConfig,
    health: Mutex<PollerHealth>,
    jobs: Mutex<HashMap<String, JobPoll>>,
    per_vma: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Set at start: only the VMAs whose polling lease this OMA holds are polled.
    pub leases: std::sync::OnceLock<Arc<crate::lease::Leases>>,
}

impl Poller {
    /// A poller over `store`, asking VMAs through `client`.
    pub fn new(store: Store, client: VmaClient, config: PollerConfig) -> Self {
        Self {
            store,
            client,
            config,
            health: Mutex::default(),
            jobs: Mutex::default(),
            per_vma: Mutex::default(),
            leases: std::sync::OnceLock::new(),
        }
    }

    /// A snapshot of the poller's health.
    pub fn health(&self) -> PollerHealth {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Polls until `stop` says true (or the task is dropped). A cycle under way finishes
    /// first: it only starts polls, which end on their own timeout.
    pub async fn run_forever(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let stopped = daemon_support::stopped(stop);
        tokio::pin!(stopped);
        // Stamped between cycles: a cycle stuck on the database stops systemd's watchdog pings.
        let heartbeat = daemon_support::notify::Heartbeat::new("poller");
        loop {
            heartbeat.beat();
            if let Err(e) = self.cycle().await {
                tracing::error!(error = %e, "poller cycle failed; retrying");
                if let Ok(mut h) = self.health.lock() {
                    h.last_error = Some(e.to_string());
                }
            }
            tokio::select! {
                () = heartbeat.waiting(tokio::time::sleep(self.tick())) => {}
                () = &mut stopped => return,
            }
        }
    }

    /// How far the poller is behind its schedule: the time since its last cycle began beyond
    /// the pause between cycles (zero while it keeps up, or before its first cycle).
    pub fn cycle_lag(&self) -> Duration {
        let Some(last) = self.health().last_cycle_at else {
            return Duration::ZERO;
        };
        let since = (Utc::now() - last).to_std().unwrap_or_default();
        since.saturating_sub(self.tick())
    }

    /// The pause between cycles.
    fn tick(&self) -> Duration {
        self.config.interval.min(Duration::from_secs(1))
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.min(20));
        self.config
            .interval
            .saturating_mul(factor)
            .min(self.config.max_backoff)
    }

    /// One pass: re-read the active set and start a poll of every job that is due and not
    /// already being polled. Polls run detached, so a VMA that hangs until the timeout delays
    /// only its own jobs (bounded by its own semaphore), never another VMA's.
    pub async fn cycle(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        let mut active = self.store.active_job_ids().await?;
        active.retain(|(_, vma)| self.leases.get().is_none_or(|l| l.owns(vma)));
        let vmas: HashMap<String, String> = self
            .store
            .list_vmas()
            .await?
            .into_iter()
            .map(|v| (v.id, v.base_url))
            .collect();
        let now = Instant::now();
        let due: Vec<(String, String)> = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let ids: std::collections::HashSet<&str> =
                active.iter().map(|(id, _)| id.as_str()).collect();
            jobs.retain(|id, _| ids.contains(id.as_str()));
            active
                .into_iter()
                .filter(|(id, _)| {
                    let entry = jobs.entry(id.clone()).or_insert(JobPoll {
                        next_at: now,
                        failures: 0,
                        in_flight: false,
                    });
                    let due = !entry.in_flight && entry.next_at <= now;
                    entry.in_flight |= due;
                    due
                })
                .collect()
        };
        let stall_ms = i64::try_from(self.config.stall_threshold.as_millis()).unwrap_or(i64::MAX);
        for (job_id, vma_id) in due {
            let Some(url) = vmas.get(&vma_id).cloned() else {
                let error = format!("no VMA is registered under id {vma_id}");
                self.store.metrics().poll("unknown_vma");
                self.finish(&job_id, Err(error));
                continue;
            };
            let permits = {
                let mut per_vma = self.per_vma.lock().unwrap_or_else(|e| e.into_inner());
                per_vma
                    .entry(vma_id.clone())
                    .or_insert_with(|| {
                        Arc::new(Semaphore::new(self.config.per_vma_concurrency.max(1)))
                    })
                    .clone()
            };
            let poller = self.clone();
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                poller.poll(&job_id, &vma_id, &url, stall_ms).await;
            });
        }
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.cycles += 1;
        health.last_cycle_at = Some(Utc::now());
        health.jobs_tracked = jobs.len();
        health.jobs_backing_off = jobs.values().filter(|j| j.failures > 0).count();
        Ok(())
    }

    /// Polls one job's progress on its VMA and applies it; counts the poll and the VMA's
    /// answer in the metrics.
    async fn poll(&self, job_id: &str, vma_id: &str, url: &str, stall_ms: i64) {
        let answer = self.client.progress(url, job_id).await;
        let metrics = self.store.metrics();
        let answer_failed = answer.is_err();
        if !answer_failed {
            metrics.vma_contact(vma_id);
        }
        let result = match answer {
            Ok(Some(progress)) => self
                .store
                .mutate_job(job_id, |cur, now| {
                    Ok(on_progress(cur, &progress, now, stall_ms))
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        metrics.poll(match &result {
            Ok(()) => "ok",
            Err(_) if answer_failed => "unreachable",
            Err(_) => "store_error",
        });
        self.finish(job_id, result);
    }

    /// Records the outcome of one poll and schedules the next: the interval after success,
    /// exponential backoff (capped) after an error. A job is never dropped while active.
    fn finish(&self, id: &str, result: Result<(), String>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = jobs.get_mut(id) else {
            return;
        };
        entry.in_flight = false;
        let now = Instant::now();
        match result {
            Ok(()) => {
                health.polls_ok += 1;
                entry.failures = 0;
                entry.next_at = now + self.config.interval;
            }
            Err(error) => {
                entry.failures += 1;
                tracing::warn!(job_id = %id, error = %error, failures = entry.failures,
                    "progress poll failed; backing off");
                health.polls_failed += 1;
                health.last_error = Some(format!("job {id}: {error}"));
                entry.next_at = now + self.backoff(entry.failures);
            }
        }
        health.jobs_backing_off = jobs.values().filter(|j| j.failures > 0).count();
    }
}
