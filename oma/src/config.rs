//! Command-line flags of the `oma` server (each also readable from the environment).

use crate::poller::{PollProtocol, PollerConfig};
use crate::recovery::RecoveryConfig;
use crate::server::{NetSettings, Settings};
use anyhow::Context;
use clap::Parser;
use daemon_support::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use transport::{ClientTlsFiles, ServerTlsFiles};

/// `oma`: replication jobs, VM contexts and evidence-based recovery.
#[derive(Parser)]
#[command(version, about)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "OMA_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`/metrics`, plain HTTP, no token), or
    /// `off`. Default 127.0.0.1:9182; when that port is taken the OMA runs without metrics
    /// and logs `metrics_unavailable`, while an address given here must be free.
    #[arg(long, env = "OMA_METRICS_LISTEN")]
    pub metrics_listen: Option<daemon_support::metrics::MetricsListen>,
    /// Database: a SQLite file path (created and migrated at start) or postgres://...
    #[arg(
        long,
        env = "OMA_DATABASE",
        default_value = "oma.db",
        hide_env_values = true
    )]
    pub database: String,
    /// Operator bearer token (repeatable; the environment takes a comma-separated list).
    #[arg(
        long = "operator-token",
        env = "OMA_OPERATOR_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub operator_tokens: Vec<String>,
    /// File with operator tokens, one per line.
    #[arg(long, env = "OMA_OPERATOR_TOKEN_FILE")]
    pub operator_token_file: Option<PathBuf>,
    /// Bearer token the OMA presents to VMA watchdogs.
    #[arg(long, env = "OMA_VMA_API_TOKEN", hide_env_values = true)]
    pub vma_api_token: Option<String>,
    /// File holding the token the OMA presents to VMA watchdogs.
    #[arg(long, env = "OMA_VMA_API_TOKEN_FILE")]
    pub vma_api_token_file: Option<PathBuf>,
    /// Timeout of each call to a VMA, seconds.
    #[arg(long, env = "OMA_VMA_TIMEOUT_SECS", default_value_t = 5.0)]
    pub vma_timeout_secs: f64,
    /// Seconds between periodic recovery runs.
    #[arg(long, env = "OMA_RECOVERY_INTERVAL_SECS", default_value_t = 60.0)]
    pub recovery_interval_secs: f64,
    /// Seconds without progress after which an unreachable VMA's job is failed.
    #[arg(long, env = "OMA_STALE_THRESHOLD_SECS", default_value_t = 1800.0)]
    pub stale_threshold_secs: f64,
    /// VMA questions in flight at once during recovery.
    #[arg(long, env = "OMA_RECOVERY_CONCURRENCY", default_value_t = 16)]
    pub recovery_concurrency: usize,
    /// Seconds between progress polls of a healthy job.
    #[arg(long, env = "OMA_POLL_INTERVAL_SECS", default_value_t = 5.0)]
    pub poll_interval_secs: f64,
    /// Cap of the poller's exponential backoff, seconds.
    #[arg(long, env = "OMA_POLL_MAX_BACKOFF_SECS", default_value_t = 300.0)]
    pub poll_max_backoff_secs: f64,
    /// Progress polls in flight per VMA.
    #[arg(long, env = "OMA_POLL_CONCURRENCY_PER_VMA", default_value_t = 4)]
    pub poll_concurrency_per_vma: usize,
    /// How progress is polled: `auto` asks each VMA's progress feed once per interval
    /// (falling back to one request per job for a watchdog without it), `per-job` asks one
    /// request per job as before the feed.
    #[arg(long, env = "OMA_POLL_PROTOCOL", value_enum, default_value_t = PollProtocol::Auto)]
    pub poll_protocol: PollProtocol,
    /// Seconds of unmoved bytes after which a live job is flagged stalled (never failed).
    #[arg(long, env = "OMA_STALL_THRESHOLD_SECS", default_value_t = 900.0)]
    pub stall_threshold_secs: f64,
    /// Seconds a VMA's polling lease lasts without renewal (several OMAs on one PostgreSQL
    /// database: a VMA is polled by the one OMA holding its lease, renewed every third of
    /// this; an OMA that dies or stalls loses its VMAs to the others after this long).
    #[arg(long, env = "OMA_POLL_LEASE_SECS", default_value_t = 15.0)]
    pub poll_lease_secs: f64,
    /// This OMA's name among the OMAs sharing a database, in `oma_instances` and the logs
    /// (default: the host name); each start also gets a random instance id.
    #[arg(long, env = "OMA_NAME")]
    pub oma_name: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "OMA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log lines that may wait for a slow or stuck stdout before new ones are dropped (and
    /// counted in `/health`).
    #[arg(long, env = "OMA_LOG_QUEUE_LINES", default_value_t = daemon_support::log_queue::DEFAULT_LINES,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub log_queue_lines: u32,
    /// CPU priority (nice value, -20 to 19). The default puts the OMA above the bulk
    /// replication work that shares its host, so that a death is committed at once; raising
    /// it needs root or CAP_SYS_NICE (otherwise a warning, and the OMA runs at normal priority).
    #[arg(long, env = "OMA_NICE", default_value_t = -10, allow_hyphen_values = true,
        value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub nice: i32,
    /// Serve HTTPS with this certificate chain (PEM; needs --tls-key). Re-read on SIGHUP.
    #[arg(long, env = "OMA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "OMA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require every client (VMAs, operators) to present a certificate signed by this CA
    /// (PEM): mutual TLS. Needs --tls-cert.
    #[arg(long, env = "OMA_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// CA that VMAs' HTTPS certificates must chain to (PEM); without it, `https://` VMAs are
    /// refused at registration. Re-read on SIGHUP.
    #[arg(long, env = "OMA_VMA_CA")]
    pub vma_ca: Option<PathBuf>,
    /// Certificate the OMA presents to VMAs that require one (PEM; needs --vma-client-key).
    #[arg(long, env = "OMA_VMA_CLIENT_CERT", requires = "vma_client_key")]
    pub vma_client_cert: Option<PathBuf>,
    /// Private key of --vma-client-cert (PEM).
    #[arg(long, env = "OMA_VMA_CLIENT_KEY", requires = "vma_client_cert")]
    pub vma_client_key: Option<PathBuf>,
    /// Connections served at once; more wait in the kernel's backlog.
    #[arg(long, env = "OMA_MAX_CONNECTIONS", default_value_t = transport::DEFAULT_MAX_CONNECTIONS,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// Seconds a connection has to send a request's headers; idle connections close after it.
    #[arg(long, env = "OMA_HEADER_TIMEOUT_SECS", default_value_t = 30.0)]
    pub header_timeout_secs: f64,
}

