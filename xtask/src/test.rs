//! `cargo xtask test`: the README's test command, and what CI runs (`.ci/run`).
//!
//! It first installs and starts what the tests need, so that a fresh machine needs nothing
//! else: the eBPF toolchain and tracefs (`setup`), the eBPF object (`build-ebpf`), and a
//! PostgreSQL server for the OMA's store tests. After the test suites it runs the contract
//! tests (Schemathesis on both daemons, `cargo xtask contract`) and the kill tests
//! (`cargo xtask kill-test`, see docs/RELIABILITY.md): on this machine's kernel with each
//! detector and once with the OMA on PostgreSQL, then a short soak (`cargo xtask soak`, 500
//! faults, a fresh seed), then in a qemu VM on Debian 12's 6.1 kernel (`kill-test --vm`); and,
//! as root, both Debian packages on that VM booted with systemd (`cargo xtask appliance-test`).

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{
    appliance, build_ebpf, contract, disk, kill_test, package, paths, postgres, run as run_cmd,
    setup, soak,
};

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
    let workspace = paths::workspace_root();
    disk::warn_if_low(&workspace, disk::TEST_NEEDS, "test");
    // When a step fails on a full disk, say that first: rustc and ld report it as an I/O
    // error on their output or a bus error, which points nowhere near the cause.
    steps(args, root).map_err(|err| match disk::check_room(&workspace, disk::TEST_NEEDS) {
        Err(full) => err.context(format!("{full:#}")),
        Ok(()) => err,
    })
}

fn steps(args: &TestArgs, root: bool) -> Result<()> {
    setup::run().context("setting up the toolchain for the tests")?;
    build_ebpf::run().context("building the eBPF object the watchdog embeds")?;
    let postgres_url = postgres(args)?;
    let cargo = || {
        let mut cmd = setup::cargo();
        if let Some(url) = &postgres_url {
            cmd.env("OMA_TEST_POSTGRES_URL", url);
        }
        if args.ci {
            cmd.env("OMA_REQUIRE_POSTGRES", "1");
        }
        cmd
    };
    checks(&cargo)?;
    alert_rules()?;
    // The system tests and the watchdog's tests run the daemons and the stand-in as real
    // processes: build every binary first, so they never test a stale one.
    setup::build_bins(false)?;
    setup::status(&mut test_command(&cargo))
        .context("tests failed: the output above says which")?;
    contract()?;
    // The kill tests need root (signals to other users' processes, namespaces, cgroups, eBPF).
    if root {
        kill_test::run(&kill_test::KillTestArgs::for_test_suite())
            .context("kill tests failed: the table above says which scenario")?;
        kill_test::run(&kill_test::KillTestArgs::for_test_suite_procfs()).context(
            "kill tests on the procfs detector failed: the table above says which scenario",
        )?;
        kill_tests_postgres(postgres_url.as_deref(), args.ci)?;
        // A short soak with a fresh seed, which it prints first: a failure here is replayed
        // with `cargo xtask soak --seed <seed> --faults 500`.
        soak::run(&soak::SoakArgs::for_test_suite())
            .context("the short soak found a violation: replay it from the seed printed above")?;
        kill_test::run(&kill_test::KillTestArgs::for_test_suite_vm()).context(
            "kill tests in the VM (Debian 12's 6.1 kernel) failed: the summary above says which step; the console is in target/vm/serial.log",
        )?;
    } else {
        eprintln!("test: SKIP kill tests: they need root (run `sudo -E cargo xtask test`)");
    }
    packages(root)?;
    // The packages installed on a systemd-booted VM (its root file system is the kill tests').
    if root {
        appliance::run(&appliance::ApplianceArgs {}).context(
            "the appliance test failed: the summary above says which check; the consoles are in target/vm/appliance-serial-{1,2}.log",
        )?;
    } else {
        eprintln!("test: SKIP appliance test: it needs root (run `sudo -E cargo xtask test`)");
    }
    // The README's run command, end to end: OMA + watchdog + a demo job that must complete.
    run_cmd::run(&run_cmd::RunArgs::for_test_suite())
        .context("the README's run command (`cargo xtask run`) failed; see target/demo/*.log")?;
    println!("test: all checks passed");
    Ok(())
}

