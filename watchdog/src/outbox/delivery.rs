//! The task that delivers the outbox to the OMA, batch by batch, until each event is
//! acknowledged.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use api::{EventBatch, EventBatchAck};
use rand::Rng;
use transport::{ClientTlsFiles, TlsError};
use uuid::Uuid;

use super::omas::{OmaUrls, Outcome};
use super::{Outbox, OutboxError};
use crate::metrics::Metrics;
use crate::secret::BearerToken;

/// Where and how to deliver.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Base URL of the OMA, e.g. `http://oma:8082`, or several separated by commas, in order
    /// of preference (see `super::omas`); `/api/v1/watchdog/events` is appended.
    pub oma_url: String,
    /// This VMA's id, sent in every batch.
    pub vma_id: String,
    /// The VMA's bearer token at the OMA.
    pub token: BearerToken,
    /// At most this many events per request.
    pub batch_size: usize,
    /// First retry delay after a failure; doubles on each further failure.
    pub initial_backoff: Duration,
    /// Cap on the retry delay.
    pub max_backoff: Duration,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// What the client trusts (an `https://` OMA needs a CA) and presents.
    pub tls: ClientTlsFiles,
    /// Where attempts and the time to each death's acknowledgement are counted.
    pub metrics: Arc<Metrics>,
}

impl DeliveryConfig {
    /// Defaults: batches of 100, backoff from 100 ms doubling to at most 30 s, 10 s timeout.
    pub fn new(oma_url: impl Into<String>, vma_id: impl Into<String>, token: BearerToken) -> Self {
        Self {
            oma_url: oma_url.into(),
            vma_id: vma_id.into(),
            token,
            batch_size: 100,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            tls: ClientTlsFiles::default(),
            metrics: Metrics::new(),
        }
    }
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("the OMA could not be reached: {0}")]
    Request(#[source] reqwest::Error),
    #[error("the OMA answered {0}; check the VMA id and token configured for this VMA at the OMA")]
    Status(reqwest::StatusCode),
    #[error("the OMA's answer is not an event acknowledgement: {0}")]
    BadAck(#[source] reqwest::Error),
    #[error("the OMA acknowledged none of the {0} events sent")]
    NothingAcknowledged(usize),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("the acknowledgement could not be recorded: the blocking task failed")]
    Join,
}

impl AttemptError {
    /// The `result` label of `delivery_attempts_total`.
    fn result(&self) -> &'static str {
        match self {
            Self::Request(_) => "unreachable",
            Self::Status(_) => "refused",
            Self::BadAck(_) => "bad_answer",
            Self::NothingAcknowledged(_) => "not_acknowledged",
            Self::Outbox(_) | Self::Join => "local_error",
        }
    }

    /// Whether another OMA should get the next attempt (see `super::omas`).
    fn outcome(&self) -> Outcome {
        match self {
            Self::Request(_) | Self::BadAck(_) => Outcome::Unavailable,
            Self::Status(status) if status.is_server_error() => Outcome::Unavailable,
            _ => Outcome::Answered,
        }
    }
}

/// The least time between a failed attempt and an early retry because the OMA called (see
/// [`Outbox::oma_called`]): when only the way from the OMA to this watchdog works, its calls
/// must not turn into a stream of attempts.
pub const EARLY_RETRY_GAP: Duration = Duration::from_secs(1);

/// The HTTP client and the token the delivery uses, replaced together in place when their
/// files are re-read (SIGHUP): the next attempt uses the new ones, one in flight finishes
/// with the old. A new client also means new connections, so a replaced CA or client
/// certificate is used at once rather than when a kept-alive connection happens to close.
#[derive(Debug)]
pub struct OmaClient {
    timeout: Duration,
    current: RwLock<Arc<ClientState>>,
}

#[derive(Debug)]
struct ClientState {
    http: reqwest::Client,
    token: BearerToken,
}

impl OmaClient {
    /// A client with `timeout` per request, presenting `token`, trusting `tls.ca` only.
    pub fn new(
        timeout: Duration,
        token: BearerToken,
        tls: &ClientTlsFiles,
    ) -> Result<Self, TlsError> {
        let http = build_client(timeout, tls)?;
        Ok(Self {
            timeout,
            current: RwLock::new(Arc::new(ClientState { http, token })),
        })
    }