impl std::fmt::Debug for ServerArgs {
    /// Tokens and the database URL (which may carry a password) are left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerArgs")
            .field("listen", &self.listen)
            .field("database", &crate::server::redact_url(&self.database))
            .field("operator_tokens", &self.operator_tokens.len())
            .field("log_format", &self.log_format)
            .field("nice", &self.nice)
            .finish_non_exhaustive()
    }
}

fn secs(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("--{flag} must be a non-negative number of seconds"))
}

/// Reads a secret file, warning when other users may read it (the warning is logged, so it
/// must be called after logging starts: `ServerArgs::settings` is).
fn read_secret(path: &PathBuf) -> anyhow::Result<String> {
    warn_if_shared(path);
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "could not read token file {}; check the path and its permissions",
            path.display()
        )
    })
}

/// Logs a warning when `path` may be read by users other than its owner.
fn warn_if_shared(path: &std::path::Path) {
    if let Some(mode) = daemon_support::shared_mode(path) {
        tracing::warn!(event = "secret_file_shared", file = %path.display(),
            mode = format!("{mode:o}"),
            "a secret file may be read by other users; run `chmod 600` on it");
    }
}

/// The operator tokens: those given as flags or in the environment, then the file's (see
/// [`crate::auth::parse_tokens`] for the rules).
pub fn operator_tokens(flags: &[String], file: Option<&PathBuf>) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::new();
    for token in flags {
        tokens.extend(crate::auth::parse_tokens("--operator-token", token)?);
    }
    if let Some(path) = file {
        let text = read_secret(path)?;
        tokens.extend(crate::auth::parse_tokens(
            &path.display().to_string(),
            &text,
        )?);
    }
    Ok(tokens)
}

/// The token presented to VMAs: the file's first line when a file is given.
pub fn vma_api_token(
    flag: Option<&String>,
    file: Option<&PathBuf>,
) -> anyhow::Result<Option<String>> {
    match file {
        Some(path) => Ok(Some(read_secret(path)?.trim().to_owned())),
        None => Ok(flag.cloned()),
    }
}

/// `--poll-lease-secs`, which must be positive: a lease of zero would never be owned.
fn lease_period(value: f64) -> anyhow::Result<Duration> {
    let period = secs(value, "poll-lease-secs")?;
    if period < Duration::from_millis(30) {
        anyhow::bail!("--poll-lease-secs must be at least 0.03 (renewals come every third)");
    }
    Ok(period)
}

/// The host name, the default `--oma-name`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "oma".to_owned())
}

impl ServerArgs {
    /// What is re-read on SIGHUP: token files and TLS files.
    fn net(&self) -> anyhow::Result<NetSettings> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        };
        if let Some(key) = &self.tls_key {
            warn_if_shared(key);
        }
        Ok(NetSettings {
            tls,
            vma_tls: ClientTlsFiles {
                ca: self.vma_ca.clone(),
                cert: self.vma_client_cert.clone(),
                key: self.vma_client_key.clone(),
            },
            limits: transport::Limits {
                max_connections: self.max_connections,
                header_read_timeout: secs(self.header_timeout_secs, "header-timeout-secs")?,
                ..transport::Limits::default()
            },
            operator_token_flags: self.operator_tokens.clone(),
            operator_token_file: self.operator_token_file.clone(),
            vma_api_token_flag: self.vma_api_token.clone(),
            vma_api_token_file: self.vma_api_token_file.clone(),
        })
    }

    /// Resolves token files and durations into [`Settings`].
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let operator_tokens =
            operator_tokens(&self.operator_tokens, self.operator_token_file.as_ref())?;
        let vma_api_token = vma_api_token(
            self.vma_api_token.as_ref(),
            self.vma_api_token_file.as_ref(),
        )?;
        Ok(Settings {
            net: self.net()?,
            database: self.database.clone(),
            operator_tokens,
            vma_api_token,
            vma_timeout: secs(self.vma_timeout_secs, "vma-timeout-secs")?,
            recovery: RecoveryConfig {
                interval: secs(self.recovery_interval_secs, "recovery-interval-secs")?,
                stale_threshold: secs(self.stale_threshold_secs, "stale-threshold-secs")?,
                concurrency: self.recovery_concurrency,
            },
            lease: crate::lease::LeaseConfig {
                period: lease_period(self.poll_lease_secs)?,
                name: self.oma_name.clone().unwrap_or_else(host_name),
            },
            poller: PollerConfig {
                interval: secs(self.poll_interval_secs, "poll-interval-secs")?,
                max_backoff: secs(self.poll_max_backoff_secs, "poll-max-backoff-secs")?,
                per_vma_concurrency: self.poll_concurrency_per_vma,
                stall_threshold: secs(self.stall_threshold_secs, "stall-threshold-secs")?,
            },
            poll_protocol: self.poll_protocol,
        })
    }
}
