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

/// A server with two VMAs registered, and a client of it.
struct Api {
    server: oma::server::RunningServer,
    c: Client,
    _vma: StandInVma,
}

impl Api {
    async fn start(db: &common::TestDb) -> Self {
        let vma = StandInVma::start().await;
        let server = start_server(settings(db)).await;
        for (id, token) in [("vma-1", VMA1_TOKEN), ("vma-2", VMA2_TOKEN)] {
            let store = &server.state.store;
            store
                .upsert_vma(id, &vma.url, &hash_token(token))
                .await
                .unwrap();
        }
        let c = Client {
            http: reqwest::Client::new(),
            base: format!("http://{}", server.addr),
        };
        Self {
            server,
            c,
            _vma: vma,
        }
    }

    /// Records `id` (not started) on context `ctx`; 201 expected.
    async fn record_job(&self, id: &str, ctx: &str) {
        let body = json!({"id": id, "vm_context_id": ctx, "vm_name": "web01", "vma_id": "vma-1",
            "start": false});
        let resp = self
            .c
            .send(M::POST, "/api/v1/jobs", Some(OPERATOR), Some(body))
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED);
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let resp = self.c.send(M::GET, path, Some(OPERATOR), None).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        resp.json().await.unwrap()
    }
}

use reqwest::Method as M;

