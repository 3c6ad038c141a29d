//! `cargo xtask test`: the README's test command, and what CI runs (`.ci/run`).
//!
//! It first installs and starts what the tests need, so that a fresh machine needs nothing
//! else: the eBPF toolchain and tracefs (`setup`), the eBPF object (`build-ebpf`).

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{build_ebpf, paths, setup};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// CI mode: privileged tests must run (root) and PostgreSQL tests must not be skipped.
    #[arg(long)]
    ci: bool,
}

pub fn run(args: &TestArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if args.ci && !root {
        bail!(
            "CI runs the privileged tests and must run as root: run `sudo -E cargo xtask test --ci`"
        );
    }
    setup::run().context("setting up the toolchain for the tests")?;
    build_ebpf::run().context("building the eBPF object the watchdog embeds")?;
    let cargo = || {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(paths::workspace_root());
        cmd
    };
    setup::status(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    setup::status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems: fix them before committing")?;
    setup::status(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))
        .context("tests failed: the output above says which")?;
    println!("test: all checks passed");
    Ok(())
}
