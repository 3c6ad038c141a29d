//! The `oma` server binary: parse flags, set up logging, serve until Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::Parser;
use oma::config::ServerArgs;
use tokio::signal::unix::{SignalKind, signal};

fn main() -> anyhow::Result<()> {
    let args = ServerArgs::parse();
    // systemd's notification socket, read and removed from the environment before any thread
    // starts. SAFETY: no thread has been started yet.
    let notify = unsafe { daemon_support::notify::take_from_env() };
    // Everything the OMA creates (the SQLite database, its WAL and shared-memory files) is
    // its own: jobs, VMAs' token hashes and the audit trail are nobody else's to read.
    // SAFETY: umask(2) cannot fail.
    unsafe { libc::umask(0o077) };
    // Before any thread starts (the log's writer, the runtime's), so that they all inherit it.
    // A death's commit is a chain of short steps on several threads (HTTP, the database's
    // worker, the fsync); at normal priority each may wait behind bulk work for its turn on a
    // busy host.
    let niced = daemon_support::priority::set_nice(args.nice);
    // Held to the end of `main`, when the queued lines are written out.
    let _log = oma::logging::init(args.log_format, args.log_queue_lines);
    daemon_support::notify::announce(notify);
    if let Err(error) = niced {
        tracing::warn!(event = "priority_not_set", nice = args.nice, %error,
            "cannot set the OMA's CPU priority; deaths may be committed late on a busy host; run with CAP_SYS_NICE (systemd: Nice=) or pass --nice 0");
    } else {
        tracing::info!(event = "priority_set", nice = args.nice, "CPU priority set");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "could not listen on {}; is another oma running?",
                args.listen
            )
        })?;
    let metrics = daemon_support::metrics::bind(
        args.metrics_listen,
        oma::metrics::DEFAULT_LISTEN
            .parse()
            .expect("a valid address"),
    )
    .await?;
    let server = oma::server::start_with_metrics(settings, listener, metrics)
        .await
        .context("oma could not start")?;
    let mut term =
        signal(SignalKind::terminate()).context("could not install the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("could not install the SIGHUP handler")?;
    let (status_stop, status_stopped) = tokio::sync::oneshot::channel::<()>();
    oma::systemd::ready(&server.state, async {
        let _ = status_stopped.await;
    });
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            // Token and TLS files re-read in place: connections and requests go on.
            _ = hup.recv() => {
                tracing::info!(event = "reload_requested", "SIGHUP: re-reading token and TLS files");
                daemon_support::notify::reloading();
                let _ = server.reload();
                daemon_support::notify::reloaded();
            }
        }
    }
    tracing::info!("shutting down");
    daemon_support::notify::stopping();
    drop(status_stop);
    server.shutdown().await;
    Ok(())
}
