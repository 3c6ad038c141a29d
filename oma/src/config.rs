//! Command-line flags of the `oma` server (each also readable from the environment).

use crate::poller::PollerConfig;
use crate::recovery::RecoveryConfig;
use crate::server::Settings;
use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `oma`: replication jobs, VM contexts and evidence-based recovery.
#[derive(Parser)]
#[command(version, about)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "OMA_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: SocketAddr,
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
    /// Seconds of unmoved bytes after which a live job is flagged stalled (never failed).
    #[arg(long, env = "OMA_STALL_THRESHOLD_SECS", default_value_t = 900.0)]
    pub stall_threshold_secs: f64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "OMA_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Log lines that may wait for a slow or stuck stdout before new ones are dropped (and
    /// counted in `/health`).
    #[arg(long, env = "OMA_LOG_QUEUE_LINES", default_value_t = log_queue::DEFAULT_LINES,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub log_queue_lines: u32,
    /// CPU priority (nice value, -20 to 19). The default puts the OMA above the bulk
    /// replication work that shares its host, so that a death is committed at once; raising
    /// it needs root or CAP_SYS_NICE (otherwise a warning, and the OMA runs at normal priority).
    #[arg(long, env = "OMA_NICE", default_value_t = -10, allow_hyphen_values = true,
        value_parser = clap::value_parser!(i32).range(-20..=19))]
    pub nice: i32,
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

fn read_secret(path: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "could not read token file {}; check the path and its permissions",
            path.display()
        )
    })
}

impl ServerArgs {
    /// Resolves token files and durations into [`Settings`].
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut operator_tokens = self.operator_tokens.clone();
        if let Some(path) = &self.operator_token_file {
            operator_tokens.extend(read_secret(path)?.lines().map(str::to_owned));
        }
        let vma_api_token = match &self.vma_api_token_file {
            Some(path) => Some(read_secret(path)?.trim().to_owned()),
            None => self.vma_api_token.clone(),
        };
        Ok(Settings {
            database: self.database.clone(),
            operator_tokens,
            vma_api_token,
            vma_timeout: secs(self.vma_timeout_secs, "vma-timeout-secs")?,
            recovery: RecoveryConfig {
                interval: secs(self.recovery_interval_secs, "recovery-interval-secs")?,
                stale_threshold: secs(self.stale_threshold_secs, "stale-threshold-secs")?,
                concurrency: self.recovery_concurrency,
            },
            poller: PollerConfig {
                interval: secs(self.poll_interval_secs, "poll-interval-secs")?,
                max_backoff: secs(self.poll_max_backoff_secs, "poll-max-backoff-secs")?,
                per_vma_concurrency: self.poll_concurrency_per_vma,
                stall_threshold: secs(self.stall_threshold_secs, "stall-threshold-secs")?,
            },
        })
    }
}