#[tokio::test]
async fn tokens_are_required_and_each_role_keeps_to_its_routes() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
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
        let wrong = c
            .send(M::GET, "/api/v1/jobs", Some("wrong-token"), None)
            .await;
        error(wrong, StatusCode::UNAUTHORIZED).await;
        let vma = c.send(M::GET, "/api/v1/jobs", Some(VMA1_TOKEN), None).await;
        let e = error(vma, StatusCode::FORBIDDEN).await;
        assert!(!e.message.contains(VMA1_TOKEN));
        let empty = json!({"vma_id": "vma-1", "events": []});
        let operator = c
            .send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(OPERATOR),
                Some(empty.clone()),
            )
            .await;
        error(operator, StatusCode::FORBIDDEN).await;
        let anonymous = c
            .send(M::POST, "/api/v1/watchdog/events", None, Some(empty))
            .await;
        error(anonymous, StatusCode::UNAUTHORIZED).await;
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_what_was_wrong() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
        let post = |body| c.send(M::POST, "/api/v1/jobs", Some(OPERATOR), Some(body));
        let colour = json!({"vm_context_id": "x", "vma_id": "vma-1", "colour": "red"});
        let e = error(post(colour).await, StatusCode::BAD_REQUEST).await;
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = error(
            post(json!({"vma_id": "vma-1"})).await,
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
        let filter = c
            .send(M::GET, "/api/v1/jobs?status=sleeping", Some(OPERATOR), None)
            .await;
        let e = error(filter, StatusCode::BAD_REQUEST).await;
        assert!(
            e.message.contains("sleeping") || e.message.contains("status"),
            "{}",
            e.message
        );
        let events = json!({"vma_id": "vma-1", "events": [{"bogus": 1}]});
        let resp = c
            .send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(VMA1_TOKEN),
                Some(events),
            )
            .await;
        let e = error(resp, StatusCode::BAD_REQUEST).await;
        assert!(e.message.contains("bogus"), "{}", e.message);
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
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn a_held_context_is_409_and_unknown_things_are_404() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
        api.record_job("job-1", "ctx-1").await;
        let job: Job = api.get("/api/v1/jobs/job-1").await;
        assert_eq!(job.status.as_str(), "pending", "{}", db.backend);
        let second =
            json!({"id": "job-2", "vm_context_id": "ctx-1", "vma_id": "vma-1", "start": false});
        let resp = c
            .send(M::POST, "/api/v1/jobs", Some(OPERATOR), Some(second))
            .await;
        assert_eq!(
            error(resp, StatusCode::CONFLICT).await.error,
            "vm_context_busy"
        );
        for path in [
            "/api/v1/jobs/nope",
            "/api/v1/jobs/nope/audit",
            "/api/v1/vm-contexts/nope",
        ] {
            let resp = c.send(M::GET, path, Some(OPERATOR), None).await;
            error(resp, StatusCode::NOT_FOUND).await;
        }
        let cancel = c
            .send(
                M::POST,
                "/api/v1/jobs/nope/cancel",
                Some(OPERATOR),
                Some(json!({})),
            )
            .await;
        error(cancel, StatusCode::NOT_FOUND).await;
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn a_vma_reports_only_on_its_own_jobs_and_under_its_own_id() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
        api.record_job("job-1", "ctx-1").await;
        let batch = json!({"vma_id": "vma-2", "events": [death("job-1", 9)]});
        for token in [VMA2_TOKEN, VMA1_TOKEN] {
            let resp = c
                .send(
                    M::POST,
                    "/api/v1/watchdog/events",
                    Some(token),
                    Some(batch.clone()),
                )
                .await;
            error(resp, StatusCode::FORBIDDEN).await;
        }
        let job: Job = api.get("/api/v1/jobs/job-1").await;
        assert_eq!(job.status.as_str(), "pending", "{}", db.backend);
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn an_event_with_a_start_time_or_pid_out_of_range_is_400_naming_the_field() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
        api.record_job("job-r", "ctx-r").await;
        // 2^63 does not fit the OMA's i64 column; pid 0 and 4194305 are no Linux pid.
        let cases = [
            ("start_time", json!(1u64 << 63), "2^63 - 1"),
            ("pid", json!(0), "4194304"),
            ("pid", json!(4_194_305), "4194304"),
        ];
        for (field, value, rule) in cases {
            let mut event = death("job-r", 9);
            event["process"][field] = value;
            let batch = json!({"vma_id": "vma-1", "events": [death("job-r", 15), event]});
            let resp = c
                .send(
                    M::POST,
                    "/api/v1/watchdog/events",
                    Some(VMA1_TOKEN),
                    Some(batch),
                )
                .await;
            let e = error(resp, StatusCode::BAD_REQUEST).await;
            assert!(
                e.message.contains(&format!("`events[1].process.{field}`"))
                    && e.message.contains(rule),
                "{field}: {}",
                e.message
            );
        }
        // Nothing of a refused batch was applied, not even its valid first event.
        let job: Job = api.get("/api/v1/jobs/job-r").await;
        assert!(!job.status.is_final(), "{job:?}");
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn a_last_progress_out_of_range_is_dropped_and_the_death_applied() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
        api.record_job("job-p", "ctx-p").await;
        let mut event = death("job-p", 9);
        event["last_progress"] = json!({"job_id": "job-p", "sequence": 3,
            "received_at": chrono::Utc::now(),
            "update": {"stage": "Transfer", "status": "completed", "bytes_transferred": 10,
                "throughput_bps": 1, "percent": -50.0}});
        let batch = json!({"vma_id": "vma-1", "events": [event]});
        let resp = c
            .send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(VMA1_TOKEN),
                Some(batch),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let ack: EventBatchAck = resp.json().await.unwrap();
        assert_eq!((ack.acknowledged.len(), ack.applied), (1, 1));
        // The death decides, not the dropped `completed` report.
        let job: Job = api.get("/api/v1/jobs/job-p").await;
        assert_eq!(job.status.as_str(), "failed", "{job:?}");
        assert!(job.progress_percent >= 0.0, "{job:?}");
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn a_death_delivered_twice_is_one_transition_and_frees_the_context() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
        api.record_job("job-1", "ctx-1").await;
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
        let job: Job = api.get("/api/v1/jobs/job-1").await;
        assert_eq!(
            (job.status.as_str(), job.failure_class.map(|c| c.as_str())),
            ("failed", Some("process_killed")),
            "{}",
            db.backend
        );
        let ctx: VmContext = api.get("/api/v1/vm-contexts/ctx-1").await;
        assert_eq!(
            (ctx.current_job_id, ctx.current_status.as_str()),
            (None, "ready_for_failover")
        );
        let audit: Vec<serde_json::Value> = api.get("/api/v1/jobs/job-1/audit").await;
        assert_eq!(audit.last().unwrap()["evidence"]["exit"]["signal"], 9);
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn cancel_ends_an_active_job_and_a_final_one_is_409_with_its_status() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let c = &api.c;
        api.record_job("job-3", "ctx-1").await;
        let cancel = |job: &'static str| {
            let path = format!("/api/v1/jobs/{job}/cancel");
            async move {
                c.send(
                    M::POST,
                    &path,
                    Some(OPERATOR),
                    Some(json!({"reason": "test"})),
                )
                .await
            }
        };
        assert_eq!(
            cancel("job-3").await.status(),
            StatusCode::OK,
            "{}",
            db.backend
        );
        let list: Vec<Job> = api
            .get("/api/v1/jobs?status=cancelled&vm_context_id=ctx-1")
            .await;
        assert_eq!(list.len(), 1);
        let e = error(cancel("job-3").await, StatusCode::CONFLICT).await;
        assert!(e.message.contains("cancelled"), "{}", e.message);
        api.server.shutdown().await;
    }
}

