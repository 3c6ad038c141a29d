//! Command line and configuration: the one place where the daemon's settings are read.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use crate::launcher::LauncherConfig;
use crate::logging::LogFormat;
use crate::outbox::{FlushOrder, OutboxLimits};
use crate::proc_reader::COMM_MAX;
use crate::secret::BearerToken;

mod launch;
mod net;
mod secrets;

pub use net::{NetArgs, NetConfig, reread_token};
pub use secrets::{
    SecretArg, is_secret_variable, log_deferred_warnings, scrub_environment,
    unguessable as unguessable_token,
};

/// Port of the API by default: the one migratekit's progress client posts to.
pub const DEFAULT_PORT: u16 = 8081;

/// Which detector to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DetectorChoice {
    /// eBPF when it loads, else the procfs fallback (the log says why).
    Auto,
    /// eBPF only; fail to start without it.
    Ebpf,
    /// The procfs/pidfd fallback only.
    Procfs,
}

/// `vma-watchdog`: sees every migratekit death on the VMA and records it for the OMA.
#[derive(Debug, Clone, Parser)]
#[command(name = "vma-watchdog", version, about)]
pub struct Cli {
    /// Directory for the process registry, the outbox of events and the progress store
    /// (created if missing).
    #[arg(long, env = "VMA_WATCHDOG_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Process name to watch (as the kernel shows it, at most 15 bytes); repeatable.
    #[arg(long = "match-name", default_value = "migratekit")]
    pub match_names: Vec<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log lines that may wait for a slow or stuck stderr before new ones are dropped (and
    /// counted in `/health`).
    #[arg(long, default_value_t = daemon_support::log_queue::DEFAULT_LINES,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub log_queue_lines: u32,
    /// Which detector to run.
    #[arg(long, value_enum, default_value_t = DetectorChoice::Auto)]
    pub detector: DetectorChoice,
    /// How often the procfs detector scans /proc for new processes, in milliseconds.
    #[arg(long, default_value_t = 500, hide = true)]
    pub scan_interval_ms: u64,
    /// How long after a death the registry's file is rewritten, in milliseconds (the death is
    /// durable in the outbox at once; see docs/WATCHDOG.md). Longer values write bursts once.
    #[arg(long, default_value_t = crate::registry::FLUSH_DELAY.as_millis() as u64, hide = true)]
    pub registry_flush_ms: u64,
    /// Address of the REST API; repeatable. Default 127.0.0.1:8081, plus `[::1]:8081` when the
    /// host has IPv6 loopback (migratekit posts to http://localhost:8081).
    #[arg(long)]
    pub listen: Vec<SocketAddr>,
    /// Address of the Prometheus metrics endpoint (`/metrics`, plain HTTP, no token), or
    /// `off`. Default 127.0.0.1:9181; when that port is taken the watchdog runs without
    /// metrics and logs `metrics_unavailable`, while an address given here must be free.
    #[arg(long, env = "VMA_WATCHDOG_METRICS_LISTEN")]
    pub metrics_listen: Option<daemon_support::metrics::MetricsListen>,
    /// Bearer token the OMA presents to this API. Without one (here, in the file or in the
    /// environment) every call but /health and progress updates is refused.
    #[arg(long, env = "VMA_WATCHDOG_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<SecretArg>,
    /// File holding the API token (one line).
    #[arg(long, env = "VMA_WATCHDOG_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Base URL of the OMA, e.g. http://oma:8082. Repeatable (or a comma-separated list, as
    /// in the environment) for several OMAs on one database, in order of preference: deaths
    /// go to the first that answers, and move on when it is unreachable or fails (5xx).
    /// Without it deaths are kept in the outbox on disk and not delivered.
    #[arg(long, env = "VMA_WATCHDOG_OMA_URL", value_delimiter = ',')]
    pub oma_url: Vec<String>,
    /// This VMA's id at the OMA (default: the host name).
    #[arg(long, env = "VMA_WATCHDOG_VMA_ID")]
    pub vma_id: Option<String>,
    /// Bearer token this watchdog presents to the OMA.
    #[arg(long, env = "VMA_WATCHDOG_OMA_TOKEN", hide_env_values = true)]
    pub oma_token: Option<SecretArg>,
    /// File holding the OMA token (one line).
    #[arg(long, env = "VMA_WATCHDOG_OMA_TOKEN_FILE")]
    pub oma_token_file: Option<PathBuf>,
    /// Longest wait between two delivery attempts while the OMA fails, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub oma_max_backoff_ms: u64,
    /// At most this many undelivered events on disk.
    #[arg(long, default_value_t = OutboxLimits::default().max_events)]
    pub outbox_max_events: u64,
    /// At most this many bytes of undelivered events on disk.
    #[arg(long, default_value_t = OutboxLimits::default().max_bytes)]
    pub outbox_max_bytes: u64,
    /// When a new event's delivery to the OMA starts: `parallel` (while the outbox's
    /// fdatasync runs: one flush on a death's path) or `serial` (after it, the old order).
    /// Either way an event is forgotten only once acknowledged and flushed.
    #[arg(long, env = "VMA_WATCHDOG_OUTBOX_FLUSH_ORDER", value_enum, default_value_t = FlushOrder::Parallel)]
    pub outbox_flush_order: FlushOrder,
    /// JSON file with the migratekit program, its argument template and vCenter
    /// credentials (see docs/WATCHDOG.md). Excludes --launch-program and --launch-arg.
    #[arg(long, env = "VMA_WATCHDOG_LAUNCH_CONFIG")]
    pub launch_config: Option<PathBuf>,
    /// The migratekit program (default: `migratekit` next to this binary, else on PATH).
    #[arg(long)]
    pub launch_program: Option<PathBuf>,
    /// One argument of the template, with {job_id}, {vm_path}, ... placeholders; repeatable.
    /// Default: migrate --job-id {job_id}.
    #[arg(long = "launch-arg", allow_hyphen_values = true)]
    pub launch_args: Vec<String>,
    /// Directory for each launched job's output ({job_id}.log); default: discarded.
    #[arg(long)]
    pub launch_log_dir: Option<PathBuf>,
    /// Never start migratekit in a transient systemd service, even when systemd runs.
    #[arg(long)]
    pub launch_no_systemd: bool,
    /// The watchdog's CPU priority (nice value, -20 to 19). The default puts it above the
    /// migratekit processes it watches, so that a death is reported at once on busy cores.
    #[arg(long, env = "VMA_WATCHDOG_NICE", default_value_t = daemon_support::priority::DEFAULT_NICE, allow_hyphen_values = true)]
    pub nice: i32,
    /// The nice value migratekit processes are started with.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub launch_nice: i32,
    /// The migratekit binary: only a process running this file (compared by device and inode)
    /// is adopted as a job's process. Default: the launcher's program. Give it when the
    /// program is a wrapper that execs migratekit.
    #[arg(long, env = "VMA_WATCHDOG_MIGRATEKIT_PATH")]
    pub migratekit_path: Option<PathBuf>,
    /// The uid migratekit runs as: a process of another user is not adopted. Default: the
    /// watchdog's own (the launcher starts migratekit as it).
    #[arg(long, env = "VMA_WATCHDOG_MIGRATEKIT_UID")]
    pub migratekit_uid: Option<u32>,
    /// TLS both ways, the progress listener, connection bounds (`config/net.rs`).
    #[command(flatten)]
    pub net: NetArgs,
}

/// Where and how deaths are delivered to the OMA.
#[derive(Debug, Clone)]
pub struct OmaConfig {
    /// Base URL, or several comma-separated, in order of preference.
    pub url: String,
    /// Token the watchdog presents.
    pub token: BearerToken,
    /// Cap of the retry delay.
    pub max_backoff: Duration,
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory (exists, is a directory).
    pub state_dir: PathBuf,
    /// Process names to watch, each at most 15 bytes, no duplicates.
    pub match_names: Vec<String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log lines that may wait for stderr.
    pub log_queue_lines: u32,
    /// Detector choice.
    pub detector: DetectorChoice,
    /// Scan interval of the procfs detector.
    pub scan_interval: Duration,
    /// Delay of the registry's writer after a death.
    pub registry_flush_delay: Duration,
    /// The watchdog's nice value.
    pub nice: i32,
    /// Addresses the API must listen on.
    pub listen: Vec<SocketAddr>,
    /// Addresses it listens on when it can (`[::1]` with the default address).
    pub listen_if_available: Vec<SocketAddr>,
    /// Where metrics are served: `None` for the default address (skipped when taken).
    pub metrics_listen: Option<daemon_support::metrics::MetricsListen>,
    /// Token the OMA presents; `None` refuses every protected call.
    pub api_token: Option<BearerToken>,
    /// The OMA, when deaths are to be delivered.
    pub oma: Option<OmaConfig>,
    /// This VMA's id.
    pub vma_id: String,
    /// Bounds of the outbox.
    pub outbox_limits: OutboxLimits,
    /// When a new event's delivery starts (`--outbox-flush-order`).
    pub outbox_flush_order: FlushOrder,
    /// How migratekit is started.
    pub launcher: LauncherConfig,
    /// TLS, the progress listener, connection bounds, and the files re-read on SIGHUP.
    pub net: NetConfig,
}

impl Config {
    /// Parses the process's own command line and loads the configuration.
    pub fn from_args() -> anyhow::Result<Self> {
        Self::load(Cli::parse())
    }

