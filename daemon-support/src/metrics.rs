//! What both daemons' Prometheus metrics share: the `--metrics-listen` setting and its
//! listener, the `/metrics` endpoint, and the families every daemon has (HTTP requests by route
//! and status with their duration, log lines dropped).
//!
//! Each daemon owns one explicit [`Registry`] (no global state) in a `metrics` module of its
//! own, with typed families that its code increments where things happen. Values that some
//! other part already keeps (a queue's depth, a kernel counter) are copied into the registry
//! when Prometheus scrapes ([`Scrape::refresh`]), so a scrape always shows them as they are.
//!
//! `/metrics` is served on a listener of its own, never beside the REST API: it needs no token,
//! it stays out of the APIs' OpenAPI documents, and a firewall can keep it on the management
//! network. Its default address is a fixed loopback port (each daemon's own); when that port is
//! taken the daemon runs on without metrics and says so, because a watchdog that refused to
//! start for want of a monitoring port would miss deaths. An address given with
//! `--metrics-listen` must be bound, or the daemon does not start; `off` serves nothing.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
pub use prometheus_client::registry::Unit;
use tokio::net::TcpListener;

/// Registers families in a registry, one line each: `"name", "help", family;` or, with a
/// unit, `"name" in Seconds, "help", family;` (the unit is a [`Unit`] variant). A daemon's
/// list of metrics then reads as a table.
#[macro_export]
macro_rules! register {
    ($registry:expr, $($name:literal $(in $unit:ident)?, $help:literal, $metric:expr;)*) => {
        $($crate::register!(@one $registry, $name $(, $unit)?, $help, $metric);)*
    };
    (@one $registry:expr, $name:literal, $help:literal, $metric:expr) => {
        $registry.register($name, $help, $metric)
    };
    (@one $registry:expr, $name:literal, $unit:ident, $help:literal, $metric:expr) => {
        $registry.register_with_unit($name, $help, $crate::metrics::Unit::$unit, $metric)
    };
}

/// The content type of the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The path Prometheus scrapes.
pub const PATH: &str = "/metrics";

/// Where `/metrics` is served (`--metrics-listen`): an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// No metrics endpoint.
    Off,
    /// Served on this address.
    At(SocketAddr),
}

/// A `--metrics-listen` value that is neither an address nor `off`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an address (such as 127.0.0.1:9181) nor `off`")]
pub struct ParseListenError(String);

impl FromStr for MetricsListen {
    type Err = ParseListenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::At)
            .map_err(|_| ParseListenError(s.to_owned()))
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::At(addr) => addr.fmt(f),
        }
    }
}

/// The metrics address given could not be bound.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for metrics on {addr}: {source}; another daemon may use it: stop it, give --metrics-listen another address, or `--metrics-listen off`"
)]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener: `chosen` when the operator gave one (a failure stops the
/// start), else `default` (a failure is logged and the daemon runs without metrics).
pub async fn bind(
    chosen: Option<MetricsListen>,
    default: SocketAddr,
) -> Result<Option<TcpListener>, BindError> {
    let addr = match chosen {
        Some(MetricsListen::Off) => {
            tracing::info!(
                event = "metrics_off",
                "no metrics endpoint (--metrics-listen off)"
            );
            return Ok(None);
        }
        Some(MetricsListen::At(addr)) => addr,
        None => default,
    };
    match TcpListener::bind(addr).await {
        Ok(listener) => {
            let local = listener.local_addr().unwrap_or(addr);
            tracing::info!(event = "metrics_listening", addr = %local, path = PATH,
                "Prometheus metrics served");
            Ok(Some(listener))
        }
        Err(source) if chosen.is_some() => Err(BindError { addr, source }),
        Err(error) => {
            tracing::warn!(event = "metrics_unavailable", %addr, %error,
                "the default metrics address is taken, so this daemon serves no metrics (its `up` alert fires); give --metrics-listen a free address");
            Ok(None)
        }
    }
}

/// A daemon's metrics as `/metrics` serves them.
pub trait Scrape: Send + Sync + 'static {
    /// The registry to encode.
    fn registry(&self) -> &Registry;
    /// Brings the values kept elsewhere up to date, just before they are encoded.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}

/// Serves `/metrics` from `metrics` on `listener` (plain HTTP, the transport's default limits)
/// until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<dyn Scrape>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let router = Router::new()
        .route(PATH, axum::routing::get(scrape))
        .with_state(metrics);
    transport::serve(
        listener,
        router,
        None,
        transport::Limits::default(),
        Arc::default(),
        shutdown,
    )
    .await;
}

/// `registry` in the Prometheus text format, as `/metrics` serves it.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