#[tokio::test]
async fn the_openapi_document_describes_the_endpoints() {
    let db = common::sqlite_db();
    let api = Api::start(&db).await;
    let doc: serde_json::Value = api.get("/api/v1/openapi.json").await;
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
    // What is served is what `docs/openapi/oma.json` holds (tests/openapi_doc.rs).
    let committed: serde_json::Value =
        serde_json::from_str(&oma::routes::openapi::document_json()).unwrap();
    assert_eq!(doc, committed);
    api.server.shutdown().await;
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

/// Serde reads a struct from a JSON array too (`[]` is a run request with every default);
/// the document allows objects only, and so does the server now.
#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_400() {
    let db = common::sqlite_db();
    let api = Api::start(&db).await;
    api.record_job("job-1", "ctx-1").await;
    for (path, body) in [
        ("/api/v1/recovery/run", json!([])),
        ("/api/v1/recovery/run", json!([true])),
        ("/api/v1/jobs/job-1/cancel", json!([])),
        ("/api/v1/jobs", json!(["job-2", "ctx-2", "web02", "vma-1"])),
    ] {
        let resp = api.c.send(M::POST, path, Some(OPERATOR), Some(body)).await;
        let e = error(resp, StatusCode::BAD_REQUEST).await;
        assert!(e.message.contains("JSON object"), "{path}: {}", e.message);
    }
    let job: Job = api.get("/api/v1/jobs/job-1").await;
    assert_eq!(
        job.status.as_str(),
        "pending",
        "the array did not cancel it"
    );
    api.server.shutdown().await;
}

/// `limit` and `offset` were clamped silently; the document states their ranges and the
/// server refuses what is outside them, naming the parameter.
#[tokio::test]
async fn job_list_limit_and_offset_out_of_range_are_400_naming_the_parameter() {
    let db = common::sqlite_db();
    let api = Api::start(&db).await;
    api.record_job("job-1", "ctx-1").await;
    for (query, parameter) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-5", "limit"),
        ("offset=-1", "offset"),
    ] {
        let resp = api
            .c
            .send(
                M::GET,
                &format!("/api/v1/jobs?{query}"),
                Some(OPERATOR),
                None,
            )
            .await;
        let e = error(resp, StatusCode::BAD_REQUEST).await;
        assert!(e.message.contains(parameter), "{query}: {}", e.message);
    }
    let jobs: Vec<Job> = api.get("/api/v1/jobs?limit=1000&offset=0").await;
    assert_eq!(jobs.len(), 1);
    let jobs: Vec<Job> = api.get("/api/v1/jobs?limit=1&offset=1").await;
    assert!(jobs.is_empty());
    api.server.shutdown().await;
}

