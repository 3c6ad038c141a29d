//! Scenarios 1, 2, 3, 5 and 6 of issue 5, on loopback, and the checks every scenario shares.

use std::time::Duration;

use api::ProcessIdentity;
use oma::model::{FailureClass, JobStatus};

use super::{Run, RunOutcome, check, fail};
use crate::procs;
use crate::system::{PATIENCE, System, SystemOptions, final_transitions, json_find};

pub(crate) fn system(run: &Run) -> Result<System, String> {
    let options = SystemOptions {
        detector: run.detector.clone(),
        oma: run.oma_config(false)?,
        ..SystemOptions::default()
    };
    System::start(&options).map_err(fail("starting oma and vma-watchdog"))
}

/// Starts `job` and waits until the OMA has recorded its process.
pub(crate) fn started(sys: &System, job: &str, args: &str) -> Result<ProcessIdentity, String> {
    let p = sys.start_job(job, args).map_err(fail("starting a job"))?;
    sys.wait_recorded(job, p)
        .map_err(fail("OMA recording the process"))?;
    Ok(p)
}

/// Asserts the job's final state, class, and exactly one final transition.
pub(crate) fn expect_final(
    sys: &System,
    job: &str,
    status: JobStatus,
    class: Option<FailureClass>,
) -> Result<(), String> {
    expect_final_among(sys, job, &[(status, class)])
}

/// Asserts the job's final state and class are one of `allowed`, with exactly one final
/// transition.
pub(crate) fn expect_final_among(
    sys: &System,
    job: &str,
    allowed: &[(JobStatus, Option<FailureClass>)],
) -> Result<(), String> {
    let j = sys
        .oma
        .wait_final(job, PATIENCE)
        .map_err(fail(&format!("job {job} reaching a final state")))?;
    let audit = sys
        .oma
        .audit(job)
        .map_err(fail("reading the audit trail"))?;
    check(allowed.contains(&(j.status, j.failure_class)), || {
        let evidence = final_transitions(&audit).first().map(|a| {
            let actor = a.actor;
            let detector = json_find(&a.evidence, "detector").cloned();
            let exit = json_find(&a.evidence, "exit").cloned();
            format!(" (by {actor:?}, detector {detector:?}, exit {exit:?})")
        });
        let expected: Vec<String> = allowed
            .iter()
            .map(|(s, c)| format!("{s:?}/{c:?}"))
            .collect();
        format!(
            "job {job}: expected {}, got {:?}/{:?}{}",
            expected.join(" or "),
            j.status,
            j.failure_class,
            evidence.unwrap_or_default()
        )
    })?;
    let n = final_transitions(&audit).len();
    check(n == 1, || {
        format!("job {job}: {n} final transitions, expected 1")
    })
}

/// Asserts the job is still active with its process, and its progress moves at the OMA.
pub(crate) fn expect_alive_and_polled(
    sys: &System,
    job: &str,
    p: ProcessIdentity,
) -> Result<(), String> {
    check(procs::is_alive(p), || format!("job {job}: process died"))?;
    let before = sys.oma.job(job).map_err(fail("reading a job"))?;
    check(before.status.is_active(), || {
        format!("job {job} was moved to {:?}", before.status)
    })?;
    sys.oma
        .wait_job(job, PATIENCE, |j| {
            j.bytes_transferred > before.bytes_transferred && j.status.is_active()
        })
        .map_err(fail(&format!("progress of {job} moving at the OMA")))?;
    Ok(())
}

/// Asserts that no job is left active.
pub(crate) fn expect_none_active(sys: &System) -> Result<(), String> {
    let active = sys.oma.active_jobs().map_err(fail("listing jobs"))?;
    check(active.is_empty(), || {
        format!(
            "jobs left active: {:?}",
            active.iter().map(|j| &j.id).collect::<Vec<_>>()
        )
    })
}

/// SIGKILLs `p` and waits until it is gone.
pub(crate) fn kill_gone(p: ProcessIdentity) -> Result<(), String> {
    procs::kill_process(p, libc::SIGKILL).map_err(fail("killing migratekit"))?;
    procs::wait_gone(p, PATIENCE).map_err(fail("migratekit ending"))
}

/// The end of the restart and partition scenarios: the job `live` still runs and is polled;
/// SIGKILLed, it fails as `process_killed`, and no job is left active. Returns its
/// kill-to-commit time.
pub(crate) fn live_job_still_watched(
    sys: &System,
    live: ProcessIdentity,
    what: &str,
) -> RunOutcome {
    expect_alive_and_polled(sys, "live", live)?;
    let (_, latency) = sys
        .kill_and_wait("live", live, libc::SIGKILL)
        .map_err(fail(what))?;
    expect_final(
        sys,
        "live",
        JobStatus::Failed,
        Some(FailureClass::ProcessKilled),
    )?;
    expect_none_active(sys)?;
    Ok(vec![latency])
}