async fn scrape(State(metrics): State<Arc<dyn Scrape>>) -> Response {
    metrics.refresh().await;
    match encode(metrics.registry()) {
        Ok(text) => ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], text).into_response(),
        Err(error) => {
            tracing::error!(event = "metrics_encode_failed", %error, "cannot encode the metrics");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Raises `counter` to `total`, a count some other part keeps (it only ever grows).
pub fn mirror(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// Labels of a request count: the route as the router matched it (`/api/v1/jobs/{job_id}`,
/// never a job id) and the response's status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    /// The route's template, or `unmatched`.
    pub route: String,
    /// The status code, such as `200`.
    pub status: String,
}

/// Label of a request duration: the route.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The route's template, or `unmatched`.
    pub route: String,
}

/// What every daemon counts the same way: its HTTP requests and its dropped log lines.
#[derive(Debug)]
pub struct DaemonMetrics {
    requests: Family<RouteStatus, Counter>,
    durations: Family<RouteLabel, Histogram>,
    log_lines_dropped: Counter,
}

impl DaemonMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            requests: Family::default(),
            // 0.5 ms to about 4 s: a request answers in milliseconds; a start request waits
            // for migratekit to be registered, a recovery run for its VMAs.
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            }),
            log_lines_dropped: Counter::default(),
        };
        crate::register! { registry,
            "http_requests", "HTTP requests answered, by route and status code", metrics.requests.clone();
            "http_request_duration" in Seconds, "Time to answer an HTTP request, by route", metrics.durations.clone();
            "log_lines_dropped", "Log lines dropped because the log output did not take them in time", metrics.log_lines_dropped.clone();
        }
        Arc::new(metrics)
    }

    /// Copies the log queue's count of dropped lines (call from [`Scrape::refresh`]).
    pub fn refresh(&self) {
        mirror(&self.log_lines_dropped, crate::log_queue::dropped_lines());
    }

    /// `router` with every request counted and timed (a layer, so that each route is seen
    /// with the template it matched).
    pub fn instrument<S: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        router: Router<S>,
    ) -> Router<S> {
        router.layer(axum::middleware::from_fn_with_state(
            Arc::clone(self),
            track_request,
        ))
    }
}

async fn track_request(
    State(metrics): State<Arc<DaemonMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics
        .durations
        .get_or_create(&RouteLabel {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RouteStatus { route, status })
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain {
        registry: Registry,
    }

    impl Scrape for Plain {
        fn registry(&self) -> &Registry {
            &self.registry
        }
    }

    #[test]
    fn listen_values_parse() {
        assert_eq!("off".parse::<MetricsListen>().unwrap(), MetricsListen::Off);
        assert_eq!(
            "127.0.0.1:9181".parse::<MetricsListen>().unwrap(),
            MetricsListen::At("127.0.0.1:9181".parse().unwrap())
        );
        assert!("localhost".parse::<MetricsListen>().is_err());
    }

    #[tokio::test]
    async fn a_taken_default_is_skipped_but_a_chosen_address_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(bind(None, addr).await.unwrap().is_none());
        assert!(bind(Some(MetricsListen::At(addr)), addr).await.is_err());
        assert!(
            bind(Some(MetricsListen::Off), addr)
                .await
                .unwrap()
                .is_none()
        );
    }

    /// Requests through an instrumented router are counted by route template and status,
    /// and `/metrics` serves them in the text format over a real socket.
    #[tokio::test]
    async fn requests_are_counted_by_route_and_served() {
        let mut registry = Registry::with_prefix("test");
        let daemon = DaemonMetrics::register(&mut registry);
        let app = daemon.instrument(
            Router::new().route("/items/{id}", axum::routing::get(|| async { "item" })),
        );
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = api.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(api, app).await.unwrap() });
        let listener = bind(
            Some(MetricsListen::At("127.0.0.1:0".parse().unwrap())),
            api_addr,
        )
        .await
        .unwrap()
        .unwrap();
        let metrics_addr = listener.local_addr().unwrap();
        let scrape: Arc<dyn Scrape> = Arc::new(Plain { registry });
        tokio::spawn(serve(listener, scrape, std::future::pending()));
        let client = reqwest::Client::new();
        for path in ["/items/1", "/items/2", "/nothing"] {
            client
                .get(format!("http://{api_addr}{path}"))
                .send()
                .await
                .unwrap();
        }
        let response = client
            .get(format!("http://{metrics_addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()[CONTENT_TYPE], CONTENT_TYPE_TEXT);
        let text = response.text().await.unwrap();
        assert!(
            text.contains(r#"test_http_requests_total{route="/items/{id}",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"test_http_requests_total{route="unmatched",status="404"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"test_http_request_duration_seconds_count{route="/items/{id}"} 2"#),
            "{text}"
        );
        assert!(text.contains("test_log_lines_dropped_total 0"), "{text}");
    }
}
