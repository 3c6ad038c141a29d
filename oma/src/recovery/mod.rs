//! Recovery: at startup, every interval and on demand, ask each active job's VMA about its
//! process and apply [`decide::decide`]'s verdict, one fenced transaction per job.

pub mod decide;

pub use decide::{Action, Decision, decide};

use crate::job::{on_decision, superseded};
use crate::model::{Actor, now_ms};
use crate::store::{
    JobRecord, PendingStop, RecoveryLock, RecoveryRunRecord, Released, StartFence, Store,
    StoreError, start_key,
};
use crate::vma_client::{VmaAnswer, VmaClient};
use api::JobProcessState;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use utoipa::ToSchema;

/// Recovery settings.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// Time between periodic runs.
    pub interval: Duration,
    /// Silence (since the last progress) after which an unreachable VMA's job is failed.
    pub stale_threshold: Duration,
    /// VMA questions in flight at once.
    pub concurrency: usize,
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The OMA started.
    Startup,
    /// The interval elapsed.
    Periodic,
    /// An operator asked.
    Operator,
}

impl Trigger {
    /// The name on the wire and in the metrics: `startup`, `periodic`, `operator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Periodic => "periodic",
            Self::Operator => "operator",
        }
    }

    fn actor(self) -> Actor {
        match self {
            Self::Startup => Actor::StartupRecovery,
            Self::Periodic => Actor::PeriodicRecovery,
            Self::Operator => Actor::Operator,
        }
    }
}

/// One decision of a run and whether it was applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunDecision {
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
    /// True when the real run wrote it.
    pub applied: bool,
    /// True when the job changed between the question and the write, so nothing was written.
    pub superseded: bool,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunReport {
    /// The run's counts, as recorded.
    pub run: RecoveryRunRecord,
    /// Every decision, in job order.
    pub decisions: Vec<RunDecision>,
}

/// Why a run did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Another run holds the lock.
    #[error("a recovery run is already in progress; wait for it to finish and retry")]
    Busy,
    /// The run lost the recovery lock before it finished (PostgreSQL), and stopped before
    /// its next write: another OMA may be recovering now.
    #[error(
        "the recovery lock was lost during the run ({0}); the run stopped before its next \
         decision: this OMA probably stalled long enough for another OMA to find its heartbeat \
         expired and end its database sessions (see the log's stalled_oma_sessions_ended), or \
         its connection was cut; the other OMA recovers instead"
    )]
    LockLost(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long a run goes on writing before it asks again whether it still holds the recovery
/// lock. A query per decision would add a round trip to each of a large run's thousands of
/// transactions; once per this interval costs one per hundred or so, and an OMA that stalled
/// long enough for another to find its heartbeat expired (a lease period, seconds) has been
/// paused for longer than this, so its first write after waking is always checked first.
const LOCK_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The run's recovery lock, and when it was last found held.
struct WatchedLock<'a> {
    lock: &'a mut RecoveryLock,
    checked: Option<std::time::Instant>,
}

impl WatchedLock<'_> {
    /// Stops a run, with `recovery_lock_lost` in the log, unless it still holds the recovery
    /// lock (asked on the lock's own session, at most every [`LOCK_CHECK_EVERY`]; always held
    /// on SQLite). `done` is how many decisions the run has gone through so far (written, or
    /// found superseded).
    async fn still_held(&mut self, done: usize) -> Result<(), RecoveryError> {
        if self
            .checked
            .is_some_and(|at| at.elapsed() < LOCK_CHECK_EVERY)
        {
            return Ok(());
        }
        let reason = match self.lock.check().await {
            Released::Held => {
                self.checked = Some(std::time::Instant::now());
                return Ok(());
            }
            Released::Lost => "its database session ended".to_owned(),
            Released::Unknown(error) => format!("checking it failed: {error}"),
        };
        tracing::error!(event = "recovery_lock_lost", decisions_done = done, %reason,
            "this recovery run no longer holds the recovery lock, so it stops before its next write \
             (counted as failed); another OMA may be recovering now, and each change this run made was \
             applied only if the job had not changed since it was read");
        Err(RecoveryError::LockLost(reason))
    }
}

