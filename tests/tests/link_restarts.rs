//! Issue 4, end to end: restarts of either daemon while migratekit runs lose nothing and fail
//! nothing; refusals of unauthenticated and non-loopback calls.

use std::time::Duration;

use oma::model::JobStatus;
use reqwest::Method;
use system_tests::http::JsonClient;
use system_tests::netns::NetPair;
use system_tests::procs;
use system_tests::system::{PATIENCE, System, SystemOptions, final_transitions};

fn system() -> System {
    System::start(&SystemOptions::default()).expect("starting oma and vma-watchdog")
}

/// Waits until the OMA's copy of the job's progress has moved past `bytes`.
fn wait_progress_past(sys: &System, job: &str, bytes: i64) -> i64 {
    sys.oma
        .wait_job(job, PATIENCE, |j| j.bytes_transferred > bytes)
        .expect("progress reaches the OMA")
        .bytes_transferred
}

#[test]
fn watchdog_sigkilled_and_restarted_keeps_the_job_replicating() {
    if !system_tests::skip_unless_root("watchdog_restart_keeps_job") {
        return;
    }
    let mut sys = system();
    let p = sys.start_job("wd-restart", "").expect("job starts");
    sys.wait_recorded("wd-restart", p).expect("recorded");
    let before = wait_progress_past(&sys, "wd-restart", 0);
    sys.watchdog.sigkill().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        procs::is_alive(p),
        "migratekit survives the watchdog's death"
    );
    sys.watchdog.start_again().unwrap();
    let after = wait_progress_past(&sys, "wd-restart", before);
    assert!(after > before);
    let job = sys.oma.job("wd-restart").unwrap();
    assert_eq!(job.status, JobStatus::Replicating, "{job:?}");
    assert_eq!(job.pid, Some(i64::from(p.pid)));
    assert!(final_transitions(&sys.oma.audit("wd-restart").unwrap()).is_empty());
    // The adopted process is still watched: its death is reported.
    let (job, _) = sys
        .kill_and_wait("wd-restart", p, libc::SIGKILL)
        .expect("death of the adopted process reported");
    assert_eq!(job.status, JobStatus::Failed);
}

#[test]
fn oma_restarted_mid_job_keeps_the_live_job_and_polls_it_again() {
    if !system_tests::skip_unless_root("oma_restart_keeps_job") {
        return;
    }
    let mut sys = system();
    let p = sys.start_job("oma-restart", "").expect("job starts");
    sys.wait_recorded("oma-restart", p).expect("recorded");
    let before = wait_progress_past(&sys, "oma-restart", 0);
    sys.oma.sigkill().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    sys.oma.start_again().unwrap();
    let after = wait_progress_past(&sys, "oma-restart", before);
    assert!(after > before, "polling resumed after the restart");
    let job = sys.oma.job("oma-restart").unwrap();
    assert_eq!(job.status, JobStatus::Replicating, "{job:?}");
    let audit = sys.oma.audit("oma-restart").unwrap();
    assert!(final_transitions(&audit).is_empty(), "{audit:#?}");
    assert!(procs::is_alive(p));
}

#[test]
fn unauthenticated_calls_to_both_daemons_are_refused() {
    if !system_tests::skip_unless_root("unauthenticated_refused") {
        return;
    }
    let sys = system();
    let p = sys.start_job("auth", "").expect("job starts");
    sys.wait_recorded("auth", p).expect("recorded");
    let oma_calls = [
        (Method::GET, "/api/v1/jobs"),
        (Method::GET, "/api/v1/jobs/auth"),
        (Method::GET, "/api/v1/recovery/status"),
        (Method::POST, "/api/v1/recovery/run"),
        (Method::POST, "/api/v1/jobs/auth/cancel"),
        (Method::POST, "/api/v1/watchdog/events"),
    ];
    for (method, path) in oma_calls {
        for token in [None, Some("wrong-token-0123456789")] {
            let a = sys.oma.raw(method.clone(), path, token, None).unwrap();
            assert!(
                a.status == 401 || a.status == 403,
                "OMA {method} {path}: {a:?}"
            );
        }
    }
    let wd_calls = [
        (Method::GET, "/api/v1/jobs"),
        (Method::GET, "/api/v1/jobs/auth"),
        (Method::GET, "/api/v1/progress/auth"),
        (Method::POST, "/api/v1/jobs/other/start"),
        (Method::POST, "/api/v1/jobs/other/track"),
    ];
    for (method, path) in wd_calls {
        for token in [None, Some("wrong-token-0123456789")] {
            let a = sys.watchdog.raw(method.clone(), path, token, None).unwrap();
            assert!(
                a.status == 401 || a.status == 403,
                "watchdog {method} {path}: {a:?}"
            );
        }
    }
    // Nothing changed: the job still runs and is active.
    assert!(procs::is_alive(p));
    assert!(procs::migratekit_processes("other").is_empty());
    assert_eq!(sys.oma.job("auth").unwrap().status, JobStatus::Replicating);
}

#[test]
fn a_progress_update_from_a_non_loopback_peer_is_refused() {
    if !system_tests::skip_unless_root("non_loopback_progress_refused") {
        return;
    }
    let options = SystemOptions {
        partitioned: true,
        ..SystemOptions::default()
    };
    let sys = System::start(&options).expect("starting the system in two namespaces");
    let body = br#"{"stage":"Transfer","bytes_transferred":123,"throughput_bps":1}"#.to_vec();
    // From the OMA's namespace, over the veth pair: not a loopback peer.
    let net = sys.net.as_ref().expect("namespaces");
    let from_oma_side = JsonClient::new(
        NetPair::client_in(&net.oma_ns).unwrap(),
        sys.watchdog.url.clone(),
        None,
    );
    let a = from_oma_side
        .raw(
            Method::POST,
            "/api/v1/progress/foreign/update",
            None,
            Some(("application/json", body)),
        )
        .unwrap();
    assert!(a.status == 403 || a.status == 401, "{a:?}");
    assert!(sys.watchdog.progress("foreign").unwrap().is_none());
}
