//! Issue 4, end to end with both real binaries on loopback: deaths of migratekit reach the
//! OMA's database, with the right class and evidence, exactly once, across OMA downtime.
//! Every test asserts the OMA's job, VM context and audit trail through its REST API.

use std::time::Duration;

use oma::model::{ContextStatus, FailureClass, JobStatus};
use system_tests::procs;
use system_tests::system::{
    PATIENCE, System, SystemOptions, files_with_secret, final_transitions, json_find,
};

fn system() -> System {
    System::start(&SystemOptions::default()).expect("starting oma and vma-watchdog")
}

#[test]
fn sigkill_fails_the_job_as_process_killed_and_releases_the_context() {
    if !system_tests::skip_unless_root("sigkill_fails_the_job") {
        return;
    }
    let sys = system();
    let process = sys.start_job("kill-9", "").expect("job starts");
    sys.wait_recorded("kill-9", process)
        .expect("OMA records the process");
    let (job, latency) = sys
        .kill_and_wait("kill-9", process, libc::SIGKILL)
        .expect("the death reaches the OMA");
    eprintln!(
        "kill-to-committed-transition latency: {:.1} ms",
        latency.as_secs_f64() * 1e3
    );
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.failure_class, Some(FailureClass::ProcessKilled));
    let audit = sys.oma.audit("kill-9").unwrap();
    let finals = final_transitions(&audit);
    assert_eq!(finals.len(), 1, "exactly one final transition: {audit:#?}");
    assert_eq!(
        json_find(&finals[0].evidence, "signal").and_then(|v| v.as_i64()),
        Some(9),
        "evidence names signal 9: {}",
        finals[0].evidence
    );
    let ctx = sys.oma.context("ctx-kill-9").unwrap();
    assert_eq!(ctx.current_status, ContextStatus::ReadyForFailover);
    assert_eq!(ctx.current_job_id, None);
    assert_eq!(ctx.failed_jobs, 1);
    assert_eq!(files_with_secret(&sys), Vec::<std::path::PathBuf>::new());
}

#[test]
fn exit_zero_after_full_progress_completes_the_job() {
    if !system_tests::skip_unless_root("exit_zero_completes") {
        return;
    }
    let sys = system();
    let process = sys
        .start_job("done-0", "--standin-run-for 2 --standin-exit-code 0")
        .expect("job starts");
    let job = sys.oma.wait_final("done-0", PATIENCE).expect("job ends");
    assert!(!procs::is_alive(process));
    assert_eq!(job.status, JobStatus::Completed, "{job:?}");
    assert_eq!(job.failure_class, None);
    // migratekit's last word reached the OMA with the death; the watchdog then forgets the
    // job's progress once the OMA has acknowledged it.
    assert_eq!(job.progress_percent, 100.0, "{job:?}");
    let deadline = std::time::Instant::now() + PATIENCE;
    while sys.watchdog.progress("done-0").unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "progress never forgotten"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ctx = sys.oma.context("ctx-done-0").unwrap();
    assert_eq!(ctx.current_status, ContextStatus::ReadyForFailover);
    assert_eq!(ctx.successful_jobs, 1);
    assert_eq!(ctx.last_successful_job_id.as_deref(), Some("done-0"));
    assert_eq!(
        final_transitions(&sys.oma.audit("done-0").unwrap()).len(),
        1
    );
}

#[test]
fn three_deaths_while_the_oma_is_down_are_applied_once_each_after_it_returns() {
    if !system_tests::skip_unless_root("oma_down_three_deaths") {
        return;
    }
    let mut sys = system();
    let jobs = ["down-a", "down-b", "down-c"];
    let mut processes = Vec::new();
    for job in jobs {
        let p = sys.start_job(job, "").expect("job starts");
        sys.wait_recorded(job, p).expect("recorded");
        processes.push(p);
    }
    sys.oma.stop().unwrap();
    for (p, sig) in processes
        .iter()
        .zip([libc::SIGKILL, libc::SIGTERM, libc::SIGINT])
    {
        procs::kill_process(*p, sig).unwrap();
        procs::wait_gone(*p, PATIENCE).unwrap();
    }
    // Give the outbox time to try and fail against the stopped OMA.
    std::thread::sleep(Duration::from_millis(500));
    sys.oma.start_again().unwrap();
    for job in jobs {
        let j = sys.oma.wait_final(job, PATIENCE).expect("delivered");
        assert_eq!(j.status, JobStatus::Failed);
        assert_eq!(j.failure_class, Some(FailureClass::ProcessKilled), "{job}");
    }
    // Redeliveries and periodic recovery must not add a second transition.
    std::thread::sleep(Duration::from_secs(3));
    for job in jobs {
        let audit = sys.oma.audit(job).unwrap();
        assert_eq!(final_transitions(&audit).len(), 1, "{job}: {audit:#?}");
    }
}

#[test]
fn a_death_while_the_watchdog_is_down_is_reported_as_died_while_unwatched() {
    if !system_tests::skip_unless_root("died_while_unwatched") {
        return;
    }
    let mut sys = system();
    let p = sys.start_job("unwatched", "").expect("job starts");
    sys.wait_recorded("unwatched", p).expect("recorded");
    sys.watchdog.sigkill().unwrap();
    procs::kill_process(p, libc::SIGKILL).unwrap();
    procs::wait_gone(p, PATIENCE).unwrap();
    sys.watchdog.start_again().unwrap();
    let job = sys.oma.wait_final("unwatched", PATIENCE).expect("reported");
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.failure_class, Some(FailureClass::DiedWhileUnwatched));
    assert_eq!(
        final_transitions(&sys.oma.audit("unwatched").unwrap()).len(),
        1
    );
}