/// The recovery engine. One per OMA; its mutex keeps two runs from overlapping.
#[derive(Debug)]
pub struct Recovery {
    store: Store,
    client: VmaClient,
    config: RecoveryConfig,
    lock: Mutex<()>,
    /// Requests in flight per job (a start and a stop may overlap).
    starting: Arc<StdMutex<HashMap<String, usize>>>,
}

/// Marks a job whose start request to its VMA is in flight; recovery leaves the job alone
/// until the guard is released (after the VMA's answer is recorded). Without it, a run that
/// asked the VMA a moment before the start arrived there would fail the new job as `job_lost`.
/// In this OMA through a set in memory; for the other OMAs on the same PostgreSQL database
/// through the store's [`StartFence`].
#[derive(Debug)]
pub struct StartGuard {
    starting: Arc<StdMutex<HashMap<String, usize>>>,
    job_id: String,
    fence: Option<StartFence>,
}

impl StartGuard {
    /// Ends the guard once the start's answer is recorded. Returns `false`, and says so in
    /// the log, when the fence on the database may have been lost before.
    pub async fn release(mut self) -> bool {
        let Some(fence) = self.fence.take() else {
            return true;
        };
        let released = fence.release().await;
        match &released {
            Released::Held => {}
            Released::Lost => tracing::warn!(job_id = %self.job_id,
                "this job's start fence was lost before its request to the VMA was answered \
                 (its database session ended): another OMA's recovery may have judged the job \
                 meanwhile; its audit trail shows what each did, and a change made on stale \
                 facts was refused by the job's version check"),
            Released::Unknown(error) => tracing::warn!(job_id = %self.job_id, %error,
                "releasing this job's start fence failed, so it may have been lost before the \
                 VMA's answer (its session is closed now): if another OMA judged the job \
                 meanwhile, its audit trail shows it; check the database connection"),
        }
        released.held()
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.starting.lock()
            && let Some(n) = map.get_mut(&self.job_id)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.job_id);
            }
        }
    }
}

impl Recovery {
    /// A recovery engine over `store`, asking VMAs through `client`.
    pub fn new(store: Store, client: VmaClient, config: RecoveryConfig) -> Self {
        Self {
            store,
            client,
            config,
            lock: Mutex::new(()),
            starting: Arc::default(),
        }
    }

    /// Marks `job_id` as having a request to its VMA in flight (a start, or a cancelled job's
    /// stop), for this OMA and every other one on the same database, until the guard is
    /// released. Take it before the job exists, so that no
    /// recovery run can see the job without the guard.
    pub async fn start_guard(&self, job_id: &str) -> Result<StartGuard, StoreError> {
        let fence = self.store.fence_start(job_id).await?;
        if let Ok(mut map) = self.starting.lock() {
            *map.entry(job_id.to_owned()).or_default() += 1;
        }
        Ok(StartGuard {
            starting: self.starting.clone(),
            job_id: job_id.to_owned(),
            fence: Some(fence),
        })
    }

    /// The database, for the stop retries.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The VMA client, for the stop retries.
    pub(crate) fn client(&self) -> &VmaClient {
        &self.client
    }

    /// Cancelled jobs whose stop request has not reached their VMA, except those with a
    /// request to their VMA in flight (in this OMA or, on PostgreSQL, in any).
    pub(crate) async fn pending_stops(&self) -> Result<Vec<PendingStop>, StoreError> {
        let mut pending = self.store.pending_stops().await?;
        let busy = self.requests_in_flight().await?;
        pending.retain(|p| !busy(&p.job_id));
        Ok(pending)
    }

