//! The soak's invariants, checked about every second while the schedule runs and once more
//! at the end. Each returns `Err` with what was violated, for which job, and the facts.
//!
//! - No job is final while its process lives (a cancelled job excepted: the cancel releases
//!   it first and has the VMA stop the process after, docs/OPERATIONS.md; its process must be
//!   gone within [`ACTIVE_AFTER_DEATH`] of the cancel once the system is whole).
//! - Every job that became final did so once (exactly one final transition) with a verdict
//!   the facts allow ([`SoakJob::allowed`]).
//! - No job stays active longer than [`ACTIVE_AFTER_DEATH`] after its process is gone and
//!   the system is whole.
//! - No VM context is released while its job's process lives, and none is held by a final job.
//! - Both daemons' resident memory and open files stay under fixed bounds.
//! - While the system is whole, the OMA's API answers (no longer than [`API_SILENCE`] out).
//! - The outbox delivers each event exactly once ([`super::exactly_once`]): one death event per
//!   process, no acknowledgement repeated across compactions, no event applied twice at the
//!   OMA, and at the end nothing of the soak's jobs left unacknowledged.

use std::time::{Duration, Instant};

use oma::model::JobStatus;

use super::Soak;
use super::jobs::{ACTIVE_AFTER_DEATH, verdict_ok};
use crate::observed::Downtime;
use crate::system::final_transitions;

/// The bound on either daemon's resident set: far above what they use (tens of MiB), so
/// that only growth without bound trips it.
pub const MAX_RSS_KIB: u64 = 256 << 10;

/// The bound on either daemon's open file descriptors.
pub const MAX_FDS: usize = 256;

/// How long the OMA's API may fail to answer while the system is whole.
pub const API_SILENCE: Duration = Duration::from_secs(15);

/// One round over every job and both daemons.
pub fn check(soak: &mut Soak) -> Result<(), String> {
    resources(soak)?;
    let state = soak.sys.watchdog.dir().join("state");
    soak.ledger.read(&state, &soak_prefix())?;
    soak.report.outbox_events = soak.ledger.appended;
    if soak.outages.oma_down || soak.outages.postgres_down {
        return Ok(());
    }
    let mut downtimes = None;
    for i in 0..soak.jobs.len() {
        cancelled_process_stops(soak, i)?;
        if !soak.jobs[i].judged {
            check_job(soak, i, &mut downtimes)?;
        }
    }
    Ok(())
}

/// A cancelled job's process must end once the system is whole again.
fn cancelled_process_stops(soak: &mut Soak, i: usize) -> Result<(), String> {
    let whole = soak.outages.whole();
    let whole_since = soak.outages.whole_since;
    let job = &mut soak.jobs[i];
    let Some(at) = job.cancelled else {
        return Ok(());
    };
    if job.alive() && whole && Instant::now() > at.max(whole_since) + ACTIVE_AFTER_DEATH {
        return Err(format!(
            "job {} was cancelled {:.1} s ago and the system is whole, but its process {:?} still runs",
            job.id,
            at.elapsed().as_secs_f64(),
            job.process
        ));
    }
    Ok(())
}