/// Scenario 1: the OMA restarts mid-job (SIGKILL on even runs, SIGTERM on odd ones).
pub fn oma_restart(run: &Run) -> RunOutcome {
    let mut sys = system(run)?;
    let live = started(&sys, "live", "")?;
    let dying = started(&sys, "dying", "")?;
    if run.index.is_multiple_of(2) {
        sys.oma.sigkill().map_err(fail("SIGKILL of the OMA"))?;
    } else {
        sys.oma.stop().map_err(fail("stopping the OMA"))?;
    }
    kill_gone(dying)?;
    sys.oma.start_again().map_err(fail("restarting the OMA"))?;
    expect_final(
        &sys,
        "dying",
        JobStatus::Failed,
        Some(FailureClass::ProcessKilled),
    )?;
    live_job_still_watched(&sys, live, "killing the live job")
}

/// Scenario 2: the watchdog restarts mid-job (SIGKILL on even runs, SIGTERM on odd ones).
pub fn watchdog_restart(run: &Run) -> RunOutcome {
    let mut sys = system(run)?;
    let live = started(&sys, "live", "")?;
    let dying = started(&sys, "dying", "")?;
    if run.index.is_multiple_of(2) {
        sys.watchdog
            .sigkill()
            .map_err(fail("SIGKILL of the watchdog"))?;
    } else {
        sys.watchdog.stop().map_err(fail("stopping the watchdog"))?;
    }
    check(procs::is_alive(live), || {
        "migratekit died with the watchdog".into()
    })?;
    kill_gone(dying)?;
    sys.watchdog
        .start_again()
        .map_err(fail("restarting the watchdog"))?;
    expect_final(
        &sys,
        "dying",
        JobStatus::Failed,
        Some(FailureClass::DiedWhileUnwatched),
    )?;
    live_job_still_watched(&sys, live, "killing the adopted job")
}

fn expect_evidence(
    sys: &System,
    job: &str,
    key: &str,
    want: &serde_json::Value,
) -> Result<(), String> {
    let audit = sys
        .oma
        .audit(job)
        .map_err(fail("reading the audit trail"))?;
    let finals = final_transitions(&audit);
    let got = finals.first().and_then(|a| json_find(&a.evidence, key));
    check(got == Some(want), || {
        format!("job {job}: evidence {key} = {got:?}, expected {want}")
    })
}

/// Scenario 3: every way migratekit dies.
pub fn migratekit_dies(run: &Run) -> RunOutcome {
    let sys = system(run)?;
    let mut latencies = Vec::new();
    for (job, sig) in [("sigkill", libc::SIGKILL), ("sigterm", libc::SIGTERM)] {
        let p = started(&sys, job, "")?;
        let (_, l) = sys.kill_and_wait(job, p, sig).map_err(fail(job))?;
        latencies.push(l);
        expect_final(
            &sys,
            job,
            JobStatus::Failed,
            Some(FailureClass::ProcessKilled),
        )?;
        expect_evidence(&sys, job, "signal", &sig.into())?;
    }
    sys.start_job("segv", "--standin-run-for 0.3 --standin-crash segv")
        .map_err(fail("starting the segv job"))?;
    expect_final(
        &sys,
        "segv",
        JobStatus::Failed,
        Some(FailureClass::ProcessKilled),
    )?;
    expect_evidence(&sys, "segv", "signal", &libc::SIGSEGV.into())?;
    expect_evidence(&sys, "segv", "core_dumped", &true.into())?;
    sys.start_job("exit3", "--standin-run-for 0.3 --standin-exit-code 3")
        .map_err(fail("starting the exit-3 job"))?;
    expect_final(
        &sys,
        "exit3",
        JobStatus::Failed,
        Some(FailureClass::ProcessExited),
    )?;
    expect_evidence(&sys, "exit3", "code", &3.into())?;
    let cgroup = crate::cgroup::MemCgroup::create(
        &format!("kill-test-oom-{}", std::process::id()),
        64 << 20,
    )
    .map_err(fail("creating a memory cgroup"))?;
    sys.watchdog
        .set_cgroup("oom", &cgroup.procs_file())
        .map_err(fail("placing the OOM job in the cgroup"))?;
    sys.start_job(
        "oom",
        "--standin-run-for 0.3 --standin-oom --standin-oom-cap-mib 1024",
    )
    .map_err(fail("starting the OOM job"))?;
    // Only the eBPF detector can tell an OOM kill (`signal->oom_mm`); the procfs detector
    // sees a SIGKILL like any other (docs/WATCHDOG.md, "The procfs detector").
    let detector = sys.detector().map_err(fail("asking which detector runs"))?;
    let (class, oom) = match detector.as_str() {
        "procfs" => (FailureClass::ProcessKilled, false),
        _ => (FailureClass::OomKilled, true),
    };
    expect_final(&sys, "oom", JobStatus::Failed, Some(class))?;
    expect_evidence(&sys, "oom", "signal", &libc::SIGKILL.into())?;
    expect_evidence(&sys, "oom", "oom_killed", &oom.into())?;
    expect_none_active(&sys)?;
    Ok(latencies)
}

