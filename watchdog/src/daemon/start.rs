//! Choosing and starting the detector, and the shutdown signal.

use std::future::Future;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::{Config, DetectorChoice};
use crate::detector::ebpf::{EbpfDetector, EbpfError};
use crate::detector::procfs::{ProcfsDetector, ProcfsError};
use crate::detector::{Detector, DetectorEvent};

/// No detector could be started.
#[derive(Debug, thiserror::Error)]
pub enum DetectorStartError {
    /// The eBPF programs could not be loaded or attached; the error says why and what to do.
    #[error("the eBPF detector failed to start: {0} (or run with --detector procfs)")]
    Ebpf(#[from] EbpfError),
    /// The procfs fallback could not start either.
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
}

/// A running detector and its events.
pub(super) struct Started {
    pub(super) detector: Arc<dyn Detector>,
    pub(super) events: mpsc::Receiver<DetectorEvent>,
}

/// Starts the detector `config` asks for; `auto` tries eBPF and falls back to procfs. The log
/// says which one runs and why.
pub(super) fn detector(config: &Config) -> Result<Started, DetectorStartError> {
    match config.detector {
        DetectorChoice::Procfs => {
            tracing::info!(
                event = "detector_selected",
                detector = "procfs",
                reason = "chosen with --detector procfs",
                "using the procfs detector"
            );
            procfs(config)
        }
        DetectorChoice::Ebpf => {
            let started = ebpf(config)?;
            tracing::info!(
                event = "detector_selected",
                detector = "ebpf",
                reason = "chosen with --detector ebpf",
                "using the eBPF detector"
            );
            Ok(started)
        }
        DetectorChoice::Auto => match ebpf(config) {
            Ok(started) => {
                tracing::info!(
                    event = "detector_selected",
                    detector = "ebpf",
                    reason = "eBPF loaded",
                    "using the eBPF detector"
                );
                Ok(started)
            }
            Err(e) => {
                tracing::warn!(event = "detector_selected", detector = "procfs", reason = %e,
                    "eBPF is not usable; falling back to the procfs detector (deaths are still seen, exit status only where the kernel keeps it)");
                procfs(config)
            }
        },
    }
}

fn procfs(config: &Config) -> Result<Started, DetectorStartError> {
    let (detector, events) =
        ProcfsDetector::start(config.match_names.clone(), config.scan_interval)?;
    Ok(Started {
        detector: Arc::new(detector),
        events,
    })
}

/// The eBPF detector: tracepoints on process exec and exit, filtered in the kernel.
fn ebpf(config: &Config) -> Result<Started, DetectorStartError> {
    let (detector, events) = EbpfDetector::start(&config.match_names)?;
    Ok(Started {
        detector: Arc::new(detector),
        events,
    })
}

/// Completes at the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "received SIGTERM"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "received SIGINT"),
        }
    })
}
