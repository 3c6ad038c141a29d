//! Both daemons over HTTPS with mutual TLS: a CA made at test time, a server certificate and
//! a client certificate for each daemon, and one for the harness itself.

use std::path::PathBuf;
use std::time::Duration;

use test_support::pki::{Pair, TestCa};

use crate::{HarnessError, Result};

/// The test-time PKI of one system; its files live as long as it does.
#[derive(Debug)]
pub struct Pki {
    _dir: tempfile::TempDir,
    ca: TestCa,
}

/// What one daemon serves and presents: its server certificate (for `localhost` and
/// 127.0.0.1), the CA it trusts both ways, and the client certificate it shows the other.
#[derive(Debug, Clone)]
pub struct DaemonTls {
    /// The CA: servers' certificates must chain to it, and so must clients'.
    pub ca: PathBuf,
    /// The daemon's server certificate and key.
    pub server: Pair,
    /// The certificate and key it presents when it calls the other daemon.
    pub client: Pair,
}

impl Pki {
    /// A new CA in a temporary directory.
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pki-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the PKI's directory", e))?;
        let ca = TestCa::new(dir.path(), "system")
            .map_err(|e| HarnessError::io("creating the test CA", e))?;
        Ok(Self { _dir: dir, ca })
    }

    /// The certificates of daemon `name`.
    pub fn daemon(&self, name: &str) -> Result<DaemonTls> {
        let io = |what: &str| {
            let what = format!("{what} for {name}");
            move |e| HarnessError::io(what, e)
        };
        Ok(DaemonTls {
            ca: self.ca.cert.clone(),
            server: self.ca.server(name).map_err(io("a server certificate"))?,
            client: self
                .ca
                .client(&format!("{name}-client"))
                .map_err(io("a client certificate"))?,
        })
    }

    /// A blocking client for the harness: trusts the CA only and presents a certificate of
    /// it, as both daemons require.
    pub fn harness_client(&self) -> Result<reqwest::blocking::Client> {
        let pair = self
            .ca
            .client("harness")
            .map_err(|e| HarnessError::io("a client certificate for the harness", e))?;
        blocking_client(&self.ca.cert, &pair)
    }
}

/// A blocking client trusting `ca` only and presenting `identity`, with the harness's short
/// timeouts.
pub fn blocking_client(ca: &PathBuf, identity: &Pair) -> Result<reqwest::blocking::Client> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| HarnessError::io(format!("reading {}", p.display()), e))
    };
    let http = |source| HarnessError::Http {
        what: "building an HTTPS client".into(),
        source,
    };
    let root = reqwest::Certificate::from_pem(&read(ca)?).map_err(http)?;
    let mut pem = read(&identity.cert)?;
    pem.push(b'\n');
    pem.extend(read(&identity.key)?);
    let identity = reqwest::Identity::from_pem(&pem).map_err(http)?;
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .identity(identity)
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .map_err(http)
}
