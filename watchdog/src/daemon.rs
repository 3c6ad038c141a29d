//! The daemon: start the detector, find what runs, reconcile with the registry, then follow
//! every start and death until told to stop.
//!
//! The order at start matters: the detector is attached *before* `/proc` is scanned, so a
//! process that dies between the scan and the attach cannot exist; the registry from the last
//! run is reconciled after both, so a death during the downtime is reported exactly once.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use api::{
    Detector as DetectorKind, ExitStatus, FoundBy, JobId, ProcessEventKind, ProcessIdentity,
};
use chrono::Utc;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::config::Config;
use crate::detector::{Detector, DetectorEvent};
use crate::logging::{death, detector_name, found_by_name};
use crate::metrics::Metrics;
use crate::outbox::spill::Spill;
use crate::outbox::{Outbox, OutboxError};
use crate::proc_reader::{self, FoundProcess};
use crate::progress::{ProgressError, ProgressStore};
use crate::registry::{Registry, RegistryError};
use crate::trust::{ExeId, MigratekitIdentity};

mod adopt;
mod forget_progress;
mod jobs_view;
mod legacy;
mod reload;
mod serve;
mod start;
mod systemd;
mod tracker;

pub use legacy::LEGACY_JOURNAL;
pub use serve::{ServeError, run};
pub use start::{DetectorStartError, shutdown_signal};
pub use tracker::{TrackError, Tracker};

