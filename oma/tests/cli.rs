//! The `job-recovery` binary against a running OMA on a real socket.

mod common;

use common::vma::StandInVma;
use common::{OPERATOR, VMA1_TOKEN, dead_url, settings, start_server, test_dbs};
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
    let db = test_dbs().await.remove(0);
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
