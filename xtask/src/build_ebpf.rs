//! `cargo xtask build-ebpf`: builds the kernel programs and puts the object where
//! `watchdog/build.rs` embeds it from, with a stamp of the sources it was built from (which
//! `watchdog/build.rs` checks, see `watchdog/build/ebpf_stamp.rs`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{ebpf_stamp, paths, setup};

/// Builds `watchdog-ebpf` for `bpfel-unknown-none` (release), copies it to
/// [`paths::ebpf_object`] and records the sources' stamp next to it.
pub fn run() -> Result<()> {
    setup::ensure_build_tools()?;
    let root = paths::workspace_root();
    // Taken before the build, so that a source edited while cargo runs leaves the stamp
    // behind the sources and the next watchdog build asks for another run.
    let stamp = ebpf_stamp::sources_stamp(&root).context("hashing the eBPF sources")?;
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
    // The stamp is still written then: an edit that leaves the object identical (a comment)
    // must stop the watchdog's build from calling it out of date.
    if std::fs::read(&dest).is_ok_and(|old| old == object) {
        write_if_changed(&ebpf_stamp::stamp_path(&dest), &format!("{stamp}\n"))?;
        println!(
            "build-ebpf: {} (unchanged, {} bytes)",
            dest.display(),
            object.len()
        );
        return Ok(());
    }
    // Object first, stamp second: a crash between the two leaves a new object with an old
    // stamp, which the watchdog's build refuses, rather than an old object passed as new.
    replace(&dest, &object)?;
    write_if_changed(&ebpf_stamp::stamp_path(&dest), &format!("{stamp}\n"))?;
    println!("build-ebpf: {} ({} bytes)", dest.display(), object.len());
    Ok(())
}

/// Writes `path` through a temporary file and a rename, so that watchdog/build.rs never reads
/// a half-written one.
fn replace(path: &Path, contents: &[u8]) -> Result<()> {
    let name = path.file_name().context("path has no file name")?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Like [`replace`], but leaves a file that already holds `contents` alone: a new time on
/// anything in `target/bpf` makes cargo rerun watchdog/build.rs and compile the watchdog again.
fn write_if_changed(path: &Path, contents: &str) -> Result<()> {
    if std::fs::read(path).is_ok_and(|old| old == contents.as_bytes()) {
        return Ok(());
    }
    replace(path, contents.as_bytes())
}