    /// Validates `cli` and prepares the state directory. Every error says what to change.
    pub fn load(cli: Cli) -> anyhow::Result<Self> {
        let state_dir = prepare_state_dir(&cli.state_dir)?;
        let match_names = check_match_names(cli.match_names)?;
        if cli.scan_interval_ms == 0 {
            bail!("--scan-interval-ms must be at least 1");
        }
        let (listen, listen_if_available) = listen_addresses(&cli.listen);
        // The network checks look at an https:// URL among them, if any (it needs --oma-ca).
        let some_url =
            (cli.oma_url.iter().find(|u| u.starts_with("https://"))).or(cli.oma_url.first());
        let mut net = net::load(&cli.net, &cli.listen, some_url.map(String::as_str))?;
        net.api_token_file.clone_from(&cli.api_token_file);
        net.oma_token_file.clone_from(&cli.oma_token_file);
        let api_token = secrets::token(
            cli.api_token.as_ref(),
            cli.api_token_file.as_deref(),
            "--api-token",
        )?;
        let oma_token = secrets::token(
            cli.oma_token.as_ref(),
            cli.oma_token_file.as_deref(),
            "--oma-token",
        )?;
        let oma = oma_config(&cli.oma_url, oma_token, cli.oma_max_backoff_ms)?;
        let vma_id = vma_id(cli.vma_id)?;
        if cli.outbox_max_events == 0 || cli.outbox_max_bytes < 4096 {
            bail!("--outbox-max-events must be at least 1 and --outbox-max-bytes at least 4096");
        }
        let launcher = launch::load(&launch::LaunchFlags {
            file: cli.launch_config.as_deref(),
            program: cli.launch_program.as_deref(),
            args: &cli.launch_args,
            log_dir: cli.launch_log_dir.as_deref(),
            no_systemd: cli.launch_no_systemd,
            nice: daemon_support::priority::check("--launch-nice", cli.launch_nice)
                .map_err(anyhow::Error::msg)?,
            match_names: &match_names,
            migratekit_path: cli.migratekit_path.as_deref(),
            migratekit_uid: cli.migratekit_uid,
        })?;
        let nice =
            daemon_support::priority::check("--nice", cli.nice).map_err(anyhow::Error::msg)?;
        Ok(Self {
            state_dir,
            match_names,
            log_format: cli.log_format,
            log_queue_lines: cli.log_queue_lines,
            detector: cli.detector,
            scan_interval: Duration::from_millis(cli.scan_interval_ms),
            registry_flush_delay: Duration::from_millis(cli.registry_flush_ms),
            nice,
            listen,
            listen_if_available,
            metrics_listen: cli.metrics_listen,
            api_token,
            oma,
            vma_id,
            outbox_limits: OutboxLimits {
                max_events: cli.outbox_max_events,
                max_bytes: cli.outbox_max_bytes,
            },
            outbox_flush_order: cli.outbox_flush_order,
            launcher,
            net,
        })
    }
}

/// Creates the state directory when missing and returns its canonical path.
fn prepare_state_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the state directory {}; give --state-dir a writable path",
            dir.display()
        )
    })?;
    let state_dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve the state directory {}", dir.display()))?;
    if !state_dir.is_dir() {
        bail!("--state-dir {} is not a directory", state_dir.display());
    }
    Ok(state_dir)
}

