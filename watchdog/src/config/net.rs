//! How the watchdog talks over the network: HTTPS for its API (optionally with client
//! certificates), the plain-HTTP loopback listener migratekit's progress client needs then,
//! HTTPS to the OMA, and the bounds on connections. The files named here are re-read on
//! SIGHUP (see `daemon::reload`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use transport::{ClientTlsFiles, Limits, ServerTlsFiles};

use super::DEFAULT_PORT;
use crate::secret::BearerToken;

/// Connections each listener holds at once by default: a VMA's API has one caller (the
/// OMA) and a handful of local migratekits, so far fewer than the OMA's default; a flood
/// beyond it waits in the kernel's backlog instead of taking the file descriptors the
/// detector's `/proc` scans need.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The network flags (flattened into [`super::Cli`]).
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Serve the API over HTTPS with this certificate chain (PEM, leaf first). Needs
    /// --tls-key and an explicit --listen; migratekit's progress then goes to
    /// --progress-listen. Re-read on SIGHUP.
    #[arg(long, env = "VMA_WATCHDOG_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "VMA_WATCHDOG_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require every HTTPS client (the OMA) to present a certificate of this CA (PEM):
    /// mutual TLS. Needs --tls-cert.
    #[arg(long, env = "VMA_WATCHDOG_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Loopback address of a plain-HTTP listener that serves only migratekit's progress
    /// updates; repeatable. Default with --tls-cert: 127.0.0.1:8081, plus `[::1]:8081` when the
    /// host has IPv6 loopback (migratekit posts to http://localhost:8081).
    #[arg(long)]
    pub progress_listen: Vec<SocketAddr>,
    /// The CA the OMA's certificate must chain to (PEM); needed for an https:// --oma-url.
    /// Nothing else is trusted. Re-read on SIGHUP.
    #[arg(long, env = "VMA_WATCHDOG_OMA_CA")]
    pub oma_ca: Option<PathBuf>,
    /// Certificate (PEM) this watchdog presents to an OMA that requires one.
    #[arg(
        long,
        env = "VMA_WATCHDOG_OMA_CLIENT_CERT",
        requires = "oma_client_key"
    )]
    pub oma_client_cert: Option<PathBuf>,
    /// The private key of --oma-client-cert (PEM).
    #[arg(
        long,
        env = "VMA_WATCHDOG_OMA_CLIENT_KEY",
        requires = "oma_client_cert"
    )]
    pub oma_client_key: Option<PathBuf>,
    /// Connections each API listener holds at once; more wait in the kernel's backlog. The
    /// file limit is raised to fit (lowered cap and a warning when it cannot be).
    #[arg(long, env = "VMA_WATCHDOG_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// Seconds a connection has to send a request's headers; an idle keep-alive connection
    /// is closed after as long.
    #[arg(long, env = "VMA_WATCHDOG_HEADER_TIMEOUT_SECS", default_value_t = 30.0)]
    pub header_timeout_secs: f64,
}

/// The validated network settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfig {
    /// Serve the API over HTTPS from these files (plain HTTP when `None`).
    pub tls: Option<ServerTlsFiles>,
    /// Plain-HTTP loopback listeners for progress updates that must be bound.
    pub progress_listen: Vec<SocketAddr>,
    /// Those bound when the host has them (`[::1]` with the default).
    pub progress_listen_if_available: Vec<SocketAddr>,
    /// What the watchdog trusts and presents when it calls the OMA.
    pub oma_tls: ClientTlsFiles,
    /// Connection cap (per listener) and timeouts.
    pub limits: Limits,
    /// The API token's file, re-read on SIGHUP.
    pub api_token_file: Option<PathBuf>,
    /// The OMA token's file, re-read on SIGHUP.
    pub oma_token_file: Option<PathBuf>,
}

/// Reads a token file again (SIGHUP), with the checks of the start: `what` names the flag
/// in errors, e.g. `--api-token`.
pub fn reread_token(file: &Path, what: &str) -> anyhow::Result<BearerToken> {
    super::secrets::token(None, Some(file), what)?
        .ok_or_else(|| anyhow::anyhow!("the {what} file {} gave no token", file.display()))
}

