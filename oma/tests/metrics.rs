//! `/metrics` over a real socket after real requests: a death posted by a VMA, a duplicate,
//! a refused token, the startup recovery run; on SQLite and PostgreSQL.

mod common;

use common::vma::StandInVma;
use common::{OPERATOR, VMA1_TOKEN, eventually, settings, test_dbs};
use oma::auth::hash_token;
use serde_json::json;
use test_support::metrics::value;

/// Scrapes the OMA's `/metrics` at `addr`.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    response.text().await.unwrap()
}

#[tokio::test]
async fn a_killed_job_shows_in_jobs_transitions_events_and_requests() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let server = oma::server::start_with_metrics(settings(&db), api, Some(metrics))
            .await
            .unwrap();
        let store = &server.state.store;
        store
            .upsert_vma("vma-1", &vma.url, &hash_token(VMA1_TOKEN))
            .await
            .unwrap();
        let base = format!("http://{}", server.addr);
        let http = reqwest::Client::new();
        let job = json!({"id": "job-m", "vm_context_id": "ctx-m", "vm_name": "web01", "vma_id": "vma-1",
            "start": false});
        let created = http
            .post(format!("{base}/api/v1/jobs"))
            .bearer_auth(OPERATOR)
            .json(&job);
        assert_eq!(created.send().await.unwrap().status(), 201);
        let death = json!({"vma_id": "vma-1", "events": [{
            "event_id": uuid::Uuid::new_v4(), "kind": "process_exited", "job_id": "job-m",
            "process": {"pid": 4242, "start_time": 777},
            "exit": {"code": null, "signal": 9, "core_dumped": false, "oom_killed": false},
            "observed_at": chrono::Utc::now(), "detector": "ebpf"}]});
        // The same batch twice: the second is a redelivery, applied once.
        for _ in 0..2 {
            let post = http
                .post(format!("{base}/api/v1/watchdog/events"))
                .bearer_auth(VMA1_TOKEN)
                .json(&death);
            assert_eq!(post.send().await.unwrap().status(), 200);
        }
        let anonymous = http
            .get(format!("{base}/api/v1/jobs"))
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), 401);
        let page = eventually(10, "the startup recovery run counted", || async {
            let page = scrape(metrics_addr).await;
            value(
                &page,
                r#"oma_recovery_runs_total{trigger="startup",result="ok"}"#,
            )
            .map(|_| page)
        })
        .await;
        let backend = db.backend;
        let expect = [
            (r#"oma_jobs{status="failed"}"#.to_owned(), 1.0),
            (r#"oma_jobs{status="pending"}"#.to_owned(), 0.0),
            (
                r#"oma_transitions_total{to="failed",failure_class="process_killed",actor="watchdog_event"}"#.to_owned(),
                1.0,
            ),
            (r#"oma_watchdog_events_total{result="duplicate"}"#.to_owned(), 1.0),
            ("oma_intake_commit_duration_seconds_count".to_owned(), 2.0),
            (r#"oma_auth_failures_total{reason="missing_token"}"#.to_owned(), 1.0),
            (
                r#"oma_http_requests_total{route="/api/v1/watchdog/events",status="200"}"#.to_owned(),
                2.0,
            ),
            (r#"oma_http_requests_total{route="/api/v1/jobs",status="401"}"#.to_owned(), 1.0),
            ("oma_stalled_jobs".to_owned(), 0.0),
            ("oma_oldest_active_progress_age_seconds".to_owned(), 0.0),
            ("oma_recovery_interval_seconds".to_owned(), 3600.0),
        ];
        for (series, want) in expect {
            assert_eq!(
                value(&page, &series),
                Some(want),
                "{backend}: {series}\n{page}"
            );
        }
        let applied = value(&page, r#"oma_watchdog_events_total{result="applied"}"#);
        assert_eq!(applied, Some(1.0), "{backend}\n{page}");
        let contact = value(
            &page,
            r#"oma_vma_last_contact_timestamp_seconds{vma="vma-1"}"#,
        );
        let now = chrono::Utc::now().timestamp() as f64;
        assert!(contact.is_some_and(|t| (now - t).abs() < 60.0), "{page}");
        let build = format!(
            r#"oma_build_info{{version="{}",backend="{}"}}"#,
            env!("CARGO_PKG_VERSION"),
            if backend == "sqlite" {
                "sqlite"
            } else {
                "postgres"
            }
        );
        assert_eq!(value(&page, &build), Some(1.0), "{page}");
        assert!(value(&page, r#"oma_db_pool_connections{state="idle"}"#).is_some());
        server.shutdown().await;
    }
}
