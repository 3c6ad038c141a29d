//! Scenarios 4 (network partition in namespaces) and 8 (bad input to both APIs).

use std::time::Duration;

use api::ProcessIdentity;
use oma::model::{FailureClass, JobStatus};
use reqwest::Method;

use super::scenarios::{
    expect_alive_and_polled, expect_final, expect_none_active, kill_gone, live_job_still_watched,
    started, system,
};
use super::{Run, RunOutcome, check, fail};
use crate::procs;
use crate::system::{System, SystemOptions};

/// Scenario 4: the veth link between the OMA's and the VMA's namespaces is cut while two of
/// three jobs die, then restored.
pub fn partition(run: &Run) -> RunOutcome {
    let options = SystemOptions {
        partitioned: true,
        detector: run.detector.clone(),
        oma: run.oma_config(true)?,
        ..SystemOptions::default()
    };
    let sys = System::start(&options).map_err(fail("starting the system in namespaces"))?;
    let net = sys.net.as_ref().ok_or("no namespaces")?;
    let live = started(&sys, "live", "")?;
    let a = started(&sys, "dies-a", "")?;
    let b = started(&sys, "dies-b", "")?;
    expect_alive_and_polled(&sys, "live", live)?;
    net.cut().map_err(fail("cutting the link"))?;
    for p in [a, b] {
        kill_gone(p)?;
    }
    // Long enough for the poller and recovery (every 2 s) to fail against the cut link.
    std::thread::sleep(Duration::from_secs(5));
    net.restore().map_err(fail("restoring the link"))?;
    for job in ["dies-a", "dies-b"] {
        expect_final(
            &sys,
            job,
            JobStatus::Failed,
            Some(FailureClass::ProcessKilled),
        )?;
    }
    live_job_still_watched(&sys, live, "killing the live job")
}

/// One refused request: what, method, path, token, body, acceptable statuses.
type Case<'a> = (
    &'a str,
    Method,
    &'a str,
    Option<&'a str>,
    Option<(&'a str, Vec<u8>)>,
    &'a [u16],
);

fn refused(what: &str, status: u16, allowed: &[u16]) -> Result<(), String> {
    check(allowed.contains(&status), || {
        format!("{what}: HTTP {status}, expected one of {allowed:?}")
    })
}

/// A JSON body for a [`Case`].
fn json(b: &[u8]) -> Option<(&'static str, Vec<u8>)> {
    Some(("application/json", b.to_vec()))
}

/// Scenario 8: malformed, oversized, unauthenticated and wrong-VMA requests.
pub fn bad_input(run: &Run) -> RunOutcome {
    let sys = system(run)?;
    let p = started(&sys, "victim", "")?;
    for (what, method, path, token, body, allowed) in oma_cases(Some(&sys.oma.operator_token)) {
        let a = sys.oma.raw(method, path, token, body).map_err(fail(what))?;
        refused(&format!("OMA {what}"), a.status, allowed)?;
    }
    other_vmas_event(&sys, p)?;
    for (what, method, path, token, body, allowed) in watchdog_cases(Some(&sys.oma.vma_api_token)) {
        let a = sys
            .watchdog
            .raw(method, path, token, body)
            .map_err(fail(what))?;
        refused(&format!("watchdog {what}"), a.status, allowed)?;
    }
    nothing_changed(&sys)?;
    let (_, latency) = sys
        .kill_and_wait("victim", p, libc::SIGKILL)
        .map_err(fail("killing the victim"))?;
    expect_none_active(&sys)?;
    Ok(vec![latency])
}

