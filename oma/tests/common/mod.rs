//! Shared test support: real databases (SQLite file, PostgreSQL when configured), a stand-in
//! VMA that follows the watchdog's contract on 127.0.0.1:0, and a running OMA.
#![allow(dead_code)]

pub mod cluster;
pub mod fixtures;
pub mod vma;

use oma::auth::hash_token;
use oma::poller::PollerConfig;
use oma::recovery::RecoveryConfig;
use oma::server::{RunningServer, Settings};
use oma::store::Store;
use sqlx::Connection;
use std::time::Duration;

/// Operator token used by every test server.
pub const OPERATOR: &str = "operator-token-for-tests-0001";
/// Watchdog token of VMA `vma-1`.
pub const VMA1_TOKEN: &str = "vma-1-token-for-tests-000001";
/// Watchdog token of VMA `vma-2`.
pub const VMA2_TOKEN: &str = "vma-2-token-for-tests-000002";

/// A database for one test: a SQLite file in a temporary directory, or a fresh PostgreSQL
/// database on the server named by `OMA_TEST_POSTGRES_URL`.
#[derive(Debug)]
pub struct TestDb {
    pub backend: &'static str,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL database this test created, and the admin URL to drop it with.
    postgres: Option<(String, String)>,
}

impl Drop for TestDb {
    /// Drops the test's PostgreSQL database, so that runs do not pile up databases on the
    /// test server (a few MB each, a few hundred per run). A database left behind by a test
    /// that was killed is harmless: its name is unique.
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // The test's runtime is still running this thread's task and refuses to block, so the
        // drop runs on a thread of its own, with a runtime of its own, and is waited for.
        let label = name.clone();
        let dropped = std::thread::Builder::new().spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .map_err(|e| e.to_string())?;
                // FORCE ends the sessions that the test's pools still hold.
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            })
        });
        let outcome = match dropped {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|_| Err("the thread dropping it panicked".to_owned())),
            Err(e) => Err(format!("no thread to drop it on: {e}")),
        };
        if let Err(err) = outcome {
            // A failed drop costs disk on the test server, not correctness: warn, do not panic
            // (a panic here, while a failed test unwinds, would abort the whole binary).
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "warning: could not drop test database {label} ({err}); it takes disk on the \
                 test server until dropped by hand: DROP DATABASE {label}"
            );
        }
    }
}

/// The databases every backend-agnostic test runs on: SQLite always, PostgreSQL when
/// `OMA_TEST_POSTGRES_URL` is set. Without it the PostgreSQL run is skipped with a notice,
/// unless `OMA_REQUIRE_POSTGRES=1`, which makes the skip a failure (CI).
pub async fn test_dbs() -> Vec<TestDb> {
    let mut dbs = vec![sqlite_db()];
    match std::env::var("OMA_TEST_POSTGRES_URL") {
        Ok(admin) if !admin.is_empty() => dbs.push(fresh_postgres(&admin).await),
        _ => {
            assert!(
                std::env::var("OMA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "OMA_REQUIRE_POSTGRES=1 but OMA_TEST_POSTGRES_URL is not set; start one with \
                 oma/scripts/start-test-postgres.sh"
            );
            // Written to stderr directly, past the test harness's capture, so CI logs show it.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP postgres: OMA_TEST_POSTGRES_URL not set"
            );
        }
    }
    dbs
}

/// A SQLite database in a temporary directory, for tests whose subject is not the backend.
pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("temporary directory");
    TestDb {
        backend: "sqlite",
        url: dir.path().join("oma.db").display().to_string(),
        _dir: Some(dir),
        postgres: None,
    }
}

async fn fresh_postgres(admin: &str) -> TestDb {
    let name = format!("oma_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .expect("connect to OMA_TEST_POSTGRES_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(admin);
    TestDb {
        backend: "postgres",
        url: format!("{base}/{name}"),
        _dir: None,
        postgres: Some((admin.to_owned(), name)),
    }
}

/// Opens the store and registers `vma-1` (and `vma-2`) at the given base URLs.
pub async fn store_with_vmas(db: &TestDb, vma1: &str, vma2: &str) -> Store {
    let store = Store::connect(&db.url).await.expect("open store");
    store
        .upsert_vma("vma-1", vma1, &hash_token(VMA1_TOKEN))
        .await
        .unwrap();
    store
        .upsert_vma("vma-2", vma2, &hash_token(VMA2_TOKEN))
        .await
        .unwrap();
    store
}

/// Settings for a test server: fast poller, recovery interval long enough not to interfere.
pub fn settings(db: &TestDb) -> Settings {
    Settings {
        database: db.url.clone(),
        operator_tokens: vec![OPERATOR.into()],
        vma_api_token: None,
        vma_timeout: Duration::from_secs(10),
        recovery: RecoveryConfig {
            interval: Duration::from_secs(3600),
            stale_threshold: Duration::from_secs(1800),
            concurrency: 8,
        },
        poller: PollerConfig {
            interval: Duration::from_millis(50),
            max_backoff: Duration::from_millis(400),
            per_vma_concurrency: 2,
            stall_threshold: Duration::from_secs(3600),
        },
        lease: oma::lease::LeaseConfig {
            period: Duration::from_secs(1),
            name: "test".into(),
        },
        poll_protocol: oma::poller::PollProtocol::Auto,
        net: oma::server::NetSettings::default(),
    }
}

/// Starts an OMA on 127.0.0.1:0 and waits for its startup recovery run to be recorded.
/// Without the wait a test's first job could be created while that run asks the VMAs, and a
/// job recorded with `start: false` that the VMA has never heard of is rightly `job_lost`.
pub async fn start_server(settings: Settings) -> RunningServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = oma::server::start(settings, listener)
        .await
        .expect("start oma");
    let store = server.state.store.clone();
    eventually(10, "the startup recovery run", || {
        let store = store.clone();
        async move {
            let runs = store.recent_runs(10).await.ok()?;
            runs.iter().any(|r| r.trigger == "startup").then_some(())
        }
    })
    .await;
    server
}

/// A base URL on which nothing listens: port 9 (discard), outside the ephemeral range, so no
/// test binding `127.0.0.1:0` can take it. (A port freed after a bind could be, by a test
/// running at the same time.)
pub async fn dead_url() -> String {
    let url = "http://127.0.0.1:9".to_owned();
    let refused = tokio::net::TcpStream::connect("127.0.0.1:9").await.is_err();
    assert!(
        refused,
        "something listens on 127.0.0.1:9; the tests need it closed"
    );
    url
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
