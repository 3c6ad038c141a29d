//! `cargo xtask build-ebpf`: builds the kernel programs and puts the object where
//! `watchdog/build.rs` embeds it from.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{paths, setup};

/// Builds `watchdog-ebpf` for `bpfel-unknown-none` (release) and copies it to
/// [`paths::ebpf_object`].
pub fn run() -> Result<()> {
    setup::ensure_build_tools()?;
    let root = paths::workspace_root();
    let target_dir = root.join("target").join("ebpf-build");
    let path = match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![paths::tools_bin()];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs).context("building PATH")?
        }
        None => paths::tools_bin().into_os_string(),
    };
    // The eBPF crate needs `-Z build-std=core`; stable accepts it with RUSTC_BOOTSTRAP=1, so
    // nothing depends on a nightly toolchain being installed. `--btf` makes bpf-linker emit
    // BTF for the maps, which the kernel's verifier log then names.
    let rustflags = ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["build", "--package", "watchdog-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTUP_TOOLCHAIN", setup::active_toolchain()?)
        .env("PATH", path)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS");
    setup::status(&mut cmd)
        .context("building the eBPF programs; the cargo output above says why")?;
    let built = target_dir.join("bpfel-unknown-none/release/watchdog-ebpf");
    let dest = paths::ebpf_object();
    let dir = dest.parent().context("object path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let object = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // An unchanged object keeps its file (and time): watchdog/build.rs reruns on any change
    // to it, and every later build of the watchdog would compile it again for nothing.
    if std::fs::read(&dest).is_ok_and(|old| old == object) {
        println!(
            "build-ebpf: {} (unchanged, {} bytes)",
            dest.display(),
            object.len()
        );
        return Ok(());
    }
    // Copy then rename, so that watchdog/build.rs never embeds a half-written object.
    let tmp = dir.join(".watchdog-ebpf.o.tmp");
    std::fs::write(&tmp, &object).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
    println!("build-ebpf: {} ({} bytes)", dest.display(), object.len());
    Ok(())
}
