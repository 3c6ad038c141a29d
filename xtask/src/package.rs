//! `cargo xtask package`: the two Debian packages of an appliance pair, built with cargo-deb
//! from each crate's `[package.metadata.deb]` and the files in `packaging/`:
//!
//! - `vma-watchdog_<version>_amd64.deb`: `vma-watchdog` (its eBPF object embedded, built first
//!   with `build-ebpf`), `vma-watchdog.service`, `/etc/default/vma-watchdog`, the token
//!   generator and the maintainer scripts;
//! - `oma_<version>_amd64.deb`: `oma` and `job-recovery`, `oma.service`, `/etc/default/oma`, the
//!   token generator and the maintainer scripts that create the `oma` user.
//!
//! `--check` (what `cargo xtask test` runs) then opens both packages and checks what an
//! operator relies on (`check.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, paths, setup};

mod check;

/// The cargo-deb release the packages are built with (`cargo xtask setup` installs it).
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// The packages, by crate name (which is also the package's name).
pub const PACKAGES: [&str; 2] = ["vma-watchdog", "oma"];

/// Flags of `cargo xtask package`.
#[derive(Debug, clap::Args)]
pub struct PackageArgs {
    /// Where the `.deb` files go (default target/debian).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The packages' version instead of the crates' (e.g. `0.1.0+2` for an upgrade test).
    #[arg(long)]
    deb_version: Option<String>,
    /// Package the dev-profile binaries (`cargo build --workspace --bins`, the ones the test
    /// suite builds anyway) instead of an optimized build: for checking the packaging, not for
    /// shipping.
    #[arg(long)]
    dev: bool,
    /// Also check the packages: files, modes, conffiles, dependencies, the unit files
    /// (`systemd-analyze verify`) and the token generator, run for real in a scratch root.
    #[arg(long)]
    check: bool,
}

impl PackageArgs {
    /// What `cargo xtask test` runs: build from the test suite's binaries and check, into a
    /// directory of its own (`target/debian-check`), so that it never leaves dev-profile
    /// packages where `cargo xtask package` puts the release ones.
    pub fn for_test_suite() -> Self {
        Self {
            out_dir: Some(paths::workspace_root().join("target").join("debian-check")),
            deb_version: None,
            dev: true,
            check: true,
        }
    }
}

impl PackageArgs {
    /// What `cargo xtask appliance-test` installs: the test suite's binaries, unchecked (the
    /// VM checks them installed), into `out_dir`, at `deb_version` or the crates' version.
    pub fn for_appliance(out_dir: PathBuf, deb_version: Option<String>) -> Self {
        Self {
            out_dir: Some(out_dir),
            deb_version,
            dev: true,
            check: false,
        }
    }
}

/// Builds both packages (and checks them with `--check`); returns their paths.
pub fn run(args: &PackageArgs) -> Result<Vec<PathBuf>> {
    let cargo_deb = setup::ensure_cargo_deb(false)?;
    build_ebpf::run().context("building the eBPF object that vma-watchdog embeds")?;
    // cargo-deb only packs (--no-build). With --dev, the packed binaries are the test suite's
    // own build (the same command, so nothing is built twice); otherwise one release build of
    // both daemons, so that their shared dependencies are built once with one set of features.
    if args.dev {
        setup::build_bins(false)?;
    } else {
        setup::status(setup::cargo().args([
            "build",
            "--release",
            "-p",
            "vma-watchdog",
            "-p",
            "oma",
            "--bins",
        ]))
        .context("building the release binaries of vma-watchdog and oma")?;
    }
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| paths::workspace_root().join("target").join("debian"));
    let mut debs = Vec::new();
    for package in PACKAGES {
        debs.push(build_one(&cargo_deb, package, &out_dir, args)?);
    }
    for deb in &debs {
        println!("package: built {}", deb.display());
    }
    if args.check {
        check::all(&debs).context("the packages are not what an operator relies on")?;
    }
    Ok(debs)
}

/// Runs cargo-deb for `package`; returns the `.deb` it wrote.
fn build_one(
    cargo_deb: &Path,
    package: &str,
    out_dir: &Path,
    args: &PackageArgs,
) -> Result<PathBuf> {
    let mut cmd = std::process::Command::new(cargo_deb);
    cmd.current_dir(paths::workspace_root())
        .args(["--no-build", "-p", package, "--output"])
        .arg(out_dir);
    if args.dev {
        // Packages for tests are unpacked once, on this machine: the fast compression saves
        // most of the time cargo-deb takes for the large unoptimized binaries.
        cmd.args(["--profile", "dev", "--fast"]);
    }
    if let Some(version) = &args.deb_version {
        cmd.args(["--deb-version", version]);
    }
    let printed = setup::output(&mut cmd)
        .with_context(|| format!("cargo-deb could not build the {package} package"))?;
    // cargo-deb prints the package's path as its last line.
    let deb = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo-deb printed no .deb path for {package}: {printed}"))?;
    if !deb.is_file() {
        bail!(
            "cargo-deb said it wrote {} but it is not there",
            deb.display()
        );
    }
    Ok(deb)
}
