//! `job-recovery`: see `oma::cli`.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = oma::cli::CliArgs::parse();
    match oma::cli::run(&args).await {
        Ok(output) => {
            print!("{output}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("job-recovery: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
