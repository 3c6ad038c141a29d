//! Scenario 9: the attacks of a local unprivileged user of the VMA, against the whole system:
//! impostor migratekit processes claiming a live job, and forged progress (a `failed` report)
//! from other processes. Nothing may change; the real process's death is reported as usual.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api::ProcessIdentity;
use oma::model::{FailureClass, JobStatus};

use super::scenarios::{expect_final, started, system};
use super::{Run, RunOutcome, check, fail};
use crate::system::{PATIENCE, System};

/// The attacker's account, created when missing.
const ATTACKER: &str = "mkit-test-attacker";

/// Scenario 9: impostors and forged progress change nothing.
pub fn trust(run: &Run) -> RunOutcome {
    let (uid, gid) = test_support::ensure_user(ATTACKER).map_err(fail("the attacker's user"))?;
    let sys = system(run)?;
    let real = started(&sys, "victim", "")?;
    let audit_before = sys
        .oma
        .audit("victim")
        .map_err(fail("reading the audit"))?
        .len();
    // Created here rather than in `impostors` so that the directory, which holds the
    // impostors' copy of the stand-in, lives until the scenario ends.
    let public = tempfile::Builder::new()
        .prefix("trust-")
        .tempdir()
        .map_err(fail("a directory for the impostors"))?;
    impostors(&sys, (uid, gid), public.path())?;
    forged_progress(&sys, (uid, gid))?;
    nothing_changed(&sys, real, audit_before)?;
    // The real process's death is reported as usual.
    let (_, latency) = sys
        .kill_and_wait("victim", real, libc::SIGKILL)
        .map_err(fail("killing the real process"))?;
    expect_final(
        &sys,
        "victim",
        JobStatus::Failed,
        Some(FailureClass::ProcessKilled),
    )?;
    Ok(vec![latency])
}

/// Runs the impostors from `public` and waits until the watchdog has recognised them and
/// they have ended; `attacker` is the attacker's uid and gid.
fn impostors(sys: &System, attacker: (u32, u32), public: &Path) -> Result<(), String> {
    let copy = public_copy(public).map_err(fail("copying the stand-in"))?;
    // Impostors: a copy run by the attacker, the same copy run by root, and the real binary
    // run by the attacker, each claiming the live job. Each stays until the watchdog has
    // logged all three as impostors (the procfs detector sees them only at its periodic scan),
    // then exits 0: nothing assumes how fast the machine is.
    let standin = crate::bins::migratekit().map_err(fail("the stand-in binary"))?;
    let release = public.join("release");
    // The harness reaps migratekit zombies itself (`procs::reap_orphans`), so each impostor is
    // awaited by its pid leaving `/proc`, not by `wait`.
    let mut pids = Vec::new();
    for (program, as_user) in [
        (&copy, Some(attacker)),
        (&copy, None),
        (&standin, Some(attacker)),
    ] {
        let child = impostor(program, as_user, public, &release)
            .spawn()
            .map_err(fail("running an impostor"))?;
        pids.push(child.id());
    }
    let ignored = crate::http::wait_for(
        "three impostor_ignored lines in the watchdog's log",
        PATIENCE,
        Duration::from_millis(50),
        || (sys.watchdog.log().matches("impostor_ignored").count() >= 3).then_some(()),
    );
    std::fs::write(&release, b"").map_err(fail("releasing the impostors"))?;
    ignored.map_err(fail("the watchdog recognising the impostors"))?;
    let gone = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        pids.iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
    check(gone, || format!("the impostors {pids:?} did not end"))
}

/// Forged progress: a `failed` report from the attacker's process and from another root
/// process, each refused with 403.
fn forged_progress(sys: &System, attacker: (u32, u32)) -> Result<(), String> {
    let url = format!("{}/api/v1/progress/victim/update", sys.watchdog.url);
    for as_user in [Some(attacker), None] {
        let code = forge(&url, as_user).map_err(fail("posting forged progress"))?;
        check(code == "403", || {
            format!("forged progress as {as_user:?}: HTTP {code}, expected 403")
        })?;
    }
    Ok(())
}

/// After the attacks: the job still runs `real`, the audit trail past `audit_before` holds
/// recovery's own opinions only, the VM context is still held, and the watchdog logged the
/// refusals.
fn nothing_changed(sys: &System, real: ProcessIdentity, audit_before: usize) -> Result<(), String> {
    // Two poll intervals and more: had anything been believed, the OMA would have acted.
    std::thread::sleep(Duration::from_secs(2));
    let job = sys.oma.job("victim").map_err(fail("reading the job"))?;
    check(
        job.status == JobStatus::Replicating
            && job.pid == Some(i64::from(real.pid))
            && job.failure_class.is_none()
            && job.error_message.is_none(),
        || format!("the attacks changed the job: {job:?}"),
    )?;
    // Recovery's own periodic opinion (`recovery_keep`) may be written meanwhile; nothing else.
    let audit = sys.oma.audit("victim").map_err(fail("reading the audit"))?;
    let changed: Vec<_> = audit[audit_before..]
        .iter()
        .filter(|a| a.action != "recovery_keep" || a.to_status != JobStatus::Replicating)
        .collect();
    check(changed.is_empty(), || {
        format!("the attacks reached the audit trail: {changed:?}")
    })?;
    let context = sys
        .oma
        .context("ctx-victim")
        .map_err(fail("reading the context"))?;
    check(context.current_job_id.as_deref() == Some("victim"), || {
        format!("the VM context was released: {context:?}")
    })?;
    let log = sys.watchdog.log();
    check(log.matches("progress_refused").count() >= 2, || {
        "fewer than two progress_refused lines in the watchdog's log".into()
    })
}

/// A directory every user may enter, holding a copy of the stand-in named `migratekit`.
fn public_copy(root: &Path) -> std::io::Result<PathBuf> {
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
    let bin = root.join("migratekit");
    std::fs::copy(
        crate::bins::migratekit().map_err(std::io::Error::other)?,
        &bin,
    )?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

/// `program migrate --job-id victim`, as `user` (root when `None`), ending (exit 0) once
/// `release` exists.
fn impostor(program: &Path, user: Option<(u32, u32)>, cwd: &Path, release: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["migrate", "--job-id", "victim", "--standin-run-for", "0"])
        .arg("--standin-linger-until")
        .arg(release)
        .current_dir(cwd);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Posts a `failed` progress report to `url` with curl, as `user`; returns the HTTP status.
fn forge(url: &str, user: Option<(u32, u32)>) -> std::io::Result<String> {
    let body = r#"{"stage":"Transfer","status":"failed","bytes_transferred":1,"throughput_bps":0,"error_message":"forged"}"#;
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "content-type: application/json",
    ])
    .args(["--data", body, url]);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