/// What stops the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory's modes cannot be read or made private.
    #[error(
        "cannot make the state directory {path} private (0700, files 0600): {source}; check its owner, the watchdog must own it"
    )]
    StateDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The registry cannot be loaded.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The outbox (the daemon's journal of events) cannot be opened.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The progress store cannot be opened.
    #[error(transparent)]
    Progress(#[from] ProgressError),
    /// No detector could be started.
    #[error(transparent)]
    Detector(#[from] DetectorStartError),
    /// The thread that writes the registry could not be started.
    #[error(
        "cannot start the registry's writer thread: {0}; check the process and memory limits of the watchdog's service"
    )]
    Flusher(#[source] std::io::Error),
    /// The initial scan of `/proc` failed.
    #[error("cannot scan /proc for running processes: {0}; the watchdog needs procfs at /proc")]
    Scan(#[source] std::io::Error),
}

/// A started daemon: detector attached, `/proc` scanned, registry reconciled.
#[derive(Debug)]
pub struct Daemon {
    tracker: Tracker,
    events: mpsc::Receiver<DetectorEvent>,
}

impl Daemon {
    /// Opens the registry and the outbox, attaches the detector, scans `/proc`, reconciles
    /// with the registry on disk. Every event is written once, to the outbox in
    /// `<state dir>/outbox`, whether or not anything delivers it.
    pub async fn start(config: Config) -> Result<Self, DaemonError> {
        Self::start_with(config, Metrics::new()).await
    }

    /// [`Daemon::start`], counting into `metrics`.
    pub async fn start_with(config: Config, metrics: Arc<Metrics>) -> Result<Self, DaemonError> {
        // Before anything in it is opened, and after logging starts, so that a fix is seen.
        crate::state_dir::secure(&config.state_dir).map_err(|source| DaemonError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let registry = Arc::new(Registry::open(&config.state_dir)?);
        let outbox = Arc::new(
            Outbox::open(
                &config.state_dir.join(crate::outbox::DIR_NAME),
                config.outbox_limits,
            )?
            .with_flush_order(config.outbox_flush_order),
        );
        legacy::import_journal(&config.state_dir, &outbox);
        // Deaths reach the registry's file a moment after they happen; the outbox forgets an
        // acknowledged death only once the file holds it (see `crate::registry`).
        registry
            .spawn_flusher(config.registry_flush_delay)
            .map_err(DaemonError::Flusher)?;
        let _ = outbox.set_ack_barrier(Arc::clone(&registry) as _);
        // Opened before reconciliation, so a death found at start carries the last progress
        // too. Loading it reads one small file: fine to block the start for it.
        let progress = Arc::new(ProgressStore::open(&config.state_dir)?);
        let _ = outbox.set_ack_observer(Arc::new(forget_progress::ForgetProgress {
            registry: Arc::clone(&registry),
            progress: Arc::clone(&progress),
        }));
        let migratekit = config.launcher.migratekit.clone();
        warn_if_unreadable(&migratekit);
        let started = start::detector(&config)?;
        metrics.set_build(
            detector_name(started.detector.kind()),
            started.detector.exit_mode_name(),
        );
        let tracker = Tracker::new(Arc::new(Core {
            metrics,
            registry,
            outbox,
            spill: Spill::new(),
            progress,
            detector: started.detector,
            migratekit,
            impostors: Mutex::new(HashSet::new()),
            unjobbed: Mutex::new(HashSet::new()),
            children: Mutex::new(HashMap::new()),
            reporting: Mutex::new(HashSet::new()),
            claimed: Condvar::new(),
        }));
        let names = config.match_names.clone();
        let found = tokio::task::spawn_blocking(move || proc_reader::scan(&names))
            .await
            .map_err(|e| DaemonError::Scan(std::io::Error::other(e)))?
            .map_err(DaemonError::Scan)?;
        tracker.core().reconcile(found);
        tracing::info!(
            event = "watchdog_ready",
            detector = detector_name(tracker.core().detector.kind()),
            watched = tracker.core().registry.running().len(),
            state_dir = %config.state_dir.display(),
            "watchdog ready"
        );
        Ok(Self {
            tracker,
            events: started.events,
        })
    }

    /// A handle for the REST API: job status queries and registering processes it starts.
    pub fn tracker(&self) -> Tracker {
        self.tracker.clone()
    }

    /// Follows detector events until `shutdown` completes or the detector stops.
    pub async fn follow_events(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Stamped each time round, and while waiting for the next event: a death whose report
        // never completes (a frozen file system under the outbox) stops the systemd watchdog's pings.
        let heartbeat = daemon_support::notify::Heartbeat::new("event loop");
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!(event = "watchdog_stopping", "shutdown requested; stopping");
                    break;
                }
                event = heartbeat.waiting(self.events.recv()) => match event {
                    Some(event) => self.tracker.core().handle(event).await,
                    None => {
                        tracing::error!(event = "detector_stopped", "the detector stopped delivering events; stopping so a supervisor restarts the watchdog");
                        break;
                    }
                },
            }
        }
        let registry = Arc::clone(&self.tracker.core().registry);
        let flushed = tokio::task::spawn_blocking(move || registry.flush()).await;
        if let Ok(Err(e)) = flushed {
            tracing::error!(event = "registry_error", error = %e,
                "cannot write the registry at shutdown; deaths it misses are still in the outbox and recognised at the next start");
        }
    }
}

/// Says once at start when the configured migratekit binary cannot be read: no process can
/// then be adopted by the detector or the scan, only registered by the launcher.
fn warn_if_unreadable(migratekit: &MigratekitIdentity) {
    if let Err(error) = ExeId::of_path(&migratekit.path) {
        tracing::warn!(event = "migratekit_binary_unreadable", path = %migratekit.path.display(), %error,
            "the configured migratekit binary cannot be read; no running process will be taken for migratekit until it can (set --migratekit-path)");
    }
}

