//! `migratekit-gate <socket name>`: what a migratekit unit runs first. It waits for the
//! watchdog's go-ahead on the launch's socket, then execs migratekit in its own pid (see
//! `vma_watchdog::launcher::gate`). Without a go-ahead it exits 1 and migratekit never runs.

use std::process::ExitCode;

use vma_watchdog::launcher::gate;

fn main() -> ExitCode {
    let Some(name) = std::env::args_os().nth(1) else {
        eprintln!("usage: migratekit-gate <socket name>; started by vma-watchdog only");
        return ExitCode::from(2);
    };
    let error = match gate::receive(&name, gate::GATE_TIMEOUT) {
        Ok(command) => gate::exec(&command),
        Err(error) => error,
    };
    // No argument or environment value is printed: they carry the vCenter password.
    eprintln!("migratekit-gate: migratekit was not started: {error}");
    ExitCode::from(1)
}
