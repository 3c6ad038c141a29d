//! `vma-watchdog`: see `vma_watchdog::config::Cli` for the command line.

use std::process::ExitCode;

use anyhow::Context;
use vma_watchdog::config::{self, Config};
use vma_watchdog::{daemon, launcher, logging};

fn main() -> anyhow::Result<ExitCode> {
    // Before any file or directory is created (the configuration creates the state
    // directory): the registry, the outbox and the progress log are nobody else's to read.
    // migratekit gets the umask the watchdog was started with back (see the launcher).
    // SAFETY: umask(2) cannot fail.
    let started_with = unsafe { libc::umask(0o077) };
    // Before any thread starts: glibc picks a thread's malloc arena at its first allocation.
    let memory_tuned = vma_watchdog::memory::configure();
    launcher::set_child_umask(started_with);
    let config = Config::from_args()?;
    // The tokens are read: out of the environment with them, while no other thread can read
    // it, so that neither migratekit nor a reader of /proc/<pid>/environ finds them.
    // SAFETY: no thread has been started yet (the log's writer and the runtime come later).
    let scrubbed = unsafe { config::scrub_environment() };
    // systemd's notification socket, read and removed from the environment for the same
    // reason (migratekit must not talk to systemd in the watchdog's name).
    // SAFETY: still no thread but this one.
    let notify = unsafe { daemon_support::notify::take_from_env() };
    // Before any thread starts (the log's writer, the runtime's), so that they all inherit it.
    let niced = daemon_support::priority::set_nice(config.nice);
    // Held to the end of `main`, so that the last lines are written out.
    let _log = logging::init(config.log_format, config.log_queue_lines)?;
    config::log_deferred_warnings();
    tracing::info!(
        event = "memory_tuning",
        on = memory_tuned,
        arena_max = memory_tuned.then_some(vma_watchdog::memory::ARENA_MAX),
        "malloc arenas capped and freed heap returned after the detector loads, unless {}=off",
        vma_watchdog::memory::TUNING_ENV
    );
    daemon_support::notify::announce(notify);
    if !scrubbed.is_empty() {
        tracing::info!(event = "environment_scrubbed",
            variables = ?scrubbed.iter().map(|n| n.to_string_lossy()).collect::<Vec<_>>(),
            "removed the secret variables from the watchdog's environment once read");
    }
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