/// Validates the network flags against the API's `listen` flags and the OMA's URL.
pub fn load(
    args: &NetArgs,
    listen_given: &[SocketAddr],
    oma_url: Option<&str>,
) -> anyhow::Result<NetConfig> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => None,
    };
    if tls.is_some() && listen_given.is_empty() {
        bail!(
            "--tls-cert needs --listen: the address the OMA reaches over HTTPS, e.g. --listen 0.0.0.0:8443 (migratekit's progress stays on plain HTTP at --progress-listen, default 127.0.0.1:{DEFAULT_PORT})"
        );
    }
    let (progress_listen, progress_listen_if_available) =
        progress_addresses(&args.progress_listen, tls.is_some());
    check_progress_addresses(&progress_listen, listen_given)?;
    if oma_url.is_some_and(|url| url.starts_with("https://")) && args.oma_ca.is_none() {
        bail!(
            "an https:// --oma-url needs --oma-ca: the CA the OMA's certificate must chain to (the system's roots are not trusted)"
        );
    }
    if !(args.header_timeout_secs.is_finite() && args.header_timeout_secs > 0.0) {
        bail!("--header-timeout-secs must be a positive number of seconds");
    }
    Ok(NetConfig {
        tls,
        progress_listen,
        progress_listen_if_available,
        oma_tls: ClientTlsFiles {
            ca: args.oma_ca.clone(),
            cert: args.oma_client_cert.clone(),
            key: args.oma_client_key.clone(),
        },
        limits: Limits {
            max_connections: args.max_connections,
            header_read_timeout: Duration::from_secs_f64(args.header_timeout_secs),
            ..Limits::default()
        },
        api_token_file: None,
        oma_token_file: None,
    })
}

/// The progress listeners: those given, else with TLS the loopback pair on the port
/// migratekit posts to, else none (the API's own plain listeners serve progress then).
fn progress_addresses(given: &[SocketAddr], tls: bool) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    if !given.is_empty() {
        (given.to_vec(), Vec::new())
    } else if tls {
        (
            vec![SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT))],
            vec![SocketAddr::from((Ipv6Addr::LOCALHOST, DEFAULT_PORT))],
        )
    } else {
        (Vec::new(), Vec::new())
    }
}

/// A progress listener serves without TLS and without a token, so it must be reachable from
/// this host only, and must not collide with an API address.
fn check_progress_addresses(progress: &[SocketAddr], listen: &[SocketAddr]) -> anyhow::Result<()> {
    for p in progress {
        if !p.ip().is_loopback() {
            bail!(
                "--progress-listen {p} is not a loopback address; it serves without TLS, so give 127.0.0.1:<port> or [::1]:<port>"
            );
        }
        if let Some(l) = listen.iter().find(|l| overlaps(**l, *p)) {
            bail!(
                "--progress-listen {p} collides with --listen {l}; give the HTTPS API another port or a non-loopback address"
            );
        }
    }
    Ok(())
}

fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let wildcard = |ip: IpAddr| ip.is_unspecified();
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || wildcard(a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        net: NetArgs,
    }

    fn args(a: &[&str]) -> NetArgs {
        T::try_parse_from(std::iter::once("t").chain(a.iter().copied()))
            .unwrap()
            .net
    }

    #[test]
    fn tls_keeps_a_plain_loopback_listener_for_progress_on_migratekits_port() {
        let listen: SocketAddr = "0.0.0.0:8443".parse().unwrap();
        let tls = args(&["--tls-cert", "c", "--tls-key", "k"]);
        let net = load(&tls, &[listen], None).unwrap();
        assert_eq!(net.progress_listen, ["127.0.0.1:8081".parse().unwrap()]);
        assert_eq!(net.limits.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(net.limits.header_read_timeout, Duration::from_secs(30));
        let err = load(&tls, &[], None).unwrap_err();
        assert!(err.to_string().contains("needs --listen"), "{err}");
        let wide: SocketAddr = "0.0.0.0:8081".parse().unwrap();
        let err = load(&tls, &[wide], None).unwrap_err();
        assert!(err.to_string().contains("collides"), "{err}");
        let remote = args(&["--progress-listen", "10.0.0.1:8081"]);
        let err = load(&remote, &[], None).unwrap_err();
        assert!(err.to_string().contains("not a loopback"), "{err}");
        let plain = load(&args(&[]), &[], None).unwrap();
        assert!(plain.progress_listen.is_empty() && plain.tls.is_none());
    }

    #[test]
    fn an_https_oma_without_a_ca_is_refused() {
        let err = load(&args(&[]), &[], Some("https://oma:8082")).unwrap_err();
        assert!(err.to_string().contains("--oma-ca"), "{err}");
        let ok = load(
            &args(&["--oma-ca", "ca.pem"]),
            &[],
            Some("https://oma:8082"),
        );
        assert!(ok.unwrap().oma_tls.can_verify_servers());
        assert!(load(&args(&[]), &[], Some("http://oma:8082")).is_ok());
        assert!(
            T::try_parse_from(["t", "--oma-client-cert", "c"]).is_err(),
            "a client certificate needs its key"
        );
        assert!(load(&args(&["--header-timeout-secs", "0"]), &[], None).is_err());
    }
}
