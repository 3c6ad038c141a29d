//! Project tasks: `cargo xtask <command>`. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

mod appliance;
mod bench;
mod build_ebpf;
mod contract;
mod disk;
// Shared with watchdog/build.rs, which checks the stamp this crate writes.
#[path = "../../watchdog/build/ebpf_stamp.rs"]
#[allow(
    dead_code,
    reason = "the freshness check is the build script's; xtask only writes the stamp"
)]
mod ebpf_stamp;
mod kill_test;
mod package;
mod paths;
mod postgres;
mod run;
mod setup;
mod soak;
mod test;
mod vm;

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    about = "Project tasks for the VMA watchdog and the OMA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what this machine lacks to build the eBPF programs (idempotent).
    Setup,
    /// Build the eBPF object that vma-watchdog embeds.
    BuildEbpf,
    /// Run a benchmark and print its figures.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// The README's run command: OMA (SQLite) + watchdog on this machine with a demo job.
    Run(run::RunArgs),
    /// Kill tests: every way a replication can die, with real processes, restarts and cuts.
    KillTest(kill_test::KillTestArgs),
    /// A long random fault schedule its seed reproduces, invariants checked all the time.
    Soak(soak::SoakArgs),
    /// Schemathesis against both daemons started on loopback, from the committed OpenAPI
    /// documents (docs/openapi/), with every check and stateful links.
    Contract(contract::ContractArgs),
    /// Build the Debian packages (vma-watchdog, oma) with cargo-deb; `--check` checks them.
    Package(package::PackageArgs),
    /// Both packages on Debian 12 booted with systemd as PID 1 in a qemu VM (root).
    ApplianceTest(appliance::ApplianceArgs),
    /// The README's test command and what CI runs: set-up, eBPF build, formatting, lints, all tests.
    Test(test::TestArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => build_ebpf::run(),
        Command::Bench { which } => bench::run(which),
        Command::Test(args) => test::run(&args),
        Command::Contract(args) => contract::run(&args),
        Command::Run(args) => run::run(&args),
        Command::KillTest(args) => kill_test::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Package(args) => package::run(&args).map(|_| ()),
        Command::ApplianceTest(args) => appliance::run(&args),
    }
}