/// Registering a VMA with a token another VMA holds broke the database's unique index and
/// answered 503 `storage_unavailable`; it is a 409 that says what to do, and the first VMA
/// keeps its token.
#[tokio::test]
async fn a_token_another_vma_holds_is_409_not_a_storage_failure() {
    for db in test_dbs().await {
        let api = Api::start(&db).await;
        let body = json!({"base_url": "http://127.0.0.1:9", "token": VMA1_TOKEN});
        let resp = api
            .c
            .send(M::PUT, "/api/v1/vmas/vma-3", Some(OPERATOR), Some(body))
            .await;
        let e = error(resp, StatusCode::CONFLICT).await;
        assert_eq!(e.error, "token_in_use", "{}", db.backend);
        assert!(!e.message.contains(VMA1_TOKEN), "{}", e.message);
        // vma-1 may still post with it, and vma-3 was not registered.
        let batch = json!({"vma_id": "vma-1", "events": []});
        let resp = api
            .c
            .send(
                M::POST,
                "/api/v1/watchdog/events",
                Some(VMA1_TOKEN),
                Some(batch),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let vmas: Vec<serde_json::Value> = api.get("/api/v1/vmas").await;
        assert!(vmas.iter().all(|v| v["id"] != "vma-3"), "{vmas:?}");
        api.server.shutdown().await;
    }
}

/// The rules of `PUT /api/v1/vmas/{id}` as the document states them: an http(s) URL (400
/// otherwise), a token of at least 16 characters counted as characters, not bytes; an
/// https:// URL the OMA cannot verify is the OMA's configuration, a 409.
#[tokio::test]
async fn vma_registration_follows_the_documented_rules() {
    let db = common::sqlite_db();
    let api = Api::start(&db).await;
    let put = |base_url: &str, token: &str| {
        let body = json!({"base_url": base_url, "token": token});
        api.c
            .send(M::PUT, "/api/v1/vmas/vma-9", Some(OPERATOR), Some(body))
    };
    let token = "a-token-of-enough-characters";
    for url in ["", "ftp://vma", "HTTP://vma", "vma:8081"] {
        let e = error(put(url, token).await, StatusCode::BAD_REQUEST).await;
        assert!(e.message.contains("base_url"), "{url}: {}", e.message);
    }
    // Nine characters, eighteen bytes: too short.
    let e = error(
        put("http://vma", &"é".repeat(9)).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(e.message.contains("16 characters"), "{}", e.message);
    let resp = put("http://vma", &"é".repeat(16)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let e = error(put("https://vma", token).await, StatusCode::CONFLICT).await;
    assert_eq!(e.error, "vma_tls_unconfigured");
    assert!(e.message.contains("--vma-ca"), "{}", e.message);
    api.server.shutdown().await;
}

/// Job creation refers to things that may not exist: an unregistered VMA is a 404 like an
/// unknown VM context (a well-formed request about a missing thing, not a malformed one).
/// `sync_type` is `full` or `incremental`, and a VM context id of white space only is 400.
#[tokio::test]
async fn job_creation_follows_the_documented_rules() {
    let db = common::sqlite_db();
    let api = Api::start(&db).await;
    let post = |body| {
        api.c
            .send(M::POST, "/api/v1/jobs", Some(OPERATOR), Some(body))
    };
    let unknown =
        json!({"vm_context_id": "ctx-1", "vm_name": "w", "vma_id": "nope", "start": false});
    let e = error(post(unknown).await, StatusCode::NOT_FOUND).await;
    assert_eq!(e.error, "unknown_vma");
    let sync = json!({"vm_context_id": "ctx-1", "vm_name": "w", "vma_id": "vma-1",
        "start": false, "sync_type": "partial"});
    let e = error(post(sync).await, StatusCode::BAD_REQUEST).await;
    assert!(
        e.message.contains("sync_type") || e.message.contains("partial"),
        "{}",
        e.message
    );
    for blank in [" ", "\t\n", "\u{3000}", "\u{85}"] {
        let body =
            json!({"vm_context_id": blank, "vm_name": "w", "vma_id": "vma-1", "start": false});
        let e = error(post(body).await, StatusCode::BAD_REQUEST).await;
        assert!(
            e.message.contains("vm_context_id"),
            "{blank:?}: {}",
            e.message
        );
    }
    let ok = json!({"vm_context_id": "ctx-1", "vm_name": "w", "vma_id": "vma-1",
        "start": false, "sync_type": "incremental"});
    let resp = post(ok).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let job: Job = resp.json().await.unwrap();
    assert_eq!(job.sync_type.as_deref(), Some("incremental"));
    api.server.shutdown().await;
}