/// The requests the OMA must refuse; `op` is the operator's token.
fn oma_cases(op: Option<&str>) -> Vec<Case<'_>> {
    // Just over the OMA's 1 MiB limit: a server stops reading at its limit, and what remains
    // must fit the socket buffers so that the client reads the 413 instead of failing on a
    // reset while still sending.
    let oma_big = vec![b'x'; oma::BODY_LIMIT + (64 << 10)];
    vec![
        (
            "malformed job",
            Method::POST,
            "/api/v1/jobs",
            op,
            json(b"{\"id\":"),
            &[400],
        ),
        (
            "unknown field",
            Method::POST,
            "/api/v1/jobs",
            op,
            json(br#"{"vm_context_id":"c","vma_id":"vma-1","bogus":1}"#),
            &[400],
        ),
        (
            "oversized job",
            Method::POST,
            "/api/v1/jobs",
            op,
            Some(("application/json", oma_big)),
            &[413],
        ),
        ("no token", Method::GET, "/api/v1/jobs", None, None, &[401]),
        (
            "wrong token",
            Method::POST,
            "/api/v1/recovery/run",
            Some("not-a-token-at-all-000"),
            json(b"{}"),
            &[401, 403],
        ),
        (
            "operator token on events",
            Method::POST,
            "/api/v1/watchdog/events",
            op,
            json(br#"{"vma_id":"vma-1","events":[]}"#),
            &[401, 403],
        ),
    ]
}

/// A second VMA reporting the first one's job (`p`, the victim's process) is refused.
fn other_vmas_event(sys: &System, p: ProcessIdentity) -> Result<(), String> {
    let other_token = "vma-2-token-0123456789abcdef";
    sys.oma
        .register_vma("vma-2", "http://127.0.0.1:9", other_token)
        .map_err(fail("registering a second VMA"))?;
    let event = serde_json::json!({
        "vma_id": "vma-2",
        "events": [{
            "event_id": uuid::Uuid::new_v4(),
            "kind": "process_exited",
            "job_id": "victim",
            "process": { "pid": p.pid, "start_time": p.start_time },
            "exit": { "code": null, "signal": 9, "core_dumped": false, "oom_killed": false },
            "observed_at": chrono::Utc::now(),
            "detector": "ebpf",
        }],
    });
    let body = serde_json::to_vec(&event).map_err(fail("encoding an event"))?;
    let a = sys
        .oma
        .raw(
            Method::POST,
            "/api/v1/watchdog/events",
            Some(other_token),
            json(&body),
        )
        .map_err(fail("wrong-VMA event"))?;
    refused("OMA event about another VMA's job", a.status, &[403])
}

/// The requests the watchdog must refuse; `api` is the token the OMA presents to it.
fn watchdog_cases(api: Option<&str>) -> Vec<Case<'_>> {
    // Just over the watchdog's 64 KiB limit, for the same reason as the OMA's oversized job
    // (see `oma_cases`): the client must read the answer rather than a reset.
    let wd_big = vec![b'x'; 128 << 10];
    vec![
        (
            "malformed start",
            Method::POST,
            "/api/v1/jobs/new-1/start",
            api,
            json(b"{\"vm_path\":"),
            &[400],
        ),
        (
            "unknown start field",
            Method::POST,
            "/api/v1/jobs/new-1/start",
            api,
            json(br#"{"command":"/bin/sh"}"#),
            &[400],
        ),
        // These come from the harness, not from the victim's migratekit: refused before
        // the body is read (the body checks, 413 and 400, are tested from the job's own
        // process in vma-watchdog's tests/http_api.rs).
        (
            "oversized progress from another process",
            Method::POST,
            "/api/v1/progress/victim/update",
            None,
            Some(("application/json", wd_big)),
            &[403],
        ),
        (
            "malformed progress from another process",
            Method::POST,
            "/api/v1/progress/victim/update",
            None,
            json(b"[1,2"),
            &[403],
        ),
        (
            "forged failure from another process",
            Method::POST,
            "/api/v1/progress/victim/update",
            None,
            json(br#"{"stage":"Transfer","status":"failed","bytes_transferred":1,"throughput_bps":0}"#),
            &[403],
        ),
        ("no token", Method::GET, "/api/v1/jobs", None, None, &[401]),
        (
            "wrong token start",
            Method::POST,
            "/api/v1/jobs/new-2/start",
            Some("not-a-token-at-all-000"),
            json(b"{}"),
            &[401, 403],
        ),
        (
            "track a non-migratekit pid",
            Method::POST,
            "/api/v1/jobs/new-3/track",
            api,
            json(format!("{{\"pid\":{}}}", std::process::id()).as_bytes()),
            &[400, 403, 404, 409],
        ),
    ]
}

/// After the refused requests: no job was started, the victim's job did not move, no job was
/// added, and both daemons are up.
fn nothing_changed(sys: &System) -> Result<(), String> {
    for job in ["new-1", "new-2", "new-3"] {
        check(procs::migratekit_processes(job).is_empty(), || {
            format!("a refused request started {job}")
        })?;
    }
    let victim = sys.oma.job("victim").map_err(fail("reading the job"))?;
    check(victim.status == JobStatus::Replicating, || {
        format!("victim job moved to {:?}", victim.status)
    })?;
    let jobs = sys.oma.jobs().map_err(fail("listing jobs"))?;
    check(jobs.len() == 1, || {
        format!("{} jobs, expected 1", jobs.len())
    })?;
    sys.oma
        .client()
        .wait_healthy(Duration::from_secs(2))
        .map_err(fail("OMA health"))?;
    sys.watchdog
        .client()
        .wait_healthy(Duration::from_secs(2))
        .map_err(fail("watchdog health"))?;
    Ok(())
}