fn check_job(
    soak: &mut Soak,
    i: usize,
    downtimes: &mut Option<Vec<Downtime>>,
) -> Result<(), String> {
    let id = soak.jobs[i].id.clone();
    let oma_job = match soak.sys.oma.job(&id) {
        Ok(j) => {
            soak.api_failing = None;
            j
        }
        Err(e) => return api_failed(soak, &format!("GET job {id}: {e}")),
    };
    let job = &mut soak.jobs[i];
    if job.process.is_none() {
        job.process = match (oma_job.pid, oma_job.process_start_time) {
            (Some(pid), Some(start)) => Some(api::ProcessIdentity {
                pid: pid as u32,
                start_time: start as u64,
            }),
            _ => crate::procs::migratekit_processes(&id).first().copied(),
        };
    }
    let alive = job.alive();
    if oma_job.status.is_final() {
        if alive && oma_job.status != JobStatus::Cancelled {
            return Err(format!(
                "job {id} is {:?} ({:?}) while its process {:?} still runs",
                oma_job.status, oma_job.failure_class, job.process
            ));
        }
        return judge(soak, i, &oma_job, downtimes);
    }
    if alive {
        return context_held(soak, &id);
    }
    let (whole, whole_since) = (soak.outages.whole(), soak.outages.whole_since);
    if let Some(gone) = soak.jobs[i].gone
        && whole
        && Instant::now() > gone.max(whole_since) + ACTIVE_AFTER_DEATH
    {
        return Err(format!(
            "job {id} is still {:?} {:.1} s after its process {:?} was seen gone \
             (system whole for {:.1} s)",
            oma_job.status,
            gone.elapsed().as_secs_f64(),
            soak.jobs[i].process,
            whole_since.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// A read of the OMA that failed: tolerated during outages, and while whole for at most
/// [`API_SILENCE`].
fn api_failed(soak: &mut Soak, what: &str) -> Result<(), String> {
    if !soak.outages.whole() {
        return Ok(());
    }
    let since = *soak.api_failing.get_or_insert_with(Instant::now);
    if since.elapsed() > API_SILENCE {
        return Err(format!(
            "the OMA's API has failed for {:.1} s while the system is whole: {what}",
            since.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// The job's VM context must be held by it while its process lives.
fn context_held(soak: &mut Soak, id: &str) -> Result<(), String> {
    let ctx = match soak.sys.oma.context(&format!("ctx-{id}")) {
        Ok(c) => c,
        Err(e) => return api_failed(soak, &format!("GET context of {id}: {e}")),
    };
    // The job may have become final between the two reads; only a still-active job counts.
    if ctx.current_job_id.as_deref() != Some(id)
        && soak.sys.oma.job(id).is_ok_and(|j| j.status.is_active())
    {
        return Err(format!(
            "the VM context of job {id} is {:?} (held by {:?}) while the job is active and its process lives",
            ctx.current_status, ctx.current_job_id
        ));
    }
    Ok(())
}

/// A job seen final for the first time: one final transition, a verdict the facts allow,
/// its context released.
fn judge(
    soak: &mut Soak,
    i: usize,
    oma_job: &oma::model::Job,
    downtimes: &mut Option<Vec<Downtime>>,
) -> Result<(), String> {
    let id = soak.jobs[i].id.clone();
    let audit = match soak.sys.oma.audit(&id) {
        Ok(a) => a,
        Err(e) => return api_failed(soak, &format!("GET audit of {id}: {e}")),
    };
    let finals = final_transitions(&audit).len();
    if finals != 1 {
        return Err(format!(
            "job {id} has {finals} final transitions (expected exactly 1): {audit:?}"
        ));
    }
    super::exactly_once::applied_once(&id, &audit)?;
    let downtimes = downtimes.get_or_insert_with(|| soak.sys.watchdog.downtimes());
    let allowed = soak.jobs[i].allowed(&soak.sys, &soak.detector, downtimes);
    if !verdict_ok(oma_job, &allowed) {
        return Err(format!(
            "job {id} ended {:?} / {:?}, but what happened to it ({:?}, killed {:?}, cancelled {}) allows only {allowed:?}; evidence {}",
            oma_job.status,
            oma_job.failure_class,
            soak.jobs[i].fate,
            soak.jobs[i].killed.map(|(_, s)| s),
            soak.jobs[i].cancelled.is_some(),
            final_transitions(&audit)[0].evidence
        ));
    }
    let ctx = match soak.sys.oma.context(&format!("ctx-{id}")) {
        Ok(c) => c,
        Err(e) => return api_failed(soak, &format!("GET context of {id}: {e}")),
    };
    if ctx.current_job_id.as_deref() == Some(id.as_str()) {
        return Err(format!(
            "job {id} is {:?} but still holds its VM context ({:?})",
            oma_job.status, ctx.current_status
        ));
    }
    soak.jobs[i].judged = true;
    soak.report.judged += 1;
    let verdict = match oma_job.failure_class {
        Some(class) => format!("{}/{}", oma_job.status, class),
        None => oma_job.status.to_string(),
    };
    *soak.report.verdicts.entry(verdict).or_default() += 1;
    Ok(())
}

/// Both daemons' resident set and open descriptors, against the bounds.
fn resources(soak: &mut Soak) -> Result<(), String> {
    let pids = [
        ("oma", soak.sys.oma.daemon().pid()),
        ("vma-watchdog", soak.sys.watchdog.daemon().pid()),
    ];
    for (name, pid) in pids {
        let Some(pid) = pid else { continue };
        let Some(rss) = rss_kib(pid) else { continue };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let max_rss = soak.report.max_rss_kib.entry(name.into()).or_default();
        *max_rss = (*max_rss).max(rss);
        let max_fds = soak.report.max_fds.entry(name.into()).or_default();
        *max_fds = (*max_fds).max(fds);
        if rss > MAX_RSS_KIB || fds > MAX_FDS {
            return Err(format!(
                "{name} (pid {pid}) uses {rss} KiB resident and {fds} descriptors \
                 (bounds {MAX_RSS_KIB} KiB, {MAX_FDS})"
            ));
        }
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// At the end: every job's audit trail once more (a late duplicate final transition would
/// show here), and no job active.
pub fn final_audit(soak: &mut Soak) -> Result<(), String> {
    for job in &soak.jobs {
        let audit = soak
            .sys
            .oma
            .audit(&job.id)
            .map_err(|e| format!("reading the audit trail of {}: {e}", job.id))?;
        let finals = final_transitions(&audit).len();
        if finals != 1 {
            return Err(format!(
                "job {} has {finals} final transitions at the end: {audit:?}",
                job.id
            ));
        }
        super::exactly_once::applied_once(&job.id, &audit)?;
    }
    outbox_drained(soak)?;
    let active = soak
        .sys
        .oma
        .active_jobs()
        .map_err(|e| format!("listing active jobs: {e}"))?;
    if !active.is_empty() {
        let ids: Vec<&str> = active.iter().map(|j| j.id.as_str()).collect();
        return Err(format!("jobs still active at the end: {ids:?}"));
    }
    Ok(())
}

/// The soak's job ids start with this (they carry the soak's pid).
fn soak_prefix() -> String {
    format!("soak-{}-", std::process::id())
}

/// At the end, with everything healed: every event of the soak's jobs acknowledged.
fn outbox_drained(soak: &mut Soak) -> Result<(), String> {
    let state = soak.sys.watchdog.dir().join("state");
    let deadline = Instant::now() + ACTIVE_AFTER_DEATH;
    loop {
        soak.ledger.read(&state, &soak_prefix())?;
        soak.report.outbox_events = soak.ledger.appended;
        let left = soak.ledger.unacknowledged();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let ids: Vec<String> = left
                .iter()
                .map(|e| format!("{} ({}, {:?})", e.event_id, e.job_id, e.kind))
                .collect();
            return Err(format!(
                "outbox: {} events of the soak's jobs never acknowledged: {ids:?}",
                ids.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
