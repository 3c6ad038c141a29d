//! Scenario 7: 50 concurrent jobs, random kills and restarts of both daemons for ~20 s.
//!
//! Each job is judged by what happened to it, read back afterwards: when its process ended
//! (the stand-in's own `ending` line, or the moment the harness killed it), when the watchdog
//! was down (its stops to the restarted watchdog's ready line), and whether a watchdog logged
//! the death as seen. Nothing is predicted, so a slow machine changes no verdict.

use std::time::{Duration, SystemTime};

use api::ProcessIdentity;
use oma::model::{FailureClass, JobStatus};
use rand::Rng;

use super::scenarios::{expect_final, expect_final_among, expect_none_active, system};
use super::{Run, RunOutcome, fail};
use crate::observed::{Downtime, may_be_unwatched};
use crate::procs;
use crate::system::{PATIENCE, System};

/// What the harness did to one job, and so how it must end.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Exits 0 after reporting 100 %.
    Completes,
    /// Exits 3.
    Exits3,
    /// SIGKILLed by the harness, as a rule while the watchdog ran.
    Killed,
    /// SIGKILLed and gone while the watchdog was down.
    KilledUnwatched,
}

impl Fate {
    /// The verdict when a watchdog saw the death.
    fn seen(self) -> (JobStatus, Option<FailureClass>) {
        match self {
            Fate::Completes => (JobStatus::Completed, None),
            Fate::Exits3 => (JobStatus::Failed, Some(FailureClass::ProcessExited)),
            Fate::Killed => (JobStatus::Failed, Some(FailureClass::ProcessKilled)),
            Fate::KilledUnwatched => UNWATCHED,
        }
    }
}

/// The verdict for a death nobody saw.
const UNWATCHED: (JobStatus, Option<FailureClass>) =
    (JobStatus::Failed, Some(FailureClass::DiedWhileUnwatched));

/// One job of the scenario.
#[derive(Debug)]
struct LoadJob {
    id: String,
    /// The process, until the harness kills it.
    process: Option<ProcessIdentity>,
    fate: Fate,
    /// The wall clock just before the harness's SIGKILL.
    killed_at: Option<SystemTime>,
}

impl LoadJob {
    /// SIGKILLs the process (once) and notes when.
    fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            self.killed_at = Some(SystemTime::now());
            let _ = procs::kill_process(p, libc::SIGKILL);
        }
    }
}

/// Scenario 7.
pub fn load(run: &Run) -> RunOutcome {
    let mut sys = system(run)?;
    let mut rng = rand::thread_rng();
    let mut jobs = start_jobs(&sys, run, &mut rng)?;
    chaos(&mut sys, &mut jobs, &mut rng)?;
    // Whatever still runs to be killed is killed now, with the watchdog up.
    for job in jobs.iter_mut().filter(|j| j.fate == Fate::Killed) {
        job.kill();
    }
    let downtimes = sys.watchdog.downtimes();
    for job in &jobs {
        judge(&sys, job, &downtimes)?;
    }
    expect_none_active(&sys)?;
    Ok(Vec::new())
}

/// Starts the 50 jobs: a quarter end with exit 0, a quarter with exit 3 (each after 2 to
/// 15 s), half run until killed.
fn start_jobs(sys: &System, run: &Run, rng: &mut impl Rng) -> Result<Vec<LoadJob>, String> {
    let mut jobs = Vec::new();
    for i in 0..50 {
        let id = format!("load-{}-{i}", run.index);
        let run_for: f64 = rng.gen_range(2.0..15.0);
        let (args, fate) = match rng.gen_range(0..4) {
            0 => (format!("--standin-run-for {run_for:.1}"), Fate::Completes),
            1 => (
                format!("--standin-run-for {run_for:.1} --standin-exit-code 3"),
                Fate::Exits3,
            ),
            _ => (String::new(), Fate::Killed),
        };
        let p = sys
            .start_job(&id, &args)
            .map_err(fail("starting a load job"))?;
        jobs.push(LoadJob {
            id,
            process: Some(p),
            fate,
            killed_at: None,
        });
    }
    Ok(jobs)
}

/// ~20 s of random events: the OMA SIGKILLed and restarted; the watchdog SIGKILLed, one job
/// killed while it is down, the watchdog restarted; a job to be killed killed.
fn chaos(sys: &mut System, jobs: &mut [LoadJob], rng: &mut impl Rng) -> Result<(), String> {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..800)));
        match rng.gen_range(0..10) {
            0 => {
                sys.oma.sigkill().map_err(fail("SIGKILL of the OMA"))?;
                sys.oma.start_again().map_err(fail("restarting the OMA"))?;
            }
            1 => {
                sys.watchdog
                    .sigkill()
                    .map_err(fail("SIGKILL of the watchdog"))?;
                if let Some(job) = jobs
                    .iter_mut()
                    .find(|j| j.fate == Fate::Killed && j.process.is_some_and(procs::is_alive))
                {
                    let p = job.process;
                    job.kill();
                    if let Some(p) = p {
                        let _ = procs::wait_gone(p, PATIENCE);
                    }
                    job.fate = Fate::KilledUnwatched;
                }
                sys.watchdog
                    .start_again()
                    .map_err(fail("restarting the watchdog"))?;
            }
            _ => {
                let i = rng.gen_range(0..jobs.len());
                if jobs[i].fate == Fate::Killed {
                    jobs[i].kill();
                }
            }
        }
    }
    Ok(())
}

/// The job's verdict at the OMA against what happened to its process. A death that may have
/// gone unseen (see [`may_be_unwatched`]) may end either way: as seen, or
/// `died_while_unwatched`; any other death must end as seen.
fn judge(sys: &System, job: &LoadJob, downtimes: &[Downtime]) -> Result<(), String> {
    let seen = job.fate.seen();
    if job.fate == Fate::KilledUnwatched {
        return expect_final(sys, &job.id, seen.0, seen.1);
    }
    // The process has ended once the job is final; only then is its `ending` line sure to
    // be written.
    sys.oma
        .wait_final(&job.id, PATIENCE)
        .map_err(fail(&format!("job {} reaching a final state", job.id)))?;
    let ended_from = match job.fate {
        Fate::Killed => job.killed_at,
        _ => sys.watchdog.standin_end(&job.id).map(|e| e.at),
    }
    .ok_or_else(|| format!("job {}: no record of when its process ended", job.id))?;
    let recorded = sys
        .watchdog
        .deaths_logged(&job.id)
        .iter()
        .any(|e| e == "process_exited");
    if may_be_unwatched(ended_from, downtimes, recorded) {
        expect_final_among(sys, &job.id, &[seen, UNWATCHED])
    } else {
        expect_final(sys, &job.id, seen.0, seen.1)
    }
}
