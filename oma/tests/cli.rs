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