/// Every kill-test scenario once more with the OMA on PostgreSQL (a fresh database per run);
/// skipped, like the store tests, only outside CI when no server could start.
fn kill_tests_postgres(url: Option<&str>, ci: bool) -> Result<()> {
    let Some(url) = url else {
        if ci {
            bail!("CI needs PostgreSQL for the kill tests on the postgres backend");
        }
        eprintln!("test: SKIP kill tests on PostgreSQL: no server (see above)");
        return Ok(());
    };
    kill_test::run(&kill_test::KillTestArgs::for_test_suite_postgres(url)).context(
        "kill tests with the OMA on PostgreSQL failed: the table above says which scenario",
    )
}

/// The REST contract of both daemons, fuzzed by Schemathesis (`cargo xtask contract`).
fn contract() -> Result<()> {
    contract::run(&contract::ContractArgs::for_test_suite())
        .context("the contract tests failed: the Schemathesis output above says where")
}

/// Both Debian packages, from the binaries just built, opened and checked (never installed).
/// The token check gives files to other users, so it needs root.
fn packages(root: bool) -> Result<()> {
    if !root {
        eprintln!("test: SKIP package checks: they need root (run `sudo -E cargo xtask test`)");
        return Ok(());
    }
    package::run(&package::PackageArgs::for_test_suite())
        .context("the Debian packages failed their checks: the lines above say which")?;
    Ok(())
}

/// The OMA's store tests run on SQLite and on PostgreSQL; in CI a skipped PostgreSQL run is a
/// failure, so the server must start. Elsewhere, say so and go on with SQLite only.
fn postgres(args: &TestArgs) -> Result<Option<String>> {
    match postgres::start_test_server() {
        Ok(url) => Ok(Some(url)),
        Err(err) if args.ci => Err(err.context("CI needs PostgreSQL for the OMA's store tests")),
        Err(err) => {
            eprintln!("test: SKIP PostgreSQL store tests: {err:#}");
            Ok(None)
        }
    }
}

/// Formatting, clippy, and the docs' links: a link to a renamed or private item is a warning
/// that nobody reads otherwise (dependencies' check builds are shared with clippy's).
fn checks(cargo: &dyn Fn() -> Command) -> Result<()> {
    setup::status(cargo().args(["fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    let clippy = [
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ];
    setup::status(cargo().args(clippy))
        .context("clippy found problems: fix them before committing")?;
    setup::status(
        cargo()
            .args(["doc", "--no-deps", "--workspace", "--quiet"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )
    .context("rustdoc found problems (broken or private links): fix them before committing")
}

/// The shipped alert rules: `promtool check rules`, then their unit tests (an alert that fires
/// and one that stays quiet each), and the example scrape configuration.
fn alert_rules() -> Result<()> {
    let dir = paths::workspace_root().join("contrib/prometheus");
    let promtool = |args: &[&str]| {
        setup::status(Command::new("promtool").args(args).current_dir(&dir))
            .with_context(|| format!("promtool {} failed: see its output above", args.join(" ")))
    };
    promtool(&["check", "rules", "alerts.yml"])?;
    promtool(&["test", "rules", "alerts_test.yml"])?;
    promtool(&["check", "config", "prometheus.yml"])
}

/// nextest runs the privileged tests one at a time (.config/nextest.toml); without it,
/// `cargo test` with one thread per binary keeps them apart too, only slower.
fn test_command(cargo: &dyn Fn() -> Command) -> Command {
    let nextest = cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut tests = cargo();
    if nextest {
        tests.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("test: cargo-nextest is not installed; running `cargo test` one test at a time");
        tests.args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ]);
    }
    tests
}
