//! VMA polling leases: with several OMAs on one PostgreSQL database, each VMA's progress is
//! polled by exactly one live OMA, the owner of its lease (`vma_poll_leases`, migration 0005).
//!
//! Every OMA ticks every lease period / 3: it renews its heartbeat (`oma_instances`) and its
//! leases, removes OMAs whose heartbeat expired (and has recovery run again, since a dead OMA
//! may have died mid-run), then claims expired leases until it owns its fair share,
//! `ceil(VMAs / live OMAs)`, or lets its excess go when another OMA joined. An OMA that dies or
//! stalls stops renewing: one lease period later its VMAs are claimable, and the next tick of
//! another OMA takes them and ends its database sessions (found by their `application_name`),
//! so that a stalled OMA's session frees the recovery lock for the recovery run that follows. A stalled OMA that wakes up polls none of them meanwhile: [`Leases::owns`]
//! holds for one lease period after the renewal that began last, by this host's monotonic
//! clock, so its own view expires no later than the database's.
//!
//! An OMA's first tick takes the leases of earlier instances of its own name (its predecessor
//! crashed; a clean stop lets them go), so a restart polls at once. On SQLite (one OMA per
//! file) the same code runs and the one OMA owns every lease.

use crate::store::{ExpiredInstance, LeaseCandidate, Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal (`--poll-lease-secs`); renewed every third.
    pub period: Duration,
    /// This OMA's name for operators (`--oma-name`), beside its random instance id.
    pub name: String,
}

/// What one tick changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickReport {
    /// VMAs owned after the tick.
    pub owned: usize,
    /// OMAs alive, this one included.
    pub live: i64,
    /// Leases claimed from nobody or from an OMA that let them go.
    pub claimed: usize,
    /// Leases taken over from another OMA whose lease had expired.
    pub taken_over: usize,
    /// Leases let go to even the share.
    pub rebalanced: usize,
    /// OMAs removed because their heartbeat expired.
    pub instances_expired: usize,
}

/// A new random instance id, one per start of an OMA.
pub fn new_instance_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// How many of `total` VMAs the OMA `me` should own among the `live` ones (sorted): the
/// quotient each, and one more for the first `total % live` of them, so that the shares add
/// up to `total` exactly.
pub fn fair_share(total: i64, live: &[String], me: &str) -> usize {
    let n = live.len().max(1) as i64;
    let rank = live.iter().position(|id| id == me).unwrap_or(live.len()) as i64;
    let share = total / n + i64::from(rank < total % n);
    usize::try_from(share).unwrap_or(0)
}

/// Ends the database sessions of the expired OMA `gone`, found by their `application_name`:
/// a stalled OMA's sessions stay open and would hold the recovery lock (and its start fences)
/// for as long as it stalls, so the recovery that follows its loss could never run. A dead
/// OMA's sessions are mostly gone already (count 0). A failure (another database role without
/// `pg_signal_backend`) is logged; the sessions then end only with the stalled OMA.
async fn end_sessions_of(store: &Store, gone: &ExpiredInstance) {
    let application_name = crate::store::application_name(&gone.name, &gone.instance_id);
    match store.end_instance_sessions(&application_name).await {
        Ok(0) => {}
        Ok(sessions) => {
            tracing::warn!(event = "stalled_oma_sessions_ended", instance_id = %gone.instance_id,
                name = %gone.name, %application_name, sessions,
                "ended the database sessions of an OMA whose heartbeat expired (it stalled with its connections open), freeing the recovery lock and start fences it held");
            store.metrics().stalled_sessions_ended(sessions);
        }
        Err(error) => {
            tracing::warn!(event = "stalled_oma_sessions_end_failed", instance_id = %gone.instance_id,
                name = %gone.name, %error,
                "could not end the database sessions of an OMA whose heartbeat expired; if it stalled holding the recovery lock, recovery waits until it resumes or dies (give every OMA the same database role)");
        }
    }
}

/// This OMA's leases. Share it in an `Arc`; [`Leases::run_forever`] keeps them.
#[derive(Debug)]
pub struct Leases {
    instance_id: String,
    config: LeaseConfig,
    /// SQLite: one OMA per database, which polls every VMA whatever the leases say.
    single: bool,
    /// Owned VMAs and until when (this host's monotonic clock).
    owned: Mutex<HashMap<String, Instant>>,
    /// The owned set after each tick.
    published: watch::Sender<HashSet<String>>,
    /// Whether the first tick (which adopts the predecessor's leases) is done.
    started: std::sync::atomic::AtomicBool,
}

impl Leases {
    /// Leases for a new OMA instance, with a random instance id.
    pub fn new(config: LeaseConfig, backend: crate::store::Backend) -> Arc<Self> {
        Self::with_instance_id(config, backend, new_instance_id())
    }

