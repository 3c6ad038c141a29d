//! `oma`: replication jobs, VM contexts and evidence-based recovery, served over REST.
//!
//! [`app`] builds the router from one router per resource; [`server`] wires the store, the
//! recovery loop and the poller for the `oma` binary; [`cli`] is the `job-recovery` client.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod job;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod poller;
pub mod recovery;
pub mod routes;
pub mod server;
pub mod start;
pub mod stop;
pub mod store;
pub mod systemd;
pub mod vma_client;

use auth::OperatorTokens;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use poller::Poller;
use recovery::Recovery;
use std::sync::Arc;
use store::Store;

/// Largest request body accepted (1 MiB: a batch of a thousand events fits easily).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The log target of the timing lines of event intake (`RUST_LOG=info,oma::latency=debug`),
/// which the kill-to-commit benchmark reads to split its figures.
pub const LATENCY_TARGET: &str = "oma::latency";

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The database.
    pub store: Store,
    /// Hashes of the operator tokens.
    pub operators: Arc<OperatorTokens>,
    /// The recovery engine.
    pub recovery: Arc<Recovery>,
    /// The progress poller (for its health).
    pub poller: Arc<Poller>,
    /// Client of the VMAs' watchdog APIs, through which job creation starts migratekit on
    /// the VMA (`VmaClient::start_job`).
    pub vma_client: vma_client::VmaClient,
}

/// The OMA's HTTP application: `/health` open, operator routes behind operator tokens,
/// the watchdog route behind VMA tokens, and a body limit everywhere.
pub fn app(state: AppState) -> Router {
    let operator = Router::new()
        .merge(routes::jobs::router())
        .merge(routes::contexts::router())
        .merge(routes::vmas::router())
        .merge(routes::recovery::router())
        .merge(routes::openapi::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_operator,
        ));
    let watchdog = routes::watchdog::router().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::require_vma,
    ));
    let router = Router::new()
        .merge(routes::health::router())
        .merge(operator)
        .merge(watchdog)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    let metrics = std::sync::Arc::clone(state.store.metrics().daemon());
    metrics.instrument(router).with_state(state)
}
