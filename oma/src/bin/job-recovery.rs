//! `job-recovery`: see `oma::cli`.

use clap::Parser;
use oma::cli::{CliArgs, seed};
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The seed's Go syntax (`-action=scan`) is rewritten into the subcommand form first, so
    // that the operators' runbooks keep working; refusals exit 2, as clap's usage errors do.
    let args = match seed::translate(&argv) {
        Ok(None) => CliArgs::parse_from(argv),
        Ok(Some(translated)) => {
            eprintln!("job-recovery: {}", translated.hint);
            CliArgs::parse_from(translated.args)
        }
        Err(e) => {
            eprintln!("job-recovery: {e}");
            return ExitCode::from(2);
        }
    };
    match oma::cli::run(&args).await {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("job-recovery: {e}");
            ExitCode::FAILURE
        }
    }
}