    /// Puts a new token and TLS files in force; on error nothing changes.
    pub fn reload(&self, token: BearerToken, tls: &ClientTlsFiles) -> Result<(), TlsError> {
        let http = build_client(self.timeout, tls)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(ClientState { http, token });
        Ok(())
    }

    fn current(&self) -> Arc<ClientState> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl OmaClient {
    /// Posts `batch` once with the current token and returns the ids the OMA acknowledged
    /// (for the events held in memory while the outbox cannot be written, see `spill`).
    pub(crate) async fn post_events(
        &self,
        url: &str,
        batch: &EventBatch,
    ) -> Result<Vec<Uuid>, reqwest::Error> {
        let current = self.current();
        let response = current
            .http
            .post(url)
            .bearer_auth(current.token.expose())
            .json(batch)
            .send()
            .await?
            .error_for_status()?;
        Ok(response.json::<EventBatchAck>().await?.acknowledged)
    }
}

fn build_client(timeout: Duration, tls: &ClientTlsFiles) -> Result<reqwest::Client, TlsError> {
    tls.apply(reqwest::Client::builder().timeout(timeout))?
        .build()
        .map_err(|source| TlsError::Client {
            path: tls
                .ca
                .clone()
                .or_else(|| tls.cert.clone())
                .unwrap_or_default(),
            source,
        })
}

/// Delivers the outbox until `shutdown` resolves, with a client built from `config` (a
/// client whose TLS files cannot be read logs why and delivers nothing; the daemon builds
/// its client at start instead, see [`deliver_with`]).
pub async fn deliver(
    outbox: Arc<Outbox>,
    config: DeliveryConfig,
    shutdown: impl Future<Output = ()>,
) {
    match OmaClient::new(config.request_timeout, config.token.clone(), &config.tls) {
        Ok(client) => deliver_with(outbox, config, Arc::new(client), shutdown).await,
        Err(error) => tracing::error!(event = "delivery_client_failed", %error,
            "cannot build the client for the OMA; nothing is delivered"),
    }
}

/// Delivers the outbox through `client` until `shutdown` resolves. Never gives up: every
/// failure is counted, logged and retried after a capped, jittered exponential backoff.
pub async fn deliver_with(
    outbox: Arc<Outbox>,
    config: DeliveryConfig,
    client: Arc<OmaClient>,
    shutdown: impl Future<Output = ()>,
) {
    let omas = OmaUrls::parse(&config.oma_url);
    tokio::pin!(shutdown);
    let mut failures: u32 = 0;
    // Stamped while the loop waits (for an append, for the OMA, for a back-off), not while it
    // peeks or acknowledges: a stuck write there stops the systemd watchdog's pings.
    let heartbeat = daemon_support::notify::Heartbeat::new("outbox delivery");
    loop {
        heartbeat.beat();
        let batch = outbox.peek(config.batch_size.max(1));
        if batch.is_empty() {
            // Wake on the next append; the periodic wake-up is only a safety net.
            tokio::select! {
                () = &mut shutdown => return,
                () = outbox.appended() => {}
                () = heartbeat.waiting(tokio::time::sleep(Duration::from_secs(5))) => {}
            }
            continue;
        }
        let sent = batch.len();
        let deaths: Vec<_> = batch
            .iter()
            .filter(|e| e.kind != api::ProcessEventKind::ProcessStarted)
            .map(|e| e.observed_at)
            .collect();
        let current = client.current();
        let (oma, base) = omas.pick();
        let url = format!("{base}/api/v1/watchdog/events");
        let attempt = attempt(&current, &url, &config, &outbox, batch);
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            () = &mut shutdown => return,
            result = heartbeat.waiting(attempt) => result,
            // The OMA has just called, yet this attempt has hung for a while: its connection
            // most likely died in an outage (a request on a kept-alive connection waits for
            // TCP's retransmissions, seconds apart, or for the timeout). Dropping it closes
            // that connection; the next attempt opens a new one. The OMA applies each event
            // id once, so a request that did arrive is harmless.
            () = oma_called(&outbox, started + EARLY_RETRY_GAP) => {
                tracing::info!(event = "delivery_retry_early", url = %url, waited_ms = started.elapsed().as_millis() as u64,
                    "the OMA called this watchdog while a delivery hung; retrying on a new connection");
                continue;
            }
        };
        match result {
            Ok(removed) => {
                omas.record(oma, Outcome::Answered);
                config.metrics.delivery_attempt("acknowledged");
                config.metrics.deaths_acknowledged(&deaths);
                failures = 0;
                tracing::debug!(sent, acknowledged = removed, "delivered events to the OMA");
            }
            Err(error) => {
                if omas.record(oma, error.outcome()) {
                    config.metrics.delivery_failover();
                }
                config.metrics.delivery_attempt(error.result());
                outbox.record_failed_attempt();
                failures = failures.saturating_add(1);
                let delay = backoff(failures, config.initial_backoff, config.max_backoff);
                tracing::warn!(%error, url = %url, attempt = failures, retry_in_ms = delay.as_millis() as u64, queued = outbox.stats().queued, "delivering events to the OMA failed; will retry");
                tokio::select! {
                    () = &mut shutdown => return,
                    () = back_off(&outbox, &heartbeat, delay, &url) => {}
                }
            }
        }
    }
}

