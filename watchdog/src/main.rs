//! `vma-watchdog`: see `vma_watchdog::config::Cli` for the command line.

use std::process::ExitCode;

use anyhow::Context;
use vma_watchdog::{config::Config, daemon, logging};

fn main() -> anyhow::Result<ExitCode> {
    let config = Config::from_args()?;
    // Before any thread starts (the log's writer, the runtime's), so that they all inherit it.
    let niced = daemon_support::priority::set_nice(config.nice);
    // Held to the end of `main`, so that the last lines are written out.
    let _log = logging::init(config.log_format, config.log_queue_lines)?;
    match niced {
        Ok(()) => tracing::info!(
            event = "priority_set",
            nice = config.nice,
            "CPU priority set"
        ),
        Err(e) => tracing::warn!(event = "priority_not_set", nice = config.nice, error = %e,
            "cannot set the watchdog's CPU priority; deaths may be reported late on busy cores; run as root (or with CAP_SYS_NICE), or pass --nice 0"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let shutdown =
            daemon::shutdown_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
        daemon::run(config, shutdown)
            .await
            .context("the watchdog failed")
    });
    // The failure goes to the log only, not to stderr a second time from `main`'s `Err`: with
    // a stuck stderr that write would never return, and the watchdog never exit.
    match result {
        Ok(()) => {
            tracing::info!(event = "watchdog_stopped", "watchdog stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            tracing::error!(
                event = "watchdog_failed",
                error = format!("{e:#}"),
                "watchdog failed"
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
