//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to build and load the
//! eBPF programs. Every step checks first and does nothing when its result is already there,
//! so a second run only reports.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::paths;

/// The bpf-linker release known to work with aya-ebpf 0.2.1 (see docs/EBPF-TOOLCHAIN notes).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every step, one log line each.
pub fn run() -> Result<()> {
    let mut changed = false;
    changed |= ensure_rust_src(true)?;
    changed |= ensure_bpf_linker(true)?;
    changed |= ensure_tracefs(true)?;
    // The attack tests run forgers and impostors as another real user from another real
    // process: `curl` posts the forged progress, `useradd` makes the user.
    changed |= ensure_debian_packages("setup", &[("curl", "curl"), ("useradd", "passwd")])?;
    // Schemathesis and the generated clients check the OpenAPI documents (`cargo xtask
    // contract`, part of `cargo xtask test`).
    changed |= crate::contract::ensure_tools()?;
    // The alert rules' checks and unit tests (`promtool`) and the metrics' end-to-end test
    // (a real Prometheus server, run by the test itself, never the package's service).
    changed |= ensure_debian_packages("setup", &[("promtool", "prometheus")])?;
    // `cargo xtask package`: cargo-deb, and what it and the package check run (dpkg-shlibdeps
    // for the dependencies, fakeroot, systemd-analyze for the unit files).
    ensure_cargo_deb(true)?;
    changed |= ensure_debian_packages(
        "setup",
        &[
            ("dpkg-shlibdeps", "dpkg-dev"),
            ("systemd-analyze", "systemd"),
        ],
    )?;
    if changed {
        println!("setup: done");
    } else {
        println!("setup: everything is present; nothing to do");
    }
    Ok(())
}

/// Whether `program` is on the PATH or in the system's sbin directories (root's tools, which a
/// user's PATH may leave out).
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(program).is_file())
    })
}

/// Installs with apt-get the Debian package of every `(program, package)` whose program is not
/// on the PATH; returns whether it installed anything. `who` prefixes the line it prints.
pub fn ensure_debian_packages(who: &str, wanted: &[(&str, &str)]) -> Result<bool> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    install_debian_packages(who, &missing)?;
    Ok(true)
}

/// Installs `packages` with apt-get (running `apt-get update` first when the lists are
/// missing). `who` prefixes the line it prints.
pub fn install_debian_packages(who: &str, missing: &[&str]) -> Result<()> {
    println!("{who}: installing {} (apt-get)", missing.join(" "));
    let install = || {
        status(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_err() {
        // A fresh machine may not have package lists yet.
        status(Command::new("apt-get").arg("update")).context("apt-get update")?;
        install().with_context(|| format!("apt-get install {}", missing.join(" ")))?;
    }
    Ok(())
}

/// What `build-ebpf` needs: rust-src and bpf-linker, installed quietly when missing.
pub fn ensure_build_tools() -> Result<()> {
    ensure_rust_src(false)?;
    ensure_bpf_linker(false)?;
    Ok(())
}

/// The toolchain that `cargo`/`rustc` resolve to here (honours `RUSTUP_TOOLCHAIN` and overrides).
pub fn active_toolchain() -> Result<String> {
    let out = output(Command::new("rustup").args(["show", "active-toolchain"]))
        .context("asking rustup for the active toolchain (is rustup installed?)")?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("`rustup show active-toolchain` printed nothing")
}

fn sysroot(toolchain: &str) -> Result<PathBuf> {
    let out = output(Command::new("rustc").args([&format!("+{toolchain}"), "--print", "sysroot"]))
        .with_context(|| format!("asking rustc +{toolchain} for its sysroot"))?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure_rust_src(verbose: bool) -> Result<bool> {
    let toolchain = active_toolchain()?;
    let core = sysroot(&toolchain)?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.exists() {
        if verbose {
            println!("setup: rust-src for {toolchain}: present");
        }
        return Ok(false);
    }
    println!("setup: rust-src for {toolchain}: installing (rustup component add)");
    status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        &toolchain,
    ]))
    .context("installing rust-src; check that rustup can reach its distribution server")?;
    Ok(true)
}

/// The libLLVM of the active toolchain: `(sysroot/lib, major version, link name)`.
fn toolchain_llvm(toolchain: &str) -> Result<(PathBuf, String, String)> {
    let lib = sysroot(toolchain)?.join("lib");
    let vv = output(Command::new("rustc").args([&format!("+{toolchain}"), "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV did not print an LLVM version")?
        .to_owned();
    let prefix = format!("libLLVM-{major}-rust-");
    let entry = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&prefix) && n.ends_with(".so"))
        .with_context(|| {
            format!(
                "no {prefix}*.so in {}: this toolchain does not ship its LLVM as a shared library",
                lib.display()
            )
        })?;
    let link_name = entry
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_owned();
    Ok((lib, major, link_name))
}

fn bpf_linker_path() -> PathBuf {
    paths::tools_bin().join("bpf-linker")
}

/// The stamp records which libLLVM the installed bpf-linker was linked against.
fn stamp_path() -> PathBuf {
    paths::tools_dir().join("bpf-linker.llvm")
}

