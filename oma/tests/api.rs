//! The REST API over a real socket: auth (401/403), bad input (400/404/409/413), the job and
//! watchdog flows, the OpenAPI document and health, on SQLite and PostgreSQL.

mod common;

use api::{ErrorBody, EventBatchAck};
use common::vma::StandInVma;
use common::{OPERATOR, VMA1_TOKEN, VMA2_TOKEN, settings, start_server, test_dbs};
use oma::auth::hash_token;
use oma::model::{Job, VmContext};
use reqwest::StatusCode;
use serde_json::json;

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }
}

async fn error(resp: reqwest::Response, status: StatusCode) -> ErrorBody {
    assert_eq!(resp.status(), status);
    resp.json().await.unwrap()
}

fn death(job: &str, signal: i32) -> serde_json::Value {
    json!({
        "event_id": uuid::Uuid::new_v4(), "kind": "process_exited", "job_id": job,
        "process": {"pid": 4242, "start_time": 777},
        "exit": {"code": null, "signal": signal, "core_dumped": false, "oom_killed": false},
        "observed_at": chrono::Utc::now(), "detector": "ebpf"
    })
}

#[tokio::test]
async fn jobs_contexts_and_watchdog_events_over_http() {
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        let server = start_server(settings(&db)).await;
        let store = &server.state.store;
        store
            .upsert_vma("vma-1", &vma.url, &hash_token(VMA1_TOKEN))
            .await
            .unwrap();
        store
            .upsert_vma("vma-2", &vma.url, &hash_token(VMA2_TOKEN))
            .await
            .unwrap();
        let c = Client {
            http: reqwest::Client::new(),
            base: format!("http://{}", server.addr),
        };
        use reqwest::Method as M;

        // Health needs no token.
        let health = c.send(M::GET, "/health", None, None).await;
        assert_eq!(health.status(), StatusCode::OK);

        // 401 without or with a wrong token, 403 with the wrong role; nothing leaked.
        let e = error(
            c.send(M::GET, "/api/v1/jobs", None, None).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert_eq!(e.error, "unauthorized");
        error(
            c.send(M::GET, "/api/v1/jobs", Some("wrong-token"), None)
                .await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        let e = error(
            c.send(M::GET, "/api/v1/jobs", Some(VMA1_TOKEN), None).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(!e.message.contains(VMA1_TOKEN));
        let empty = json!({"vma_id": "vma-1", "events": []});
        error(
            c.send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(OPERATOR),
                Some(empty.clone()),
            )
            .await,
            StatusCode::FORBIDDEN,
        )
        .await;
        error(
            c.send(M::POST, "/api/v1/watchdog/events", None, Some(empty))
                .await,
            StatusCode::UNAUTHORIZED,
        )
        .await;

        // Create a job; 400 names unknown fields and malformed bodies.
        let body = json!({"id": "job-1", "vm_context_id": "ctx-1", "vm_name": "web01", "vma_id": "vma-1",
                   "start": false});
        let resp = c
            .send(M::POST, "/api/v1/jobs", Some(OPERATOR), Some(body.clone()))
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{}", db.backend);
        let job: Job = resp.json().await.unwrap();
        assert_eq!(job.status.as_str(), "pending");
        let e = error(
            c.send(
                M::POST,
                "/api/v1/jobs",
                Some(OPERATOR),
                Some(json!({"vm_context_id": "x", "vma_id": "vma-1", "colour": "red"})),
            )
            .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = error(
            c.send(
                M::POST,
                "/api/v1/jobs",
                Some(OPERATOR),
                Some(json!({"vma_id": "vma-1"})),
            )
            .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(e.message.contains("vm_context_id"), "{}", e.message);
        let raw = c
            .http
            .post(c.url("/api/v1/jobs"))
            .bearer_auth(OPERATOR)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        error(raw, StatusCode::BAD_REQUEST).await;
        let e = error(
            c.send(M::GET, "/api/v1/jobs?status=sleeping", Some(OPERATOR), None)
                .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(
            e.message.contains("sleeping") || e.message.contains("status"),
            "{}",
            e.message
        );
        // 409: the context is held; 404: unknown job.
        let e = error(
            c.send(
                M::POST,
                "/api/v1/jobs",
                Some(OPERATOR),
                Some(json!({"id": "job-2", "vm_context_id": "ctx-1", "vma_id": "vma-1", "start": false})),
            )
            .await,
            StatusCode::CONFLICT,
        )
        .await;
        assert_eq!(e.error, "vm_context_busy");
        error(
            c.send(M::GET, "/api/v1/jobs/nope", Some(OPERATOR), None)
                .await,
            StatusCode::NOT_FOUND,
        )
        .await;
        error(
            c.send(M::GET, "/api/v1/jobs/nope/audit", Some(OPERATOR), None)
                .await,
            StatusCode::NOT_FOUND,
        )
        .await;
        error(
            c.send(
                M::POST,
                "/api/v1/jobs/nope/cancel",
                Some(OPERATOR),
                Some(json!({})),
            )
            .await,
            StatusCode::NOT_FOUND,
        )
        .await;
        error(
            c.send(M::GET, "/api/v1/vm-contexts/nope", Some(OPERATOR), None)
                .await,
            StatusCode::NOT_FOUND,
        )
        .await;

        // A VMA may only report on its own jobs, and only under its own id.
        let batch = json!({"vma_id": "vma-2", "events": [death("job-1", 9)]});
        error(
            c.send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(VMA2_TOKEN),
                Some(batch.clone()),
            )
            .await,
            StatusCode::FORBIDDEN,
        )
        .await;
        error(
            c.send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(VMA1_TOKEN),
                Some(batch),
            )
            .await,
            StatusCode::FORBIDDEN,
        )
        .await;
        let e = error(
            c.send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(VMA1_TOKEN),
                Some(json!({"vma_id": "vma-1", "events": [{"bogus": 1}]})),
            )
            .await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(e.message.contains("bogus"), "{}", e.message);

        // The death arrives twice: one transition, two acknowledgements.
        let batch = json!({"vma_id": "vma-1", "events": [death("job-1", 9)]});
        for expected_applied in [1, 0] {
            let resp = c
                .send(
                    M::POST,
                    "/api/v1/watchdog/events",
                    Some(VMA1_TOKEN),
                    Some(batch.clone()),
                )
                .await;
            assert_eq!(resp.status(), StatusCode::OK);
            let ack: EventBatchAck = resp.json().await.unwrap();
            assert_eq!((ack.acknowledged.len(), ack.applied), (1, expected_applied));
        }
        let job: Job = c
            .send(M::GET, "/api/v1/jobs/job-1", Some(OPERATOR), None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            (job.status.as_str(), job.failure_class.map(|c| c.as_str())),
            ("failed", Some("process_killed"))
        );
        let ctx: VmContext = c
            .send(M::GET, "/api/v1/vm-contexts/ctx-1", Some(OPERATOR), None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            (ctx.current_job_id, ctx.current_status.as_str()),
            (None, "ready_for_failover")
        );
        let audit: Vec<serde_json::Value> = c
            .send(M::GET, "/api/v1/jobs/job-1/audit", Some(OPERATOR), None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(audit.last().unwrap()["evidence"]["exit"]["signal"], 9);

        // 409 with the current state when cancelling a final job; cancel works on an active one.
        let e = error(
            c.send(
                M::POST,
                "/api/v1/jobs/job-1/cancel",
                Some(OPERATOR),
                Some(json!({})),
            )
            .await,
            StatusCode::CONFLICT,
        )
        .await;
        assert!(e.message.contains("failed"), "{}", e.message);
        let body =
            json!({"id": "job-3", "vm_context_id": "ctx-1", "vma_id": "vma-1", "start": false});
        assert_eq!(
            c.send(M::POST, "/api/v1/jobs", Some(OPERATOR), Some(body))
                .await
                .status(),
            StatusCode::CREATED
        );
        let resp = c
            .send(
                M::POST,
                "/api/v1/jobs/job-3/cancel",
                Some(OPERATOR),
                Some(json!({"reason": "test"})),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let list: Vec<Job> = c
            .send(
                M::GET,
                "/api/v1/jobs?status=cancelled&vm_context_id=ctx-1",
                Some(OPERATOR),
                None,
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(list.len(), 1);

        // 413 over the body limit.
        let huge = "x".repeat(oma::BODY_LIMIT + 10);
        let resp = c
            .http
            .post(c.url("/api/v1/watchdog/events"))
            .bearer_auth(VMA1_TOKEN)
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .unwrap();
        error(resp, StatusCode::PAYLOAD_TOO_LARGE).await;

        // The OpenAPI document describes the endpoints.
        let doc: serde_json::Value = c
            .send(M::GET, "/api/v1/openapi.json", Some(OPERATOR), None)
            .await
            .json()
            .await
            .unwrap();
        for path in [
            "/api/v1/jobs",
            "/api/v1/watchdog/events",
            "/api/v1/recovery/run",
            "/health",
        ] {
            assert!(
                doc["paths"].get(path).is_some(),
                "{path} missing from OpenAPI"
            );
        }
        server.shutdown().await;
    }
}

/// VMA tokens are looked up from memory once known; replacing a VMA's token through the API
/// still stops the old one at once.
#[tokio::test]
async fn a_replaced_vma_token_stops_working_at_once() {
    use reqwest::Method as M;
    const NEW_TOKEN: &str = "vma-1-replacement-token-0123";
    for db in test_dbs().await {
        let vma = StandInVma::start().await;
        let server = start_server(settings(&db)).await;
        let c = Client {
            http: reqwest::Client::new(),
            base: format!("http://{}", server.addr),
        };
        let register = |token: &str| {
            let body = json!({"base_url": vma.url, "token": token});
            c.send(M::PUT, "/api/v1/vmas/vma-1", Some(OPERATOR), Some(body))
        };
        assert_eq!(register(VMA1_TOKEN).await.status(), StatusCode::OK);
        let empty = json!({"vma_id": "vma-1", "events": []});
        let post = |token: &'static str| {
            c.send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(token),
                Some(empty.clone()),
            )
        };
        // Twice: the second answer comes from memory.
        for _ in 0..2 {
            assert_eq!(
                post(VMA1_TOKEN).await.status(),
                StatusCode::OK,
                "{}",
                db.backend
            );
        }
        assert_eq!(register(NEW_TOKEN).await.status(), StatusCode::OK);
        assert_eq!(
            post(VMA1_TOKEN).await.status(),
            StatusCode::UNAUTHORIZED,
            "{}",
            db.backend
        );
        assert_eq!(
            post(NEW_TOKEN).await.status(),
            StatusCode::OK,
            "{}",
            db.backend
        );
    }
}