#[derive(Debug)]
struct Core {
    /// Deaths and impostors are counted here.
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    /// Every event, durable before anything else happens to it, until the OMA acknowledges it.
    outbox: Arc<Outbox>,
    /// Events the outbox could not write (full or failing disk), held until it can.
    spill: Arc<Spill>,
    /// Latest progress per job; a death event carries its job's, see [`Core::record`].
    progress: Arc<ProgressStore>,
    detector: Arc<dyn Detector>,
    /// What migratekit is: only such processes are adopted (see [`crate::trust`]).
    migratekit: MigratekitIdentity,
    /// Processes with a matching name that were not adopted (see `adopt.rs`), so that each is
    /// logged once and its death is not logged at all.
    impostors: Mutex<HashSet<ProcessIdentity>>,
    /// Matching processes that name no job: watched so their death is logged, not reported.
    unjobbed: Mutex<HashSet<ProcessIdentity>>,
    /// Children handed over by [`Tracker::track_child`], reaped once their death is recorded.
    children: Mutex<HashMap<ProcessIdentity, std::process::Child>>,
    /// Deaths being reported right now. The launcher's reaper and the detector can report the
    /// same death at the same moment; the first to claim it reports it, the other drops it.
    reporting: Mutex<HashSet<ProcessIdentity>>,
    /// Signalled whenever a death is claimed in `reporting` or its report is done, for a
    /// launcher that waits for the detector's richer report ([`Core::await_report`]).
    claimed: Condvar,
}

impl Core {
    fn reconcile(&self, found: Vec<FoundProcess>) {
        for entry in self.registry.running() {
            let p = entry.process;
            let alive = matches!(proc_reader::read_stat(p.pid),
                Ok(Some(s)) if s.start_time == p.start_time && !s.is_dead());
            if alive && !self.still_registered_exe(&entry) {
                self.registered_exe_replaced(&entry);
            } else if alive {
                // `watch` reports the death of a zombie itself, or logs why it cannot watch.
                if self.watch(p) {
                    tracing::info!(event = "process_adopted", job_id = %entry.job_id, pid = p.pid,
                        start_time = p.start_time, "adopted a process that was running before this start");
                }
            } else if let Some(queued) = self.outbox.pending_death(p) {
                // Died before the last stop, which came before the registry's file caught up
                // with the outbox: the death is queued for the OMA already, not news.
                self.registry
                    .record_exit(p, queued.exit.unwrap_or_default(), queued.detector);
                tracing::info!(event = "death_already_queued", job_id = %entry.job_id, pid = p.pid,
                    start_time = p.start_time, event_id = %queued.event_id,
                    "a death recorded before this start is still queued for the OMA; not reported again");
            } else {
                self.report_death(p, ExitStatus::default(), DetectorKind::Registry);
            }
        }
        for f in found {
            if self.registry.get(f.identity).is_none() {
                self.adopt_new(f, FoundBy::Scan);
            }
        }
    }