/// Waits out `delay` after a failed attempt, or less when the OMA calls this watchdog: the way
/// back to it then most likely works again (a restarted OMA, a healed link), and the rest of a
/// back-off of up to `max_backoff` would only hold the deaths back. However often the OMA
/// calls, at most one early attempt per [`EARLY_RETRY_GAP`].
async fn back_off(
    outbox: &Outbox,
    heartbeat: &daemon_support::notify::Heartbeat,
    delay: Duration,
    url: &str,
) {
    let earliest = tokio::time::Instant::now() + EARLY_RETRY_GAP;
    tokio::select! {
        () = heartbeat.waiting(tokio::time::sleep(delay)) => {}
        () = oma_called(outbox, earliest) => {
            tracing::info!(event = "delivery_retry_early", url = %url,
                "the OMA called this watchdog; retrying delivery now instead of waiting out the back-off");
        }
    }
}

/// Resolves once the OMA has called this watchdog, but not before `earliest`.
async fn oma_called(outbox: &Outbox, earliest: tokio::time::Instant) {
    outbox.oma_seen().await;
    tokio::time::sleep_until(earliest).await;
}

async fn attempt(
    client: &ClientState,
    url: &str,
    config: &DeliveryConfig,
    outbox: &Arc<Outbox>,
    events: Vec<api::ProcessEvent>,
) -> Result<usize, AttemptError> {
    let sent: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let death = events
        .iter()
        .any(|e| e.kind != api::ProcessEventKind::ProcessStarted);
    let batch = EventBatch {
        vma_id: config.vma_id.clone(),
        events,
    };
    let post_us = crate::clock::monotonic_us();
    let first = sent.first().map(Uuid::to_string);
    let response = client
        .http
        .post(url)
        .bearer_auth(client.token.expose())
        .json(&batch)
        .send()
        .await
        .map_err(AttemptError::Request)?;
    super::crash::at(super::crash::Point::DuringPost, death);
    if !response.status().is_success() {
        return Err(AttemptError::Status(response.status()));
    }
    let ack: EventBatchAck = response.json().await.map_err(AttemptError::BadAck)?;
    let ids = ack.acknowledged;
    let outbox = Arc::clone(outbox);
    let removed = tokio::task::spawn_blocking(move || outbox.acknowledge(&ids))
        .await
        .map_err(|_| AttemptError::Join)??;
    tracing::debug!(target: crate::clock::LATENCY_TARGET, event = "delivery_timing",
        first_event_id = first, events = sent.len(), post_us,
        acked_us = crate::clock::monotonic_us(), "batch delivered");
    if removed == 0 {
        return Err(AttemptError::NothingAcknowledged(sent.len()));
    }
    Ok(removed)
}

/// Delay before retry number `failures` (1-based): `initial * 2^(failures-1)`, capped at
/// `max`, then jittered uniformly into its upper half so that many VMAs do not retry in step.
pub fn backoff(failures: u32, initial: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    let half = base / 2;
    let jitter = rand::thread_rng().gen_range(0..=half.as_micros() as u64);
    half + Duration::from_micros(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..50 {
            let first = backoff(1, i, m);
            assert!(first >= Duration::from_millis(50) && first <= i);
            let late = backoff(40, i, m);
            assert!(late >= Duration::from_secs(1) && late <= m);
        }
        assert!(backoff(4, i, m) >= Duration::from_millis(400));
    }
}