/// Scenario 5: thread exits that are not deaths.
pub fn threads(run: &Run) -> RunOutcome {
    let sys = system(run)?;
    let worker = started(&sys, "worker-exit", "--standin-thread-exit")?;
    let leader = started(&sys, "leader-exit", "--standin-leader-exit")?;
    // Both thread exits happen within 100 ms of start; give a false death time to arrive.
    std::thread::sleep(Duration::from_millis(1500));
    for (job, p) in [("worker-exit", worker), ("leader-exit", leader)] {
        let j = sys.oma.job(job).map_err(fail("reading a job"))?;
        check(j.status.is_active() && j.failure_class.is_none(), || {
            format!(
                "job {job}: a thread exit was taken for a death ({:?})",
                j.status
            )
        })?;
        check(procs::is_alive(p), || {
            format!("job {job}: the process is gone")
        })?;
    }
    let mut latencies = Vec::new();
    for (job, p) in [("worker-exit", worker), ("leader-exit", leader)] {
        let (_, l) = sys
            .kill_and_wait(job, p, libc::SIGKILL)
            .map_err(fail(job))?;
        latencies.push(l);
        expect_final(
            &sys,
            job,
            JobStatus::Failed,
            Some(FailureClass::ProcessKilled),
        )?;
    }
    expect_none_active(&sys)?;
    Ok(latencies)
}

/// Attempts at landing a new process on a given pid before giving up.
const TRIES: usize = 300;

/// Makes the next process land on `pid` (root: `/proc/sys/kernel/ns_last_pid`), retrying a
/// few times since other processes on the machine fork too. Returns the new process.
pub(crate) fn occupy_pid(pid: u32) -> Result<std::process::Child, String> {
    // The pid is free only once the dead process has been reaped (the harness's subreaper
    // does it) and no thread of another process holds it: wait for that first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "pid {pid} is still in use 5 s after its process died"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for _ in 0..TRIES {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .map_err(fail("writing /proc/sys/kernel/ns_last_pid"))?;
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .map_err(fail("spawning sleep"))?;
        if child.id() == pid {
            return Ok(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    Err(format!(
        "could not get pid {pid} for a new process in {TRIES} tries"
    ))
}

/// Scenario 6: pid reuse after a death during the watchdog's downtime.
pub fn pid_reuse(run: &Run) -> RunOutcome {
    let mut sys = system(run)?;
    let p = started(&sys, "reused", "")?;
    sys.watchdog
        .sigkill()
        .map_err(fail("SIGKILL of the watchdog"))?;
    procs::kill_process(p, libc::SIGKILL).map_err(fail("killing migratekit"))?;
    procs::wait_gone(p, PATIENCE).map_err(fail("migratekit ending"))?;
    let mut impostor = occupy_pid(p.pid)?;
    let outcome = (|| {
        sys.watchdog
            .start_again()
            .map_err(fail("restarting the watchdog"))?;
        expect_final(
            &sys,
            "reused",
            JobStatus::Failed,
            Some(FailureClass::DiedWhileUnwatched),
        )?;
        let status = sys
            .watchdog
            .job("reused")
            .map_err(fail("watchdog job status"))?;
        let running = matches!(
            status.as_ref().map(|s| &s.state),
            Some(api::JobProcessState::Running { .. })
        );
        check(!running, || format!("the impostor was adopted: {status:?}"))?;
        let job = sys.oma.job("reused").map_err(fail("reading the job"))?;
        check(job.process_start_time == Some(p.start_time as i64), || {
            "the OMA's job changed process".into()
        })?;
        expect_none_active(&sys)
    })();
    let _ = impostor.kill();
    let _ = impostor.wait();
    outcome.map(|()| Vec::new())
}