/// Where and how to deliver to the OMA: nothing without `--oma-url`, and an error when the
/// URL is given without the token this VMA presents. Several URLs are kept comma-separated
/// (see `crate::outbox::omas`).
fn oma_config(
    urls: &[String],
    token: Option<BearerToken>,
    max_backoff_ms: u64,
) -> anyhow::Result<Option<OmaConfig>> {
    let urls: Vec<String> = urls
        .iter()
        .filter(|u| !u.trim().is_empty())
        .cloned()
        .collect();
    let url = (!urls.is_empty()).then_some(urls);
    Ok(match (url, token) {
        (Some(urls), Some(token)) => Some(OmaConfig {
            url: (urls.iter().map(|u| check_url(u.trim())))
                .collect::<anyhow::Result<Vec<_>>>()?
                .join(","),
            token,
            max_backoff: Duration::from_millis(max_backoff_ms.max(1)),
        }),
        (Some(_), None) => bail!(
            "--oma-url needs the token this VMA presents to the OMA: give --oma-token-file (or --oma-token, or VMA_WATCHDOG_OMA_TOKEN)"
        ),
        (None, _) => None,
    })
}

/// The `--match-name`s, each a process name the kernel can show, without duplicates.
fn check_match_names(names: Vec<String>) -> anyhow::Result<Vec<String>> {
    let mut match_names: Vec<String> = Vec::new();
    for name in names {
        if name.is_empty() || name.contains('/') || name.contains('\0') {
            bail!(
                "--match-name {name:?} is not a process name; give the executable's base name, e.g. migratekit"
            );
        }
        if name.len() > COMM_MAX {
            bail!(
                "--match-name {name:?} is longer than the {COMM_MAX} bytes the kernel keeps of a process name; give its first {COMM_MAX} bytes"
            );
        }
        if !match_names.contains(&name) {
            match_names.push(name);
        }
    }
    Ok(match_names)
}

/// The addresses the API must listen on and those it listens on when it can: an explicit
/// `--listen` replaces the default pair of loopback addresses.
fn listen_addresses(listen: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    if listen.is_empty() {
        (
            vec![SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_PORT))],
            vec![SocketAddr::from((Ipv6Addr::LOCALHOST, DEFAULT_PORT))],
        )
    } else {
        (listen.to_vec(), Vec::new())
    }
}

fn check_url(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => {
            Ok(url.trim_end_matches('/').to_owned())
        }
        _ => bail!(
            "--oma-url {url:?} is not an http:// or https:// URL with a host, e.g. http://oma:8082"
        ),
    }
}

/// `--vma-id`, else the host name.
fn vma_id(given: Option<String>) -> anyhow::Result<String> {
    match given {
        Some(id) if !id.trim().is_empty() => Ok(id),
        Some(_) => bail!("--vma-id is empty; give this VMA's id as registered at the OMA"),
        None => Ok(hostname()),
    }
}

/// The host name, this VMA's default id.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vma".to_owned())
}

#[cfg(test)]
mod tests;
