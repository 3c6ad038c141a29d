//! `cargo xtask`: the project's own tasks. See `cargo xtask --help`.

mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Project tasks for the MigrateKit OSSEA job-recovery system")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every check CI runs: formatting, lints, unit, integration and privileged tests.
    Test(test::TestArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Test(args) => test::run(&args),
    }
}