    /// Leases for the OMA instance `instance_id` (from [`new_instance_id`]): the server makes
    /// the id first, since its database sessions carry it (see `crate::store::application_name`).
    pub fn with_instance_id(
        config: LeaseConfig,
        backend: crate::store::Backend,
        instance_id: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            instance_id,
            config,
            single: backend == crate::store::Backend::Sqlite,
            owned: Mutex::default(),
            published: watch::Sender::new(HashSet::new()),
            started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// This OMA's instance id (random at each start).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The lease period.
    pub fn period(&self) -> Duration {
        self.config.period
    }

    /// Whether this OMA polls `vma_id` now: it owns the lease, renewed less than a lease
    /// period ago. The poller asks this for each VMA when it schedules its jobs. Always true
    /// on SQLite, whose one OMA polls everything (a VMA registered a moment ago included).
    pub fn owns(&self, vma_id: &str) -> bool {
        if self.single {
            return true;
        }
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        owned
            .get(vma_id)
            .is_some_and(|until| *until > Instant::now())
    }

    /// The VMAs this OMA polls now (see [`Leases::owns`]).
    pub fn owned_vmas(&self) -> HashSet<String> {
        let now = Instant::now();
        let owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        owned
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(vma, _)| vma.clone())
            .collect()
    }

    /// The owned set, as of each tick.
    pub fn subscribe(&self) -> watch::Receiver<HashSet<String>> {
        self.published.subscribe()
    }

