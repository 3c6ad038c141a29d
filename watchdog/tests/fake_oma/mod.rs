//! A tiny real OMA for tests and benchmarks: an axum server on a real socket that checks the
//! VMA's token, records every event with the instant it arrived, and acknowledges them all.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{EventBatch, EventBatchAck, ProcessEvent};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

#[derive(Clone)]
struct Shared {
    token: String,
    vma_id: String,
    received: Arc<Mutex<Vec<(ProcessEvent, Instant)>>>,
    batches: Arc<Mutex<usize>>,
    /// When set, each batch is appended to this file and `fdatasync`ed before it is
    /// acknowledged, as the real OMA commits its transaction, and the instant recorded.
    commit_log: Option<Arc<Mutex<std::fs::File>>>,
    committed: Arc<Mutex<Vec<(uuid::Uuid, Instant)>>>,
}

/// A running fake OMA.
pub struct FakeOma {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `https` when it serves TLS.
    scheme: &'static str,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn intake(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(batch): Json<EventBatch>,
) -> Result<Json<EventBatchAck>, StatusCode> {
    let now = Instant::now();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {}", s.token)) || batch.vma_id != s.vma_id {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let ids = batch.events.iter().map(|e| e.event_id).collect::<Vec<_>>();
    *s.batches.lock().unwrap() += 1;
    s.received
        .lock()
        .unwrap()
        .extend(batch.events.into_iter().map(|e| (e, now)));
    if let Some(log) = s.commit_log.clone() {
        let line = format!("{ids:?}\n");
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = log.lock().unwrap();
            f.write_all(line.as_bytes())?;
            f.sync_data()
        })
        .await
        .unwrap()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
        let done = Instant::now();
        s.committed
            .lock()
            .unwrap()
            .extend(ids.iter().map(|id| (*id, done)));
    }
    Ok(Json(EventBatchAck {
        applied: ids.len() as u32,
        acknowledged: ids,
    }))
}

impl FakeOma {
    /// Serves on `addr` (`127.0.0.1:0` for any free port), expecting `token` from `vma_id`.
    pub async fn start(addr: SocketAddr, token: &str, vma_id: &str) -> Self {
        Self::start_with(addr, token, vma_id, None, None).await
    }

    /// [`FakeOma::start`] over HTTPS (through the appliances' own transport), requiring a
    /// client certificate when `tls` has a client CA.
    pub async fn start_tls(token: &str, vma_id: &str, tls: transport::ServerTls) -> Self {
        let addr = ([127, 0, 0, 1], 0).into();
        Self::start_with(addr, token, vma_id, None, Some(tls)).await
    }

    /// [`FakeOma::start`] that makes each batch durable in `commit_file` (one `fdatasync`,
    /// the cost of the real OMA's commit) before acknowledging it; see [`FakeOma::committed_at`].
    pub async fn start_durable(
        addr: SocketAddr,
        token: &str,
        vma_id: &str,
        commit_file: &std::path::Path,
    ) -> Self {
        let file = std::fs::File::create(commit_file).unwrap();
        Self::start_with(addr, token, vma_id, Some(file), None).await
    }

    async fn start_with(
        addr: SocketAddr,
        token: &str,
        vma_id: &str,
        commit_log: Option<std::fs::File>,
        tls: Option<transport::ServerTls>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Shared {
            token: token.to_owned(),
            vma_id: vma_id.to_owned(),
            received: Arc::default(),
            batches: Arc::default(),
            commit_log: commit_log.map(|f| Arc::new(Mutex::new(f))),
            committed: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/api/v1/watchdog/events", axum::routing::post(intake))
            .with_state(shared.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = match tls {
            Some(tls) => tokio::spawn(transport::serve(
                listener,
                app,
                Some(tls),
                transport::Limits::default(),
                Arc::default(),
                async move {
                    let _ = stopped.await;
                },
            )),
            None => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            }),
        };
        Self {
            addr,
            scheme,
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// When the event was made durable (only with [`FakeOma::start_durable`]).
    pub fn committed_at(&self, event_id: uuid::Uuid) -> Option<Instant> {
        let committed = self.shared.committed.lock().unwrap();
        committed
            .iter()
            .find(|(id, _)| *id == event_id)
            .map(|(_, at)| *at)
    }

    /// Every event received so far, with its arrival time, in order.
    pub fn received(&self) -> Vec<(ProcessEvent, Instant)> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Events received about `job_id`.
    pub fn events_of(&self, job_id: &str) -> Vec<ProcessEvent> {
        self.received()
            .into_iter()
            .map(|(e, _)| e)
            .filter(|e| e.job_id == job_id)
            .collect()
    }

    /// Waits up to `timeout` for an event matching `pred`; returns it and when it arrived.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&ProcessEvent) -> bool,
    ) -> Option<(ProcessEvent, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(hit) = self.received().into_iter().find(|(e, _)| pred(e)) {
                return Some(hit);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Stops serving and closes the listener.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A port free right now on 127.0.0.1 (for a server that must come up later on a known
/// address, or a watchdog that must keep its address across a restart), below the kernel's
/// ephemeral range: see [`test_support::free_port`].
pub fn free_port() -> u16 {
    test_support::free_port([127, 0, 0, 1].into()).expect("a free port on 127.0.0.1")
}
