//! Both real daemons over HTTPS with mutual TLS: the OMA starts a job at the watchdog over
//! HTTPS, migratekit's progress reaches the watchdog's plain loopback listener, the job is
//! killed, and the death is delivered over HTTPS and committed at the OMA.

use oma::model::{FailureClass, JobStatus};
use system_tests::system::{System, SystemOptions, final_transitions};

#[test]
fn a_whole_job_over_mutual_tls_from_start_to_committed_death() {
    if !system_tests::skip_unless_root("a_whole_job_over_mutual_tls") {
        return;
    }
    let sys = System::start(&SystemOptions {
        tls: true,
        ..SystemOptions::default()
    })
    .expect("starting oma and vma-watchdog over HTTPS");
    assert!(sys.oma.url.starts_with("https://") && sys.watchdog.url.starts_with("https://"));
    let process = sys
        .start_job("tls-1", "")
        .expect("the job starts over HTTPS");
    sys.wait_recorded("tls-1", process)
        .expect("the OMA records the process");
    let progress = system_tests::http::wait_for(
        "progress through the plain loopback listener",
        std::time::Duration::from_secs(20),
        std::time::Duration::from_millis(100),
        || sys.watchdog.progress("tls-1").ok().flatten(),
    )
    .expect("migratekit's progress reaches the watchdog");
    assert!(progress.update.bytes_transferred > 0, "{progress:?}");
    let (job, latency) = sys
        .kill_and_wait("tls-1", process, libc::SIGKILL)
        .expect("the death reaches the OMA over HTTPS");
    eprintln!(
        "kill-to-committed-transition latency over mutual TLS: {:.1} ms",
        latency.as_secs_f64() * 1e3
    );
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.failure_class, Some(FailureClass::ProcessKilled));
    let audit = sys.oma.audit("tls-1").unwrap();
    assert_eq!(final_transitions(&audit).len(), 1, "{audit:#?}");
}
