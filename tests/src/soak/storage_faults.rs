//! Applying the storage faults ([`super::storage`]) and checking that the daemons report
//! them: a full state directory must show as `storage_degraded` (and `/health`'s `storage`)
//! whenever the watchdog held an event in memory, and end in `storage_recovered`; an injected
//! write or fsync error must appear in the failing daemon's log, never be swallowed.

use std::time::{Duration, Instant};

use super::Soak;
use super::schedule::IoTarget;
use super::storage::storage_error_lines;

/// How long a daemon may take to log an injected error, or the watchdog to write what it held.
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// Counts of the watchdog's storage log lines when the disk filled.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskMarks {
    held: usize,
}

fn count(log: &str, event: &str) -> usize {
    let needle = format!("\"event\":\"{event}\"");
    let plain = format!("event={event}");
    log.lines()
        .filter(|l| l.contains(&needle) || l.contains(&plain))
        .count()
}

/// The first `event_held_in_memory` line of `log` not inside an episode the watchdog
/// announced: the last of `storage_degraded`, `storage_recovered` and `watchdog_ready` (a new
/// process) before it must be `storage_degraded`.
fn held_unannounced(log: &str) -> Option<String> {
    let mut degraded = false;
    for line in log.lines() {
        let is = |event: &str| line.contains(&format!("\"event\":\"{event}\""));
        if is("storage_degraded") {
            degraded = true;
        } else if is("storage_recovered") || is("watchdog_ready") {
            degraded = false;
        } else if is("event_held_in_memory") && !degraded {
            return Some(line.to_owned());
        }
    }
    None
}

/// Whether the watchdog's last storage line (`storage_degraded`, `storage_recovered`, or a
/// new process's `watchdog_ready`) is `storage_degraded`.
fn in_degraded_episode(log: &str) -> bool {
    let mut degraded = false;
    for line in log.lines() {
        if line.contains("\"event\":\"storage_degraded\"") {
            degraded = true;
        } else if line.contains("\"event\":\"storage_recovered\"")
            || line.contains("\"event\":\"watchdog_ready\"")
        {
            degraded = false;
        }
    }
    degraded
}

fn marks(log: &str) -> DiskMarks {
    DiskMarks {
        held: count(log, "event_held_in_memory"),
    }
}

impl Soak {
    /// The watchdog cannot start now: its state directory cannot be written.
    pub(super) fn watchdog_blocked(&self) -> bool {
        self.outages.disk_full || matches!(self.outages.io_errors, Some((IoTarget::Watchdog, ..)))
    }

    /// Fills (`full`) or frees the watchdog's state directory.
    pub(super) fn disk(&mut self, full: bool) -> Result<String, String> {
        let fs = self
            .state_fs
            .as_ref()
            .ok_or("no tmpfs under the state directory")?;
        if full {
            let bytes = fs.fill()?;
            self.disk_marks = marks(&self.sys.watchdog.log());
            self.outages.disk_full = true;
            return Ok(format!("filled ({bytes} bytes)"));
        }
        fs.free()?;
        self.outages.disk_full = false;
        let log = self.sys.watchdog.log();
        let now = marks(&log);
        let held = now.held - self.disk_marks.held;
        self.report.held_in_memory += held;
        if let Some(line) = held_unannounced(&log) {
            return Err(format!(
                "VIOLATION: the watchdog held an event in memory outside a storage_degraded episode: {line}"
            ));
        }
        let mut done = format!("freed; {held} events were held in memory");
        // Writes injected to fail meanwhile keep the events held until that window heals too.
        let files_fail = matches!(self.outages.io_errors, Some((IoTarget::Watchdog, ..)));
        if files_fail {
            done.push_str(", kept held while the watchdog's writes still fail");
        } else if held > 0 && self.sys.watchdog.daemon().is_running() {
            self.await_recovered()?;
            done.push_str(", all written since (storage_recovered, /health ok)");
        }
        done.push_str(&self.start_deferred()?);
        self.outages.closed();
        Ok(done)
    }

