//! Whether a process the detector or the `/proc` scan found is a job's migratekit.
//!
//! A name is not enough (see [`crate::trust`]): a process is adopted only when it runs the
//! configured binary as the configured user, and only when its job has no other live process.
//! Anything else is logged once as `impostor_ignored` and otherwise left alone: never
//! registered, never reported to the OMA, its death not even logged.

use std::collections::HashSet;

use api::{ExitStatus, FoundBy, JobId, ProcessIdentity};

use super::Core;
use crate::logging::found_by_name;
use crate::proc_reader::{self, FoundProcess};
use crate::registry::Entry;
use crate::trust::{self, ExeId, Refusal};

/// Past this many remembered impostors, those that have ended are forgotten. Each is
/// normally forgotten at its death; this bounds the set should a death never be seen.
const IMPOSTORS_PRUNE_AT: usize = 1024;

/// Why a process is not adopted.
enum Ignored {
    /// It is not what the configuration says migratekit is.
    NotMigratekit(Refusal),
    /// Its job already has another live process.
    JobHasLiveProcess(ProcessIdentity),
}

impl Core {
    /// A running process seen for the first time: register it when it is this VMA's
    /// migratekit running a job no other live process runs (or only watch it, when it names
    /// no job), and record that it started; else ignore it, saying so once.
    pub(super) fn adopt_new(&self, found: FoundProcess, found_by: FoundBy) {
        let p = found.identity;
        if self.is_impostor(p) {
            return;
        }
        let exe = match self.vet(p) {
            Some(Ok(exe)) => exe,
            Some(Err(refusal)) => {
                let why = Ignored::NotMigratekit(refusal);
                return self.ignore(p, found.job_id.as_ref(), found_by, why);
            }
            // Gone while it was checked: its exit follows, and is nothing to report.
            None => return,
        };
        let Some(job_id) = found.job_id else {
            self.unjobbed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p);
            tracing::warn!(event = "process_without_job", pid = p.pid, start_time = p.start_time,
                comm = %found.comm, "matching process names no job (no --job-id, no MIGRATEKIT_JOB_ID); its death will be logged but not reported");
            self.watch(p);
            return;
        };
        if let Some(running) = self.live_process_of(&job_id, p) {
            let why = Ignored::JobHasLiveProcess(running);
            return self.ignore(p, Some(&job_id), found_by, why);
        }
        if let Err(e) = self.register(p, &job_id, found_by, Some(exe)) {
            tracing::error!(event = "registry_error", error = %e, pid = p.pid, "cannot register a process");
        }
    }

    /// Checks `p` against the configured migratekit. `None` when `p` has ended meanwhile (its
    /// pid may even belong to another process now, so nothing read is about `p`).
    fn vet(&self, p: ProcessIdentity) -> Option<Result<ExeId, Refusal>> {
        let verdict = self.migratekit.check(p.pid);
        match proc_reader::read_stat(p.pid) {
            Ok(Some(s)) if s.start_time == p.start_time && !s.is_dead() => Some(verdict),
            _ => None,
        }
    }

    /// The live registered process of `job_id` other than `p`, if there is one. A registered
    /// process whose death is still on its way through the event queue does not count.
    pub(super) fn live_process_of(
        &self,
        job_id: &JobId,
        p: ProcessIdentity,
    ) -> Option<ProcessIdentity> {
        self.registry
            .running()
            .into_iter()
            .map(|e| (e.job_id, e.process))
            .filter(|(id, other)| id == job_id && *other != p)
            .map(|(_, other)| other)
            .find(|other| {
                matches!(proc_reader::read_stat(other.pid),
                    Ok(Some(s)) if s.start_time == other.start_time && !s.is_dead())
            })
    }

    /// Whether the live process registered as `entry` is still what was registered, after a
    /// restart: the executable recorded then (a binary replaced on disk by an upgrade since is
    /// still the one it runs), or else the configured migratekit. An entry written before the
    /// executable was recorded is taken on its identity alone, as before.
    pub(super) fn still_registered_exe(&self, entry: &Entry) -> bool {
        let Some(recorded) = entry.exe else {
            return true;
        };
        let pid = entry.process.pid;
        ExeId::of_process(pid).is_ok_and(|now| now == recorded)
            || self.migratekit.check(pid).is_ok()
    }

    /// At a restart, the live process registered as `entry` runs another executable than the
    /// one registered: the pid and start time were reused (after a reboot) or it has exec'd
    /// something else. The registered migratekit is gone; the process there now is ignored.
    pub(super) fn registered_exe_replaced(&self, entry: &Entry) {
        let p = entry.process;
        let refusal = Refusal::WrongExe {
            expected: self.migratekit.path.clone(),
        };
        self.ignore(
            p,
            Some(&entry.job_id),
            entry.found_by,
            Ignored::NotMigratekit(refusal),
        );
        self.report_death(p, ExitStatus::default(), api::Detector::Registry);
    }

    pub(super) fn is_impostor(&self, p: ProcessIdentity) -> bool {
        self.impostors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&p)
    }

    /// Forgets `p` as an impostor (it died); returns whether it was one.
    pub(super) fn forget_impostor(&self, p: ProcessIdentity) -> bool {
        self.impostors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p)
    }

    /// Remembers `p` as not adopted and logs why, once per process: a second sighting (the
    /// procfs detector's next scan, another exec event) changes nothing and logs nothing.
    /// Its arguments are never logged; its executable's path and its uid are.
    fn ignore(&self, p: ProcessIdentity, job_id: Option<&JobId>, found_by: FoundBy, why: Ignored) {
        {
            let mut impostors = self.impostors.lock().unwrap_or_else(|e| e.into_inner());
            if !impostors.insert(p) {
                return;
            }
            if impostors.len() > IMPOSTORS_PRUNE_AT {
                prune(&mut impostors);
            }
        }
        let uid = trust::process_uids(p.pid).ok().map(|(real, _)| real);
        let exe = trust::exe_path(p.pid).map(|path| path.display().to_string());
        let (reason, detail) = match why {
            Ignored::NotMigratekit(refusal) => (refusal.reason(), refusal.to_string()),
            Ignored::JobHasLiveProcess(running) => (
                "job_has_live_process",
                format!(
                    "its job already runs as pid {} (start time {})",
                    running.pid, running.start_time
                ),
            ),
        };
        self.metrics.impostor();
        tracing::warn!(event = "impostor_ignored", pid = p.pid, start_time = p.start_time, uid,
            exe = exe.as_deref(), job_id = job_id.map(JobId::as_str), reason, detail = %detail,
            found_by = found_by_name(found_by),
            "a process named like migratekit is not adopted: nothing about it is registered or reported");
    }
}

/// Keeps only the impostors still running.
fn prune(impostors: &mut HashSet<ProcessIdentity>) {
    impostors.retain(
        |p| matches!(proc_reader::read_stat(p.pid), Ok(Some(s)) if s.start_time == p.start_time),
    );
}
