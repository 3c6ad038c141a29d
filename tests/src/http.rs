//! A small JSON client over reqwest's blocking API, with the bearer token and error context
//! every call of the harness needs.

use std::time::Duration;

use reqwest::Method;
use reqwest::blocking::Client;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{HarnessError, Result};

/// The raw answer of a request: status and body, for tests of refusals.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub body: String,
}

/// A JSON client for one base URL.
#[derive(Debug, Clone)]
pub struct JsonClient {
    http: Client,
    base: String,
    token: Option<String>,
}

/// A blocking client with short timeouts (the daemons answer on loopback in milliseconds).
pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default()
}

impl JsonClient {
    /// A client for `base` (e.g. `http://127.0.0.1:8082`) with an optional bearer token.
    pub fn new(http: Client, base: impl Into<String>, token: Option<String>) -> Self {
        Self {
            http,
            base: base.into(),
            token,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and returns status and body, whatever the status.
    pub fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer> {
        let what = format!("{method} {path}");
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, bytes)) = body {
            // A server refuses an oversized body (413) before reading it and then drops the
            // connection; it must not go back into the pool, or the next request fails on it.
            if bytes.len() > 64 << 10 {
                request = request.header("connection", "close");
            }
            request = request.header("content-type", content_type).body(bytes);
        }
        let response = request.send().map_err(|source| HarnessError::Http {
            what: what.clone(),
            source: source.without_url(),
        })?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .map_err(|source| HarnessError::Http { what, source })?;
        Ok(Answer { status, body })
    }

    /// Sends a request with this client's token and a JSON body; expects `expect` and parses
    /// the answer.
    pub fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        expect: u16,
    ) -> Result<T> {
        let what = format!("{method} {path}");
        let bytes = match body {
            Some(b) => Some((
                "application/json",
                serde_json::to_vec(b).map_err(|source| HarnessError::Parse {
                    what: what.clone(),
                    source,
                })?,
            )),
            None => None,
        };
        let answer = self.raw(method, path, self.token.as_deref(), bytes)?;
        if answer.status != expect {
            return Err(HarnessError::Status {
                what,
                status: answer.status,
                body: answer.body,
            });
        }
        serde_json::from_str(&answer.body).map_err(|source| HarnessError::Parse { what, source })
    }

    /// GET with this client's token, expecting 200.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::GET, path, None, 200)
    }

    /// Waits until `GET /health` answers 200.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(a) = self.raw(Method::GET, "/health", None, None)
                && a.status == 200
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(HarnessError::timeout(
                    format!("{}/health to answer 200", self.base),
                    timeout.as_secs_f64(),
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// A TCP port free right now on `ip`, below the kernel's ephemeral range (see
/// [`test_support::free_port`]), for a server that comes up (or back) later on a known address.
pub fn free_port(ip: std::net::IpAddr) -> Result<u16> {
    test_support::free_port(ip)
        .map_err(|e| HarnessError::io(format!("finding a free port on {ip}"), e))
}

/// The `--metrics-listen` flag of a daemon the harness starts on `ip`, and where its metrics
/// are then served: a port of its own (never the default one: tests run many daemons at
/// once; a daemon in a namespace takes a port free on loopback, as its API does), or `off`
/// without `on` (the benchmark's baseline).
pub fn metrics_flag(
    ip: std::net::IpAddr,
    namespaced: bool,
    on: bool,
) -> Result<(Option<std::net::SocketAddr>, [std::ffi::OsString; 2])> {
    if !on {
        return Ok((None, ["--metrics-listen".into(), "off".into()]));
    }
    let port = free_port(if namespaced {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        ip
    })?;
    let addr = std::net::SocketAddr::new(ip, port);
    Ok((
        Some(addr),
        ["--metrics-listen".into(), addr.to_string().into()],
    ))
}

/// Polls `probe` every `every` until it returns `Some`, or fails with a timeout naming `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            return Err(HarnessError::timeout(what, timeout.as_secs_f64()));
        }
        std::thread::sleep(every);
    }
}
