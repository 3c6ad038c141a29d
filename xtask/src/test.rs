//! `cargo xtask test`: the README's test command, and what CI runs.

use anyhow::Context;
use clap::Args;

use crate::util::{self, cargo, is_root};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// CI mode: a skipped privileged or PostgreSQL test is a failure, not a skip.
    #[arg(long)]
    ci: bool,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    if args.ci && !is_root() {
        anyhow::bail!(
            "CI runs the privileged tests and must run as root; run `sudo -E cargo xtask test --ci`"
        );
    }
    util::run(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    util::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found problems: fix them before committing")?;
    util::run(cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]))
        .context("tests failed: the output above says which")?;
    Ok(())
}