    /// After a full disk was freed: the episode closed by `storage_recovered` (or by a new
    /// process, which holds nothing) and `/health` back to `ok`. The episode may have closed
    /// before the disk was freed: a small write can still fit in the free room of a file's
    /// last page on a full file system (soak seed 16250711704014577519).
    fn await_recovered(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + REPORT_GRACE;
        loop {
            let recovered = !in_degraded_episode(&self.sys.watchdog.log());
            let health: Option<serde_json::Value> = self
                .sys
                .watchdog
                .client()
                .call(reqwest::Method::GET, "/health", None::<&()>, 200)
                .ok();
            let state = health.as_ref().map(|h| h["storage"]["state"].clone());
            if recovered && state.as_ref().is_some_and(|s| s == "ok") {
                return Ok(());
            }
            // A watchdog that stopped meanwhile writes nothing: its restart reconciles.
            if Instant::now() > deadline || !self.sys.watchdog.daemon().is_running() {
                if !self.sys.watchdog.daemon().is_running() {
                    return Ok(());
                }
                return Err(format!(
                    "VIOLATION: {REPORT_GRACE:?} after the disk was freed the watchdog has not written what it held (storage_recovered {recovered}, /health storage {state:?})"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts (`Some`) or ends injected write/fsync errors.
    pub(super) fn io_errors(&mut self, spec: Option<(IoTarget, i32)>) -> Result<String, String> {
        if spec.is_none() {
            // An OMA that stopped itself in the window is started once the files heal.
            self.supervise_oma()?;
        }
        let shim = self.shim.as_ref().ok_or("no I/O shim")?;
        let Some((target, errno)) = spec else {
            shim.heal()?;
            let Some((target, hits_before, lines_before)) = self.outages.io_errors.take() else {
                return Ok("none open".into());
            };
            let paths = shim.hit_paths().split_off(hits_before);
            // In WAL mode SQLite writes its main file, and fsyncs, only when it checkpoints,
            // after commits that are durable in the WAL already; a failed automatic checkpoint
            // is retried later and never reaches the OMA (SQLite ignores it by design).
            // Counted; only failed writes of the WAL or journal must show in the OMA's log.
            let main_db = self.sys.oma.dir().join("oma.db");
            let checkpoints = paths
                .iter()
                .filter(|(op, p)| target == IoTarget::Oma && (*p == main_db || op.contains("sync")))
                .count();
            self.report.sqlite_checkpoint_failures += checkpoints;
            let hits = paths.len() - checkpoints;
            let done = self.reported(target, hits, lines_before)?;
            let restarted = self.start_deferred()?;
            self.outages.closed();
            return Ok(format!("healed; {done}{restarted}"));
        };
        let prefix = match target {
            IoTarget::Watchdog => self.sys.watchdog.dir().join("state"),
            IoTarget::Oma => self.sys.oma.dir().join("oma.db"),
        };
        let lines = storage_error_lines(&self.daemon_log(target));
        shim.fail(&prefix, errno)?;
        self.outages.io_errors = Some((target, shim.hits(), lines));
        Ok(format!("failing under {}", prefix.display()))
    }

    fn daemon_log(&self, target: IoTarget) -> String {
        match target {
            IoTarget::Watchdog => self.sys.watchdog.log(),
            IoTarget::Oma => std::fs::read_to_string(self.sys.oma.log_path()).unwrap_or_default(),
        }
    }

    /// Every window in which the shim failed calls must have left an error in that daemon's log.
    fn reported(&mut self, target: IoTarget, hits: usize, before: usize) -> Result<String, String> {
        if hits == 0 {
            return Ok("no call failed".into());
        }
        let deadline = Instant::now() + REPORT_GRACE;
        loop {
            let log = self.daemon_log(target);
            // Inside an episode the watchdog announced (`storage_degraded`, still open), a
            // further failure of the same kind is not logged again: `/health` shows it.
            if target == IoTarget::Watchdog && in_degraded_episode(&log) {
                *self
                    .report
                    .io_errors_reported
                    .entry(format!("{target:?}"))
                    .or_default() += 1;
                return Ok(format!(
                    "{hits} calls failed inside an announced storage_degraded episode"
                ));
            }
            let lines = storage_error_lines(&log) - before;
            if lines > 0 {
                *self
                    .report
                    .io_errors_reported
                    .entry(format!("{target:?}"))
                    .or_default() += 1;
                return Ok(format!("{hits} calls failed, {lines} error lines logged"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "VIOLATION: {hits} writes/fsyncs of the {target:?} files failed, and its log says nothing of it (swallowed)"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts what waited for the storage: the watchdog, the OMA; and any daemon that ended
    /// on its own meanwhile (as its supervisor would), which is noted.
    fn start_deferred(&mut self) -> Result<String, String> {
        let mut out = String::new();
        if self.outages.watchdog_deferred && !self.watchdog_blocked() {
            self.sys
                .watchdog
                .start_again()
                .map_err(|e| format!("starting the deferred watchdog: {e}"))?;
            self.outages.watchdog_deferred = false;
            self.outages.watchdog_down = false;
            out.push_str("; deferred watchdog started");
        }
        if self.outages.oma_down && !self.outages.postgres_down && self.outages.io_errors.is_none()
        {
            self.sys
                .oma
                .start_again()
                .map_err(|e| format!("starting the deferred OMA: {e}"))?;
            self.outages.oma_down = false;
            out.push_str("; deferred OMA started");
        }
        if !self.outages.watchdog_down && !self.sys.watchdog.daemon().is_running() {
            return Err(format!(
                "VIOLATION: the watchdog exited on its own during a storage fault: {}",
                self.sys.watchdog.daemon().log_tail(5)
            ));
        }
        // It may have stopped itself (exit 75) just as the window closed.
        self.supervise_oma()?;
        if !self.outages.oma_down && !self.sys.oma.daemon().is_running() {
            return Err(format!(
                "VIOLATION: the OMA exited on its own during a storage fault: {}",
                self.sys.oma.daemon().log_tail(5)
            ));
        }
        Ok(out)
    }

    /// Plays systemd for the OMA: an OMA that stopped itself on a SQLite I/O error (exit 75,
    /// its documented reaction, since a connection whose COMMIT failed would acknowledge
    /// commits that never reach the files) is started again, at once if its files can be
    /// written, else once they heal ([`Self::start_deferred`]). Any other exit of its own is
    /// a violation.
    pub(super) fn supervise_oma(&mut self) -> Result<(), String> {
        if self.outages.oma_down {
            return Ok(());
        }
        let Some(status) = self.sys.oma.daemon().exited() else {
            return Ok(());
        };
        if status.code() != Some(oma::store::EXIT_SQLITE_IO_ERROR) {
            return Err(format!(
                "VIOLATION: the OMA exited on its own ({status}): {}",
                self.sys.oma.daemon().log_tail(5)
            ));
        }
        self.report.oma_io_error_exits += 1;
        let files_fail = matches!(self.outages.io_errors, Some((IoTarget::Oma, ..)));
        if files_fail || self.outages.postgres_down {
            self.outages.oma_down = true;
            self.note(
                "OMA exited 75 on a SQLite I/O error; started again when its files heal".into(),
            );
            return Ok(());
        }
        self.sys
            .oma
            .start_again()
            .map_err(|e| format!("starting the OMA again after its exit 75: {e}"))?;
        self.note("OMA exited 75 on a SQLite I/O error; started again".into());
        Ok(())
    }
}
