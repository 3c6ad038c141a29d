//! Scenario 10: a completion nobody watched. migratekit reports `completed` at 100 %, and
//! its process then ends while the watchdog is down, so its exit status is unknown
//! (`died_while_unwatched`, detector `registry`). The OMA must end the job `completed` on the
//! evidence of that last report, with its own audit action `completed_unwatched`, and not as
//! a crash. The death is put inside the downtime on purpose: the stand-in holds its end
//! (`--standin-linger-until`) until the harness has SIGKILLed the watchdog.

use api::ProgressStatus;
use oma::model::JobStatus;

use super::scenarios::{expect_final, expect_none_active, started, system};
use super::{Run, RunOutcome, check, fail};
use crate::observed::may_be_unwatched;
use crate::procs;
use crate::system::{PATIENCE, System};

/// The job's id.
const JOB: &str = "done-unwatched";

/// Scenario 10.
pub fn unwatched_completion(run: &Run) -> RunOutcome {
    let mut sys = system(run)?;
    let release = sys.watchdog.dir().join("behaviour").join("release-end");
    let p = started(
        &sys,
        JOB,
        &format!(
            "--standin-run-for 0.5 --standin-linger-until {}",
            release.display()
        ),
    )?;
    // The 100 % `completed` report reached the watchdog, and the OMA has polled it.
    sys.watchdog
        .wait_progress(JOB, PATIENCE, |s| {
            s.update.status == Some(ProgressStatus::Completed)
        })
        .map_err(fail(
            "the stand-in's completed report reaching the watchdog",
        ))?;
    sys.oma
        .wait_job(JOB, PATIENCE, |j| {
            j.progress_percent >= 100.0 && j.status.is_active()
        })
        .map_err(fail("the OMA polling the 100 % report"))?;
    sys.watchdog
        .sigkill()
        .map_err(fail("SIGKILL of the watchdog"))?;
    std::fs::write(&release, b"").map_err(fail("releasing the stand-in's end"))?;
    procs::wait_gone(p, PATIENCE).map_err(fail("the stand-in ending"))?;
    sys.watchdog
        .start_again()
        .map_err(fail("restarting the watchdog"))?;
    setup_held(&sys)?;
    expect_final(&sys, JOB, JobStatus::Completed, None)?;
    let audit = sys
        .oma
        .audit(JOB)
        .map_err(fail("reading the audit trail"))?;
    let completions: Vec<_> = audit
        .iter()
        .filter(|a| a.action == "completed_unwatched")
        .collect();
    check(
        completions.len() == 1 && completions[0].to_status == JobStatus::Completed,
        || {
            let actions: Vec<_> = audit.iter().map(|a| a.action.as_str()).collect();
            format!("expected one completed_unwatched entry to completed, audit: {actions:?}")
        },
    )?;
    expect_none_active(&sys)?;
    Ok(Vec::new())
}

/// The set-up did what it says: the stand-in's `completed` report was accepted, its own end
/// lies inside the downtime, and the restarted watchdog reported the death as unwatched.
fn setup_held(sys: &System) -> Result<(), String> {
    let end = sys
        .watchdog
        .standin_end(JOB)
        .ok_or("the stand-in logged no ending line")?;
    check(end.completed == "accepted", || {
        format!("the completed report was {}, not accepted", end.completed)
    })?;
    let downtimes = sys.watchdog.downtimes();
    let inside = downtimes
        .iter()
        .any(|d| d.down <= end.at && d.ready.is_some_and(|r| end.at <= r));
    check(
        inside && may_be_unwatched(end.at, &downtimes, false),
        || {
            format!(
                "the stand-in's end {:?} is outside the downtimes {downtimes:?}",
                end.at
            )
        },
    )?;
    let deaths = sys.watchdog.deaths_logged(JOB);
    check(deaths == ["died_while_unwatched"], || {
        format!("the watchdog logged {deaths:?}, expected one died_while_unwatched")
    })?;
    Ok(())
}
