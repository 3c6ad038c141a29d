//! Command line and configuration: the one place where the daemon's settings are read.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

use crate::logging::LogFormat;
use crate::procfs::COMM_MAX;

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
    /// Directory for the process registry and the event journal (created if missing).
    #[arg(long, env = "VMA_WATCHDOG_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Process name to watch (as the kernel shows it, at most 15 bytes); repeatable.
    #[arg(long = "match-name", default_value = "migratekit")]
    pub match_names: Vec<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Which detector to run.
    #[arg(long, value_enum, default_value_t = DetectorChoice::Auto)]
    pub detector: DetectorChoice,
    /// How often the procfs detector scans /proc for new processes, in milliseconds.
    #[arg(long, default_value_t = 500, hide = true)]
    pub scan_interval_ms: u64,
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
    /// Detector choice.
    pub detector: DetectorChoice,
    /// Scan interval of the procfs detector.
    pub scan_interval: Duration,
}

impl Config {
    /// Parses the process's own command line and loads the configuration.
    pub fn from_args() -> anyhow::Result<Self> {
        Self::load(Cli::parse())
    }

    /// Validates `cli` and prepares the state directory. Every error says what to change.
    pub fn load(cli: Cli) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cli.state_dir).with_context(|| {
            format!(
                "cannot create the state directory {}; give --state-dir a writable path",
                cli.state_dir.display()
            )
        })?;
        let state_dir = cli.state_dir.canonicalize().with_context(|| {
            format!(
                "cannot resolve the state directory {}",
                cli.state_dir.display()
            )
        })?;
        if !state_dir.is_dir() {
            bail!("--state-dir {} is not a directory", state_dir.display());
        }
        let mut match_names: Vec<String> = Vec::new();
        for name in cli.match_names {
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
        if cli.scan_interval_ms == 0 {
            bail!("--scan-interval-ms must be at least 1");
        }
        Ok(Self {
            state_dir,
            match_names,
            log_format: cli.log_format,
            detector: cli.detector,
            scan_interval: Duration::from_millis(cli.scan_interval_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vma-watchdog").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_watch_migratekit_with_auto_detection() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("new/state");
        let c = Config::load(cli(&["--state-dir", state.to_str().unwrap()])).unwrap();
        assert!(state.is_dir(), "the state directory is created");
        assert_eq!(c.match_names, ["migratekit"]);
        assert_eq!(c.detector, DetectorChoice::Auto);
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn options_are_parsed_and_names_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let c = Config::load(cli(&[
            "--state-dir",
            d,
            "--match-name",
            "a",
            "--match-name",
            "b",
            "--match-name",
            "a",
            "--log-format",
            "json",
            "--detector",
            "procfs",
        ]))
        .unwrap();
        assert_eq!(c.match_names, ["a", "b"]);
        assert_eq!(
            (c.log_format, c.detector),
            (LogFormat::Json, DetectorChoice::Procfs)
        );
    }

    #[test]
    fn bad_values_are_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let err = Config::load(cli(&[
            "--state-dir",
            d,
            "--match-name",
            "0123456789abcdefg",
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("first 15 bytes"), "{err}");
        let err = Config::load(cli(&["--state-dir", d, "--match-name", "/usr/bin/x"])).unwrap_err();
        assert!(err.to_string().contains("base name"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = Config::load(cli(&["--state-dir", file.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("state directory"), "{err:#}");
        assert!(
            Cli::try_parse_from(["vma-watchdog"]).is_err(),
            "--state-dir is required"
        );
        assert!(
            Cli::try_parse_from(["vma-watchdog", "--state-dir", d, "--detector", "x"]).is_err()
        );
    }
}