fn bpf_linker_works(bin: &Path) -> bool {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

fn ensure_bpf_linker(verbose: bool) -> Result<bool> {
    let toolchain = active_toolchain()?;
    let (lib, major, link_name) = toolchain_llvm(&toolchain)?;
    let bin = bpf_linker_path();
    let stamp = std::fs::read_to_string(stamp_path()).unwrap_or_default();
    if bpf_linker_works(&bin) && stamp.trim() == link_name {
        if verbose {
            println!(
                "setup: bpf-linker {BPF_LINKER_VERSION} ({link_name}): present in {}",
                paths::tools_bin().display()
            );
        }
        return Ok(false);
    }
    let why = if bin.exists() {
        "rebuilding (toolchain changed or binary broken)"
    } else {
        "building"
    };
    println!(
        "setup: bpf-linker {BPF_LINKER_VERSION}: {why} against {link_name} into {} (about a minute)",
        paths::tools_bin().display()
    );
    let lib_s = lib.display().to_string();
    let rustflags =
        format!("-L native={lib_s} -l dylib={link_name} -C link-arg=-Wl,-rpath,{lib_s}");
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--force",
    ])
    .args([
        "--no-default-features",
        "--features",
        &format!("llvm-{major},no-llvm-linking"),
    ])
    .arg("--root")
    .arg(paths::tools_dir())
    .env("RUSTUP_TOOLCHAIN", &toolchain)
    .env("RUSTFLAGS", rustflags)
    .env("CARGO_TARGET_DIR", paths::tools_dir().join("build"))
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    status(&mut cmd).context("building bpf-linker; the cargo output above says why")?;
    if !bpf_linker_works(&bin) {
        bail!(
            "bpf-linker was built but `{} --version` does not run",
            bin.display()
        );
    }
    std::fs::write(stamp_path(), format!("{link_name}\n"))
        .with_context(|| format!("writing {}", stamp_path().display()))?;
    Ok(true)
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// True when tracefs is mounted at [`TRACEFS`].
pub fn tracefs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_, dir, fstype) = (f.next(), f.next(), f.next());
                dir == Some(TRACEFS) && fstype == Some("tracefs")
            })
        })
        .unwrap_or(false)
}

fn ensure_tracefs(verbose: bool) -> Result<bool> {
    if tracefs_mounted() {
        if verbose {
            println!("setup: tracefs: mounted at {TRACEFS}");
        }
        return Ok(false);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "setup: tracefs: NOT mounted and not root; run `sudo mount -t tracefs nodev {TRACEFS}` \
             (the eBPF detector needs it; the procfs fallback does not)"
        );
        return Ok(false);
    }
    println!("setup: tracefs: mounting at {TRACEFS}");
    status(Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]))
        .with_context(|| format!("mounting tracefs at {TRACEFS}"))?;
    Ok(true)
}

/// Builds every binary of the workspace (the daemons, the stand-in migratekit, the CLI and the
/// kill-test runner). `test`, `kill-test` and `run` all build exactly this set: cargo picks
/// dependencies' features from the packages a build names, so building a subset (`-p oma`)
/// after `--workspace` compiled sqlx, aya and the daemons a second time (about a minute each
/// time, and their disk).
pub fn build_bins(release: bool) -> Result<()> {
    status(
        cargo()
            .args(["build", "--workspace", "--bins"])
            .args(release.then_some("--release")),
    )
    .context("building the workspace's binaries (oma, vma-watchdog, the stand-in migratekit, the kill-test runner); the cargo output above says why")
}

/// The cargo that runs this xtask (`$CARGO`, else `cargo` on the PATH), in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(paths::workspace_root());
    cmd
}

/// Runs a command, failing when it cannot start or exits non-zero.
pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !st.success() {
        bail!("{:?} failed: {st}", cmd.get_program());
    }
    Ok(())
}

/// Runs a command and returns its standard output.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}: {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// cargo-deb at [`crate::package::CARGO_DEB_VERSION`]: the one on the PATH when it is that
/// release, else installed into the project's tools directory. Returns the binary to run.
pub fn ensure_cargo_deb(verbose: bool) -> Result<PathBuf> {
    let wanted = crate::package::CARGO_DEB_VERSION;
    let is_wanted = |bin: &Path| {
        Command::new(bin).arg("--version").output().is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(wanted)
        })
    };
    let local = paths::tools_bin().join("cargo-deb");
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("cargo-deb"))
            .find(|bin| bin.is_file())
    });
    for bin in [Some(local.clone()), on_path].into_iter().flatten() {
        if is_wanted(&bin) {
            if verbose {
                println!("setup: cargo-deb {wanted}: present ({})", bin.display());
            }
            return Ok(bin);
        }
    }
    println!(
        "setup: cargo-deb {wanted}: installing into {} (about two minutes)",
        paths::tools_bin().display()
    );
    status(
        cargo()
            .args([
                "install",
                "cargo-deb",
                "--version",
                wanted,
                "--locked",
                "--root",
            ])
            .arg(paths::tools_dir())
            .env("CARGO_TARGET_DIR", paths::tools_dir().join("build")),
    )
    .context("installing cargo-deb; check that crates.io is reachable")?;
    Ok(local)
}
