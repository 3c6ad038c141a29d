//! The human-readable tables `job-recovery` prints without `--json`.

use crate::model::Job;
use crate::recovery::Decision;
use crate::routes::recovery::RecoveryStatus;

pub(super) fn decisions_table<'a>(
    rows: impl Iterator<Item = (&'a Decision, Option<bool>)>,
) -> String {
    let mut out = format!(
        "{:<38} {:<12} {:<14} {:<9} {:<10} {:<24} {}\n",
        "JOB", "VMA", "STATUS", "ACTION", "TO", "CLASS", "APPLIED"
    );
    let mut n = 0;
    for (d, applied) in rows {
        n += 1;
        let action = serde_json::to_value(d.action)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        out.push_str(&format!(
            "{:<38} {:<12} {:<14} {:<9} {:<10} {:<24} {}\n",
            d.job_id,
            d.vma_id,
            d.from_status.as_str(),
            action.unwrap_or_default(),
            d.to_status.as_str(),
            d.failure_class.map(|c| c.as_str()).unwrap_or("-"),
            applied.map(|a| if a { "yes" } else { "no" }).unwrap_or("-"),
        ));
    }
    if n == 0 {
        out.push_str("(no jobs)\n");
    }
    out
}

pub(super) fn status_table(status: &RecoveryStatus) -> String {
    let mut out = format!("active jobs: {}\n", status.active_jobs);
    for (s, n) in &status.jobs_by_status {
        out.push_str(&format!("  {s:<16} {n}\n"));
    }
    out.push_str("last recovery runs:\n");
    for run in &status.last_runs {
        let at = crate::model::from_ms(run.started_at_ms).to_rfc3339();
        out.push_str(&format!(
            "  {at} {:<9} {} examined {} kept {} finalized {} waiting {} superseded {}\n",
            run.trigger,
            if run.dry_run { "dry " } else { "real" },
            run.examined,
            run.kept,
            run.finalized,
            run.waiting,
            run.superseded
        ));
    }
    let p = &status.poller;
    out.push_str(&format!(
        "poller: cycles {} tracked {} backing off {} polls ok {} failed {} last cycle {}\n",
        p.cycles,
        p.jobs_tracked,
        p.jobs_backing_off,
        p.polls_ok,
        p.polls_failed,
        p.last_cycle_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "never".into())
    ));
    if let Some(e) = &p.last_error {
        out.push_str(&format!("poller last error: {e}\n"));
    }
    out
}

pub(super) fn jobs_table(jobs: &[Job]) -> String {
    let mut out = format!(
        "{:<38} {:<12} {:<16} {:<14} {:>6} {:>14} {:>8} {}\n",
        "JOB", "VMA", "VM CONTEXT", "STATUS", "%", "BYTES", "PID", "CLASS"
    );
    for job in jobs {
        out.push_str(&format!(
            "{:<38} {:<12} {:<16} {:<14} {:>6.1} {:>14} {:>8} {}\n",
            job.id,
            job.vma_id,
            job.vm_context_id,
            job.status.as_str(),
            job.progress_percent,
            job.bytes_transferred,
            job.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            job.failure_class.map(|c| c.as_str()).unwrap_or("-"),
        ));
    }
    if jobs.is_empty() {
        out.push_str("(no jobs)\n");
    }
    out
}

pub(super) fn job_line(job: &Job) -> String {
    let mut out = format!(
        "job {} on {} ({}): {}",
        job.id, job.vma_id, job.vm_context_id, job.status
    );
    if let (Some(pid), Some(start)) = (job.pid, job.process_start_time) {
        out.push_str(&format!(", pid {pid} (start time {start})"));
    }
    if let Some(message) = &job.error_message {
        out.push_str(&format!(": {message}"));
    }
    out.push('\n');
    out
}