    async fn handle(self: &Arc<Self>, event: DetectorEvent) {
        match event {
            DetectorEvent::Started { process, comm } => {
                if self.registry.get(process).is_some()
                    || self.is_unjobbed(process)
                    || self.is_impostor(process)
                {
                    return;
                }
                let found =
                    tokio::task::spawn_blocking(move || proc_reader::inspect(process, comm));
                // Gone already: its exit event follows and is logged then.
                if let Ok(Some(found)) = found.await {
                    self.adopt_new(found, FoundBy::Exec);
                }
            }
            DetectorEvent::Exited {
                process,
                exit,
                ktime_ns,
                ..
            } => {
                // When the kernel saw the death and when this loop did (for `bench_link` and
                // the kill-test benchmark's split).
                tracing::debug!(target: crate::clock::LATENCY_TARGET, event = "exit_timing",
                    pid = process.pid, start_time = process.start_time,
                    kernel_us = ktime_ns.map(|ns| ns / 1_000),
                    seen_us = crate::clock::monotonic_us(), "death seen");
                let kind = self.detector.kind();
                // Reporting blocks on the outbox's fsync. On a multi-threaded runtime it runs
                // right here (tokio hands this worker's other tasks, such as the delivery the
                // append wakes, to the other workers), which spares every death a switch to
                // the blocking pool's thread; elsewhere, on that pool. Either way it completes
                // before the next event, so events are still handled in order.
                let core = Arc::clone(self);
                let report = move || core.report_death(process, exit, kind);
                if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
                    tokio::task::block_in_place(report);
                } else if let Err(e) = tokio::task::spawn_blocking(report).await {
                    tracing::error!(event = "report_error", error = %e, pid = process.pid, "reporting a death failed");
                }
            }
        }
    }

    fn is_unjobbed(&self, p: ProcessIdentity) -> bool {
        self.unjobbed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&p)
    }

    pub(super) fn register(
        &self,
        p: ProcessIdentity,
        job_id: &JobId,
        found_by: FoundBy,
        exe: Option<ExeId>,
    ) -> Result<bool, RegistryError> {
        if !self.registry.register_exe(p, job_id, found_by, exe)? {
            return Ok(false);
        }
        // Registered explicitly (started or tracked) after the detector had ignored it.
        self.forget_impostor(p);
        let kind = self.detector.kind();
        match self.record(ProcessEventKind::ProcessStarted, job_id, p, None, kind) {
            Ok(ev) => tracing::info!(event = "process_started", job_id = %job_id, pid = p.pid,
                start_time = p.start_time, found_by = found_by_name(found_by), detector = detector_name(kind),
                event_id = %ev.event_id, "migratekit process started"),
            Err(e) => {
                tracing::error!(event = "outbox_error", error = %e, "cannot record a process start")
            }
        }
        self.watch(p);
        Ok(true)
    }

    /// Watches `p`; when it turns out to be gone already, reports its death (status unknown)
    /// unless the eBPF detector, attached before, will report it with its status. Returns
    /// whether it is being watched.
    fn watch(&self, p: ProcessIdentity) -> bool {
        // A process that is already dead (a zombie not yet reaped) would never produce an exit
        // event for a tracepoint: report it now, with the status its zombie still holds.
        if let Ok(Some(s)) = proc_reader::read_stat(p.pid)
            && s.start_time == p.start_time
            && s.is_dead()
        {
            let exit = s
                .exit_code
                .map(|raw| ExitStatus::from_wait_status(raw, false));
            let kind = self.detector.kind();
            self.report_death(p, exit.unwrap_or_default(), kind);
            return false;
        }
        match self.detector.watch(p) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || proc_reader::gone(&e) => {
                if self.detector.kind() != DetectorKind::Ebpf {
                    let kind = self.detector.kind();
                    self.report_death(p, ExitStatus::default(), kind);
                }
                false
            }
            Err(e) => {
                tracing::error!(event = "watch_error", error = %e, pid = p.pid,
                    "cannot watch a process; its death may go unseen until the next restart");
                false
            }
        }
    }

    /// Reports the death of `p` at most once: the registry in memory first (so that the job
    /// status tells it at once, and the outbox cannot forget the event before the registry
    /// has written it, see [`crate::registry`]), then the outbox (durable: the OMA is told
    /// from there), then the log. Should the outbox refuse it (full, or a write error), the
    /// exit stays recorded in the registry, where the OMA's recovery reads it from the job
    /// status; should the registry's write fail too, the file keeps the process as running
    /// and the next start reports it as died while unwatched instead of losing it.
    pub(super) fn report_death(
        &self,
        p: ProcessIdentity,
        exit: ExitStatus,
        detector: DetectorKind,
    ) {
        // When the death reached the reporting code, on the monotonic clock, for the kill-test
        // benchmark's split; logged here, where it happens, not carried along.
        tracing::debug!(target: crate::clock::LATENCY_TARGET, event = "receive_timing",
            pid = p.pid, start_time = p.start_time, received_us = crate::clock::monotonic_us(),
            "death received");
        let _ = self.detector.unwatch(p);
        let claimed = self
            .reporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p);
        if !claimed {
            return;
        }
        self.claimed.notify_all();
        self.report_claimed(p, exit, detector);
        self.reporting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p);
        self.claimed.notify_all();
    }

    /// Waits at most `limit` until someone else (the detector) has claimed the death of `p`
    /// or recorded it. Returns whether that happened.
    pub(super) fn await_report(&self, p: ProcessIdentity, limit: Duration) -> bool {
        let reporting = self.reporting.lock().unwrap_or_else(|e| e.into_inner());
        let (_reporting, wait) = self
            .claimed
            .wait_timeout_while(reporting, limit, |claimed| {
                !claimed.contains(&p) && self.registry.get(p).is_some()
            })
            .unwrap_or_else(|e| e.into_inner());
        !wait.timed_out()
    }

    /// [`Core::report_death`] once this caller alone reports `p`; when it returns, the
    /// registry no longer lists `p` as running.
    fn report_claimed(&self, p: ProcessIdentity, exit: ExitStatus, detector: DetectorKind) {
        let (kind, name, class) = if detector == DetectorKind::Registry {
            let name = crate::metrics::DIED_WHILE_UNWATCHED;
            (ProcessEventKind::DiedWhileUnwatched, name, name)
        } else {
            let class = exit.class().as_str();
            (ProcessEventKind::ProcessExited, "process_exited", class)
        };
        let Some(entry) = self.registry.record_exit(p, exit, detector) else {
            if self.forget_impostor(p) {
                // Not this VMA's migratekit: its death is no news to anyone.
                return;
            }
            let was_unjobbed = self
                .unjobbed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p);
            // The tracepoint also reports deaths already recorded another way (a zombie found
            // at `watch`): those are not news.
            let known = self.registry.exit_of(p).is_some();
            if was_unjobbed || (detector == DetectorKind::Ebpf && !known) {
                death(name, None, p, Some(&exit), detector, None);
            }
            return;
        };
        let registry_us = crate::clock::monotonic_us();
        // A death while unwatched carries an exit status with every field unknown.
        let recorded = self.record(kind, &entry.job_id, p, Some(exit), detector);
        let appended_us = crate::clock::monotonic_us();
        self.metrics.death(class);
        let event_id = match recorded {
            Ok(ev) => Some(ev.event_id),
            Err(e) => {
                tracing::error!(event = "outbox_error", error = %e, pid = p.pid, job_id = %entry.job_id,
                    "cannot queue a death for the OMA; the job status keeps it for the OMA's recovery");
                None
            }
        };
        death(
            name,
            Some(&entry.job_id),
            p,
            Some(&exit),
            detector,
            event_id,
        );
        // Where the time of a death goes, on the monotonic clock (for `bench_link`).
        tracing::debug!(target: crate::clock::LATENCY_TARGET, event = "death_timing",
            job_id = %entry.job_id, event_id = event_id.map(|id| id.to_string()),
            thread = std::thread::current().name(), registry_us, appended_us,
            "death recorded");
        self.reap(p);
    }

    /// Reaps a child handed over by `track_child`, now that its death is recorded.
    fn reap(&self, p: ProcessIdentity) {
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p);
        if let Some(mut child) = child
            && let Err(e) = child.wait()
        {
            tracing::warn!(event = "reap_error", error = %e, pid = p.pid, "cannot reap a child");
        }
    }

    /// Builds an event with a fresh id (UUID v7: ids sort by time) and writes it durably to
    /// the outbox: one fsync, the only copy until the OMA acknowledges it.
    fn record(
        &self,
        kind: ProcessEventKind,
        job_id: &JobId,
        p: ProcessIdentity,
        exit: Option<ExitStatus>,
        detector: DetectorKind,
    ) -> Result<api::ProcessEvent, OutboxError> {
        // A death carries migratekit's last word: the OMA polls progress only every few
        // seconds, so without it an `exit(0)` right after a `failed` report would read as a
        // success, and a completed job would keep the figures of its last poll. migratekit's
        // client waits for the answer to each update, and the answer comes after the update
        // is stored, so every update posted before the exit is here by now.
        let last_progress = match kind {
            ProcessEventKind::ProcessStarted => None,
            ProcessEventKind::ProcessExited | ProcessEventKind::DiedWhileUnwatched => {
                self.progress.get(job_id)
            }
        };
        let event = api::ProcessEvent {
            event_id: Uuid::now_v7(),
            kind,
            job_id: job_id.clone(),
            process: p,
            exit,
            observed_at: Utc::now(),
            detector,
            last_progress,
        };
        // Held in memory when the outbox cannot be written (see `crate::outbox::spill`).
        self.spill.append(&self.outbox, event.clone())?;
        Ok(event)
    }
}