    /// Whether a job has a request to its VMA in flight, in this OMA or (PostgreSQL) in any:
    /// read after the jobs it is asked about, since a job holds its fence before it exists.
    async fn requests_in_flight(&self) -> Result<impl Fn(&str) -> bool + '_, StoreError> {
        let fenced = self.store.starts_in_flight().await?;
        Ok(move |job_id: &str| self.is_starting(job_id) || fenced.contains(&start_key(job_id)))
    }

    fn is_starting(&self, job_id: &str) -> bool {
        self.starting
            .lock()
            .map(|map| map.contains_key(job_id))
            .unwrap_or(false)
    }

    /// Asks every active job's VMA and decides, changing nothing. The records returned are
    /// partial (only the columns the decision reads); [`Recovery::run`] re-reads each job in
    /// full inside the transaction that applies its decision.
    pub async fn plan(&self) -> Result<Vec<(JobRecord, Decision)>, StoreError> {
        let mut jobs = self.store.active_jobs_for_decision().await?;
        // Read after the jobs: a job another OMA creates holds its fence before it exists.
        let busy = self.requests_in_flight().await?;
        jobs.retain(|rec| !busy(&rec.job.id));
        let vmas: Arc<HashMap<String, String>> = Arc::new(
            self.store
                .list_vmas()
                .await?
                .into_iter()
                .map(|v| (v.id, v.base_url))
                .collect(),
        );
        let permits = Arc::new(Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for (index, rec) in jobs.into_iter().enumerate() {
            let (client, vmas, permits) = (self.client.clone(), vmas.clone(), permits.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let url = vmas.get(&rec.job.vma_id);
                let answer = match url {
                    Some(url) => client.job_status(url, &rec.job.id).await,
                    None => VmaAnswer::Unreachable {
                        reason: format!("no VMA is registered under id {}", rec.job.vma_id),
                    },
                };
                // For a process that has exited, migratekit's last word too: the poller may
                // not have fetched it. Without it the verdict rests on the last poll.
                let exited = matches!(&answer, VmaAnswer::Known { state: JobProcessState::Exited { .. } });
                let last = match url {
                    Some(url) if exited => match client.progress(url, &rec.job.id).await {
                        Ok(last) => last,
                        Err(error) => {
                            tracing::warn!(job_id = %rec.job.id, %error,
                                "cannot fetch the last progress of an exited job; its verdict rests on the last poll");
                            None
                        }
                    },
                    _ => None,
                };
                (index, rec, answer, last)
            });
        }
        let mut answers = tasks.join_all().await;
        answers.sort_by_key(|(index, ..)| *index);
        let now = now_ms();
        let stale = i64::try_from(self.config.stale_threshold.as_millis()).unwrap_or(i64::MAX);
        Ok(answers
            .into_iter()
            .map(|(_, rec, answer, last)| {
                let decision = decide(&rec, &answer, last.as_ref(), now, stale);
                (rec, decision)
            })
            .collect())
    }

    /// Runs recovery once. A dry run records the run but changes no job. Refused with
    /// [`RecoveryError::Busy`] while another run goes on in this OMA or, on PostgreSQL, in any
    /// OMA on the same database.
    pub async fn run(&self, trigger: Trigger, dry_run: bool) -> Result<RunReport, RecoveryError> {
        let started = std::time::Instant::now();
        let result = self.run_once(trigger, dry_run).await;
        let (outcome, decisions) = match &result {
            Ok(_) if dry_run => ("dry_run", Vec::new()),
            Ok(report) => (
                "ok",
                report
                    .decisions
                    .iter()
                    .map(|d| d.decision.action.as_str())
                    .collect(),
            ),
            Err(RecoveryError::Busy) => ("busy", Vec::new()),
            Err(_) => ("failed", Vec::new()),
        };
        self.store
            .metrics()
            .recovery_run(trigger.as_str(), outcome, &decisions, started.elapsed());
        result
    }

    /// [`Recovery::run`] without the metrics.
    async fn run_once(&self, trigger: Trigger, dry_run: bool) -> Result<RunReport, RecoveryError> {
        let _guard = self.lock.try_lock().map_err(|_| RecoveryError::Busy)?;
        let Some(mut db_lock) = self.store.try_recovery_lock().await? else {
            return Err(RecoveryError::Busy);
        };
        let result = self.run_locked(trigger, dry_run, &mut db_lock).await;
        if let Err(RecoveryError::LockLost(_)) = &result {
            // Said already; dropped, its session is closed.
            return result;
        }
        match db_lock.release().await {
            Released::Held => {}
            Released::Lost => tracing::warn!(
                "the recovery lock was lost during the run (its database session ended): \
                 another OMA may have recovered at the same time; each change was applied \
                 only if the job had not changed since it was read"
            ),
            Released::Unknown(error) => tracing::warn!(%error,
                "releasing the recovery lock failed (its session is closed now), so another \
                 OMA may have recovered at the same time; each change was applied only if the \
                 job had not changed since it was read; check the database connection"),
        }
        result
    }

    /// The run, under `db_lock`: each decision, and then the run's record and the stop
    /// retries, written only while the lock is still held, since an OMA that stalled mid-run may wake up after another one
    /// ended its sessions and took over.
    async fn run_locked(
        &self,
        trigger: Trigger,
        dry_run: bool,
        db_lock: &mut RecoveryLock,
    ) -> Result<RunReport, RecoveryError> {
        let started = now_ms();
        let plan = self.plan().await?;
        let mut db_lock = WatchedLock {
            lock: db_lock,
            checked: None,
        };
        let mut decisions = Vec::with_capacity(plan.len());
        for (read, decision) in plan {
            let (applied, superseded) = if dry_run {
                (false, false)
            } else {
                db_lock.still_held(decisions.len()).await?;
                let applied = self.apply(&read, &decision, trigger.actor()).await?;
                (applied, !applied)
            };
            decisions.push(RunDecision {
                decision,
                applied,
                superseded,
            });
        }
        let count = |action| {
            decisions
                .iter()
                .filter(|d| d.decision.action == action)
                .count() as i64
        };
        let run = RecoveryRunRecord {
            id: uuid::Uuid::now_v7().to_string(),
            trigger: trigger.as_str().to_owned(),
            dry_run,
            started_at_ms: started,
            finished_at_ms: now_ms(),
            examined: decisions.len() as i64,
            kept: count(Action::Keep),
            finalized: count(Action::Finalize),
            waiting: count(Action::Wait),
            superseded: decisions.iter().filter(|d| d.superseded).count() as i64,
        };
        if !dry_run {
            db_lock.checked = None;
            db_lock.still_held(decisions.len()).await?;
        }
        self.store.record_run(&run).await?;
        if !dry_run {
            // Under the recovery lock, so that one OMA at a time asks again.
            crate::stop::retry_pending(self, trigger.actor(), self.config.concurrency).await;
        }
        tracing::info!(
            trigger = %run.trigger, dry_run, examined = run.examined, kept = run.kept,
            finalized = run.finalized, waiting = run.waiting, superseded = run.superseded,
            "recovery run finished"
        );
        Ok(RunReport { run, decisions })
    }

    /// Writes one decision, unless the job changed since it was read (then `false`).
    async fn apply(
        &self,
        read: &JobRecord,
        decision: &Decision,
        actor: Actor,
    ) -> Result<bool, StoreError> {
        if self.is_starting(&decision.job_id) {
            return Ok(false);
        }
        let mut stale = false;
        self.store
            .mutate_job(&decision.job_id, |current, now| {
                if superseded(read, current, decision) {
                    stale = true;
                    return Ok(None);
                }
                Ok(on_decision(current, decision, actor, now))
            })
            .await?;
        Ok(!stale)
    }

    /// Runs at startup, then every interval, until `stop` says true (a run under way is
    /// finished first: it holds the recovery lock and writes each decision in its own
    /// transaction) or the task is dropped.
    pub async fn run_forever(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let stopped = daemon_support::stopped(stop);
        tokio::pin!(stopped);
        let mut trigger = Trigger::Startup;
        // Stamped while a run waits too: a run over many jobs whose VMAs do not answer takes
        // minutes of timeouts, and is not stuck. A run blocked on the database shows in the
        // poller's heartbeat, whose cycle reads the same tables every second.
        let heartbeat = daemon_support::notify::Heartbeat::new("recovery");
        loop {
            match heartbeat.waiting(self.run(trigger, false)).await {
                Ok(_) => {}
                Err(RecoveryError::Busy) => {
                    tracing::info!("recovery skipped: a run is in progress")
                }
                Err(e) => {
                    tracing::error!(error = %e, "recovery run failed; retrying next interval")
                }
            }
            trigger = Trigger::Periodic;
            tokio::select! {
                () = heartbeat.waiting(tokio::time::sleep(self.config.interval)) => {}
                () = &mut stopped => return,
            }
        }
    }
}