    /// Renews, reaps, claims and rebalances once. `instance_lost` is called when an expired
    /// OMA was removed by this one.
    pub async fn tick(
        &self,
        store: &Store,
        instance_lost: &(dyn Fn() + Send + Sync),
    ) -> Result<TickReport, StoreError> {
        let started = Instant::now();
        let period_ms = i64::try_from(self.config.period.as_millis()).unwrap_or(i64::MAX);
        let now = store.lease_clock_ms().await?;
        let until = now.saturating_add(period_ms);
        let me = self.instance_id.as_str();
        let new_row = (store.oma_heartbeat(me, &self.config.name, now, until)).await?;
        if !self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.adopt(store, until).await?;
        } else if new_row {
            self.rejoined(store);
        }
        let mut report = TickReport {
            instances_expired: self.reap(store, now).await?,
            ..TickReport::default()
        };
        // On SQLite the expired one was this OMA's own predecessor, whose work the startup
        // recovery run has taken up already.
        if report.instances_expired > 0 && !self.single {
            instance_lost();
        }
        let total = store.seed_poll_leases().await?;
        let mut owned = store.renew_poll_leases(me, until).await?;
        let live = store.live_oma_instances(now).await?;
        report.live = live.len().max(1) as i64;
        let share = if self.single {
            usize::try_from(total).unwrap_or(0)
        } else {
            fair_share(total, &live, me)
        };
        if owned.len() > share && report.live > 1 {
            for vma in owned.split_off(share) {
                store.release_poll_lease(me, &vma).await?;
                tracing::info!(event = "poll_lease_rebalanced", vma_id = %vma, share, live = report.live,
                    "let a VMA's polling lease go so that the OMAs share the VMAs evenly");
                report.rebalanced += 1;
            }
        } else if owned.len() < share {
            let wanted = share - owned.len();
            let candidates = store.claimable_poll_leases(me, now).await?;
            for lease in self.in_my_order(candidates) {
                if owned.len() >= share || report.claimed + report.taken_over >= wanted {
                    break;
                }
                if store.claim_poll_lease(me, &lease, now, until).await? {
                    Self::note_claim(store, &lease, &mut report);
                    owned.push(lease.vma_id);
                }
            }
        }
        report.owned = owned.len();
        self.set_owned(owned, started + self.config.period, store);
        store.metrics().poll_leases(report.owned, report.live);
        Ok(report)
    }

    /// Takes the leases of earlier instances of this OMA's name: its predecessor, which
    /// crashed (a clean stop lets its leases go), so that a restart polls at once.
    async fn adopt(&self, store: &Store, until: i64) -> Result<(), StoreError> {
        let adopted = (store.adopt_poll_leases(&self.instance_id, &self.config.name, until)).await;
        let adopted = adopted.inspect_err(|_| {
            // Tried again at the next tick.
            self.started
                .store(false, std::sync::atomic::Ordering::SeqCst);
        })?;
        if !adopted.is_empty() {
            tracing::info!(event = "poll_leases_adopted", name = %self.config.name, vmas = adopted.len(),
                "took the polling leases of an earlier instance of this OMA (it did not stop cleanly)");
            store
                .metrics()
                .poll_lease_change("adopted", adopted.len() as u64);
        }
        Ok(())
    }

    /// This OMA's heartbeat row was gone at a later tick: it stalled for a lease period or
    /// more, another OMA removed it as expired, took its VMAs and ended its database sessions
    /// (its recovery run, if one was under way, stops at its next decision, see
    /// `crate::recovery`). The heartbeat just written brings it back as a new member: its
    /// leases lapsed by its own clock already, and it claims its share again.
    fn rejoined(&self, store: &Store) {
        tracing::warn!(event = "oma_instance_rejoined", instance_id = %self.instance_id,
            name = %self.config.name, "this OMA's own heartbeat had expired (it stalled for a lease period or more): other OMAs took its VMAs and ended its database sessions; it rejoins and claims its share again");
        store.metrics().poll_lease_change("rejoined", 1);
    }

    /// Removes the OMAs whose heartbeat expired, and ends their database sessions; returns
    /// how many this OMA removed.
    async fn reap(&self, store: &Store, now: i64) -> Result<usize, StoreError> {
        let expired = store.reap_oma_instances(now).await?;
        for gone in &expired {
            tracing::warn!(event = "oma_instance_expired", instance_id = %gone.instance_id,
                name = %gone.name, "another OMA stopped renewing its heartbeat (it died or stalled); its VMAs' leases are taken over and recovery runs again");
            end_sessions_of(store, gone).await;
        }
        store
            .metrics()
            .poll_lease_change("instance_expired", expired.len() as u64);
        Ok(expired.len())
    }

    /// The candidates, starting at a place that depends on this instance, so that OMAs
    /// claiming at the same moment mostly try different leases.
    fn in_my_order(&self, mut candidates: Vec<LeaseCandidate>) -> Vec<LeaseCandidate> {
        if !candidates.is_empty() {
            let start = crate::store::start_key(&self.instance_id) as usize % candidates.len();
            candidates.rotate_left(start);
        }
        candidates
    }

    fn note_claim(store: &Store, lease: &LeaseCandidate, report: &mut TickReport) {
        let metrics_reason = if lease.owner.is_empty() {
            report.claimed += 1;
            tracing::info!(event = "poll_lease_claimed", vma_id = %lease.vma_id,
                generation = lease.generation + 1, "claimed a VMA's polling lease");
            "claimed"
        } else {
            report.taken_over += 1;
            tracing::info!(event = "poll_lease_taken_over", vma_id = %lease.vma_id,
                previous_owner = %lease.owner, generation = lease.generation + 1,
                "took over a VMA's polling lease that its owner let go or let expire");
            "taken_over"
        };
        // The metric cannot tell a lease let go (rebalancing, a clean stop) from one that
        // expired; the log's previous owner and the `oma_instance_expired` lines can.
        store.metrics().poll_lease_change(metrics_reason, 1);
    }

    /// Puts `owned` in force until `until` and publishes it; logs the leases lost.
    fn set_owned(&self, owned: Vec<String>, until: Instant, store: &Store) {
        let set: HashSet<String> = owned.into_iter().collect();
        let mut map = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        let lost: Vec<&String> = map.keys().filter(|vma| !set.contains(*vma)).collect();
        if !lost.is_empty() {
            tracing::info!(event = "poll_lease_lost", vmas = ?lost,
                "no longer polling these VMAs: their leases were let go or taken over");
            store.metrics().poll_lease_change("lost", lost.len() as u64);
        }
        *map = set.iter().map(|vma| (vma.clone(), until)).collect();
        drop(map);
        self.published.send_replace(set);
    }

    /// Ticks every lease period / 3 until `stop` says true, then lets this OMA's leases go
    /// and removes its heartbeat, so the other OMAs take its VMAs at once.
    pub async fn run_forever(
        self: Arc<Self>,
        store: Store,
        instance_lost: Arc<dyn Fn() + Send + Sync>,
        stop: watch::Receiver<bool>,
    ) {
        let stopped = daemon_support::stopped(stop);
        tokio::pin!(stopped);
        let every = (self.config.period / 3).max(Duration::from_millis(10));
        tracing::info!(event = "poll_leases_started", instance_id = %self.instance_id,
            name = %self.config.name, lease_ms = self.config.period.as_millis() as u64,
            "polling VMAs whose lease this OMA holds");
        loop {
            if let Err(error) = self.tick(&store, instance_lost.as_ref()).await {
                tracing::warn!(event = "poll_lease_tick_failed", %error,
                    "renewing the polling leases failed; retrying next tick (the leases lapse one lease period after their last renewal)");
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = &mut stopped => break,
            }
        }
        self.set_owned(Vec::new(), Instant::now(), &store);
        match store.leave_poll_leases(&self.instance_id).await {
            Ok(()) => tracing::info!(event = "poll_leases_left", instance_id = %self.instance_id,
                "let every polling lease go at stop"),
            Err(error) => tracing::warn!(event = "poll_leases_leave_failed", %error,
                "letting the polling leases go at stop failed; the other OMAs take them when they expire"),
        }
    }
}
