//! The `job-recovery` binary against a running OMA on a real socket.

mod common;

use common::vma::{StandInVma, StartMode, pid};
use common::{OPERATOR, VMA1_TOKEN, dead_url, settings, start_server};
use oma::auth::hash_token;
use oma::store::NewJob;
use std::process::Output;

async fn cli(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_job-recovery"));
    cmd.env_remove("OMA_TOKEN")
        .env_remove("OMA_URL")
        .env_remove("OMA_TOKEN_FILE");
    cmd.arg("--oma-url").arg(url);
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    cmd.args(args).output().await.expect("run job-recovery")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn scan_recover_and_status_against_a_running_server() {
    let (_db, _vma, server) = server_with_a_lost_job().await;
    let store = &server.state.store;
    let url = format!("http://{}", server.addr);

    // scan: the job the VMA never heard of, as a table.
    let out = cli(&url, Some(OPERATOR), &["scan"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("lost-job") && table.contains("job_lost") && table.starts_with("JOB"),
        "{table}"
    );

    // recover --dry-run --json: parseable, changes nothing.
    let out = cli(&url, Some(OPERATOR), &["recover", "--dry-run", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["run"]["dry_run"], true);
    assert_eq!(report["decisions"][0]["failure_class"], "job_lost");
    assert!(
        store
            .get_job("lost-job")
            .await
            .unwrap()
            .job
            .status
            .is_active()
    );

    // recover: applied.
    let out = cli(&url, Some(OPERATOR), &["recover"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("real run: examined 1"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        store
            .get_job("lost-job")
            .await
            .unwrap()
            .job
            .status
            .is_final()
    );

    // status, as JSON and as a table.
    let out = cli(&url, Some(OPERATOR), &["status", "--json"]).await;
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["jobs_by_status"]["failed"], 1);
    assert!(status["last_runs"].as_array().unwrap().len() >= 2);
    let out = cli(&url, Some(OPERATOR), &["status"]).await;
    assert!(
        text(&out.stdout).contains("active jobs: 0"),
        "{}",
        text(&out.stdout)
    );

    // Failures: non-zero exit and one line that says why.
    for (token, url, expect) in [
        (Some("not-a-token"), url.clone(), "401"),
        (Some(VMA1_TOKEN), url.clone(), "403"),
        (None, url.clone(), "no operator token"),
        (Some(OPERATOR), dead_url().await, "cannot reach the OMA"),
    ] {
        let out = cli(&url, token, &["status"]).await;
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{expect}: exit status 0");
        assert!(
            err.contains(expect) && err.trim().lines().count() == 1,
            "{expect}: {err}"
        );
        assert!(!err.contains(OPERATOR) && !err.contains(VMA1_TOKEN));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn register_a_vma_create_jobs_and_list_them() {
    let db = common::sqlite_db();
    let vma = StandInVma::start().await;
    vma.set_start(StartMode::Run(pid(4242, 777)));
    let server = start_server(settings(&db)).await;
    let url = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vma.token");
    std::fs::write(&token_file, format!("{VMA1_TOKEN}\n")).unwrap();
    let token_path = token_file.display().to_string();

    let out = cli(
        &url,
        Some(OPERATOR),
        &[
            "register-vma",
            "vma-1",
            "--base-url",
            &vma.url,
            "--vma-token-file",
            &token_path,
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(VMA1_TOKEN));

    // create: started on the VMA with the given parameters.
    let out = cli(
        &url,
        Some(OPERATOR),
        &[
            "create",
            "--id",
            "demo-1",
            "--vm-context",
            "ctx-demo",
            "--vm-name",
            "web01",
            "--vma",
            "vma-1",
            "--vm-path",
            "/DC/vm/web01",
            "--param",
            "disk=2000",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (job["status"].as_str(), job["pid"].as_i64()),
        (Some("replicating"), Some(4242))
    );
    let (_, _, request) = &vma.starts()[0];
    assert_eq!(request.vm_path.as_deref(), Some("/DC/vm/web01"));
    assert_eq!(
        request.parameters.get("disk").map(String::as_str),
        Some("2000")
    );

    // create refused by the VMA: non-zero exit, one line naming the job.
    vma.set_start(StartMode::Refuse);
    let out = cli(
        &url,
        Some(OPERATOR),
        &[
            "create",
            "--id",
            "demo-2",
            "--vm-context",
            "ctx-2",
            "--vm-name",
            "db01",
            "--vma",
            "vma-1",
        ],
    )
    .await;
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("demo-2") && err.contains("502") && err.trim().lines().count() == 1,
        "{err}"
    );

    // --no-start only records it.
    let out = cli(
        &url,
        Some(OPERATOR),
        &[
            "create",
            "--id",
            "demo-3",
            "--vm-context",
            "ctx-3",
            "--vm-name",
            "app01",
            "--vma",
            "vma-1",
            "--no-start",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("demo-3 on vma-1 (ctx-3): pending"),
        "{}",
        text(&out.stdout)
    );

    // jobs: a table and JSON, filtered.
    let out = cli(&url, Some(OPERATOR), &["jobs"]).await;
    let table = text(&out.stdout);
    assert!(
        table.starts_with("JOB") && table.lines().count() == 4,
        "{table}"
    );
    assert!(
        table.contains("start_refused") && table.contains("4242"),
        "{table}"
    );
    let out = cli(
        &url,
        Some(OPERATOR),
        &["jobs", "--status", "replicating", "--json"],
    )
    .await;
    let jobs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], "demo-1");
    let out = cli(&url, Some(OPERATOR), &["jobs", "--status", "sleeping"]).await;
    assert!(!out.status.success());
    server.shutdown().await;
}

/// Runs `job-recovery` with exactly `args` (no options added) and no OMA_* environment.
async fn raw(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_job-recovery"))
        .env_remove("OMA_TOKEN")
        .env_remove("OMA_URL")
        .env_remove("OMA_TOKEN_FILE")
        .args(args)
        .output()
        .await
        .expect("run job-recovery")
}

/// A running OMA with one job its VMA has never heard of, so that recovery has a decision to
/// show and to apply. Each call builds the same state, so two of them answer alike.
async fn server_with_a_lost_job() -> (common::TestDb, StandInVma, oma::server::RunningServer) {
    let db = common::sqlite_db();
    let vma = StandInVma::start().await;
    let server = start_server(settings(&db)).await;
    let store = &server.state.store;
    store
        .upsert_vma("vma-1", &vma.url, &hash_token(VMA1_TOKEN))
        .await
        .unwrap();
    let new = NewJob {
        id: Some("lost-job".into()),
        vm_context_id: "ctx-1".into(),
        vm_name: Some("vm".into()),
        vma_id: "vma-1".into(),
        sync_type: None,
    };
    store.create_job(&new).await.unwrap();
    (db, vma, server)
}

/// The output without what differs between two calls in the same state: the status table's
/// poller line (its counters move) and the start times of recovery runs (the two OMAs ran
/// theirs a few milliseconds apart).
fn comparable(out: &Output) -> String {
    text(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("poller:"))
        .map(|l| match l.trim_start().split_once(' ') {
            Some((time, rest)) if l.starts_with("  ") && time.contains("T") => {
                format!("  <time> {rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect()
}

/// The runbooks' command lines: each does what its subcommand does (same stdout, same exit
/// status, same effect on the job), and says once on stderr what the new form is. The seed
/// forms run against one OMA, the subcommands against another in the same state, so that the
/// real recovery can be compared too.
#[tokio::test]
async fn the_seed_command_lines_do_what_their_subcommands_do() {
    let (_db_old, _vma_old, old) = server_with_a_lost_job().await;
    let (_db_new, _vma_new, new) = server_with_a_lost_job().await;
    let old_url = format!("http://{}", old.addr);
    let new_url = format!("http://{}", new.addr);
    for (seed, subcommand, hint) in [
        (
            &["-action=scan"][..],
            &["scan"][..],
            "'-action=scan' is the old syntax; use 'job-recovery scan'",
        ),
        (
            &["-action=recover", "-dry-run=true"],
            &["recover", "--dry-run"],
            "'-action=recover -dry-run=true' is the old syntax; use 'job-recovery recover \
             --dry-run'",
        ),
        (
            &["-action=recover"],
            &["recover"],
            "'-action=recover' is the old syntax; use 'job-recovery recover'",
        ),
        (
            &["--action", "status"],
            &["status"],
            "'--action status' is the old syntax; use 'job-recovery status'",
        ),
    ] {
        let was = cli(&old_url, Some(OPERATOR), seed).await;
        let is = cli(&new_url, Some(OPERATOR), subcommand).await;
        assert_eq!(
            was.status.code(),
            Some(0),
            "{seed:?}: {}",
            text(&was.stderr)
        );
        assert_eq!(is.status.code(), Some(0), "{subcommand:?}");
        assert_eq!(
            comparable(&was),
            comparable(&is),
            "{seed:?} vs {subcommand:?}"
        );
        assert_eq!(text(&was.stderr), format!("job-recovery: {hint}\n"));
        assert_eq!(text(&is.stderr), "");
        let (a, b) = (
            old.state.store.get_job("lost-job").await.unwrap().job,
            new.state.store.get_job("lost-job").await.unwrap().job,
        );
        assert_eq!(
            (a.status, a.failure_class),
            (b.status, b.failure_class),
            "{seed:?}"
        );
    }
    // The real run did apply: the lost job failed on both sides.
    let job = old.state.store.get_job("lost-job").await.unwrap().job;
    assert!(job.status.is_final(), "{:?}", job.status);

    // On one OMA, the two forms of status print the same table.
    let was = cli(&old_url, Some(OPERATOR), &["-action=status"]).await;
    let is = cli(&old_url, Some(OPERATOR), &["status"]).await;
    assert_eq!(comparable(&was), comparable(&is));
    assert!(comparable(&is).contains("active jobs: 0"));
    old.shutdown().await;
    new.shutdown().await;
}

/// The global options in Go's spelling, a failure's exit status, and the refusals (exit 2,
/// one line naming the flag, nothing sent to the OMA).
#[tokio::test]
async fn the_seed_syntax_takes_go_spelled_options_and_refuses_what_it_cannot_mean() {
    let (_db, _vma, server) = server_with_a_lost_job().await;
    let url = format!("http://{}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("operator.token");
    std::fs::write(&token_file, format!("{OPERATOR}\n")).unwrap();
    let token_path = token_file.display().to_string();

    let oma_url = format!("-oma-url={url}");
    let token_file_flag = format!("-token-file={token_path}");
    let out = raw(&[&oma_url, &token_file_flag, "-action=scan", "-json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let orphans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(orphans[0]["job_id"], "lost-job");
    let err = text(&out.stderr);
    assert!(
        err.trim().lines().count() == 1
            && err.contains(
                "use 'job-recovery scan' (options take two dashes: --oma-url, \
                             --token-file, --json)"
            ),
        "{err}"
    );
    let out = raw(&["-oma-url", &url, "-token", OPERATOR, "-action", "status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(OPERATOR));

    // A failure exits as the subcommand's does: 1, with its reason after the hint.
    let was = cli(&url, Some("not-a-token"), &["-action=status"]).await;
    let is = cli(&url, Some("not-a-token"), &["status"]).await;
    assert_eq!(was.status.code(), is.status.code());
    assert_eq!(was.status.code(), Some(1));
    let err = text(&was.stderr);
    assert!(
        err.lines().count() == 2 && err.ends_with(&text(&is.stderr)),
        "{err}"
    );

    for (args, expect) in [
        (
            &["-action=scan", "-max-age=60"][..],
            "-max-age is not supported",
        ),
        (&["-action=recover", "-max-age", "60"], "never on age alone"),
        (&["-action=scan", "-verbose"], "unknown flag '-verbose'"),
        (&["-action=purge"], "unknown -action 'purge'"),
        (&["-action=recover", "-dry-run", "false"], "-dry-run=false"),
    ] {
        let out = cli(&url, Some(OPERATOR), args).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expect) && err.trim().lines().count() == 1,
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty());
    }
    // Nothing was run by the refusals: the job is still active.
    let job = server.state.store.get_job("lost-job").await.unwrap().job;
    assert!(job.status.is_active());
    server.shutdown().await;
}
