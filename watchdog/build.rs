//! Embeds the eBPF object built by `cargo xtask build-ebpf` (at `target/bpf/watchdog-ebpf.o`,
//! or `$WATCHDOG_EBPF_OBJECT`). When it is absent an empty blob is embedded, so that
//! `cargo build` and clippy work without bpf-linker; the eBPF detector then refuses to start
//! with a message that says to run `cargo xtask build-ebpf`, and the daemon falls back to procfs.
//!
//! When it is present but was built from other sources than the ones checked out now (the
//! stamp `build-ebpf` writes next to it does not match, see `build/ebpf_stamp.rs`), the build
//! fails and says to run `cargo xtask build-ebpf`: embedding it would ship kernel programs that
//! are not the ones in the tree. Building it from here would need the bpf toolchain and a
//! nested cargo inside every build of the watchdog.

#[path = "build/ebpf_stamp.rs"]
mod ebpf_stamp;

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("the watchdog sits in the workspace");
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("watchdog-ebpf.o");
    println!("cargo::rerun-if-env-changed=WATCHDOG_EBPF_OBJECT");
    println!("cargo::rerun-if-changed=build/ebpf_stamp.rs");
    let given = std::env::var_os("WATCHDOG_EBPF_OBJECT").map(PathBuf::from);
    let object = given
        .clone()
        .unwrap_or_else(|| root.join("target/bpf/watchdog-ebpf.o"));
    // Watch the directory rather than the file: cargo re-runs a build script on every build
    // when a watched path does not exist, and the object is often absent. The stamp is in it too.
    if let Some(dir) = object.parent() {
        let _ = std::fs::create_dir_all(dir);
        println!("cargo::rerun-if-changed={}", dir.display());
    }
    for source in ebpf_stamp::SOURCES {
        println!("cargo::rerun-if-changed={}", root.join(source).display());
    }
    let bytes = match std::fs::read(&object) {
        Ok(bytes) => bytes,
        Err(_) => {
            println!(
                "cargo::warning=eBPF object {} not built: vma-watchdog will use the procfs detector; run `cargo xtask build-ebpf` for the eBPF one",
                object.display()
            );
            Vec::new()
        }
    };
    // An object given by $WATCHDOG_EBPF_OBJECT was built elsewhere, from sources this tree
    // cannot vouch for; whoever gives it answers for it.
    if !bytes.is_empty() && given.is_none() {
        refuse_stale(root, &object);
    }
    std::fs::write(&out, bytes).expect("writing the embedded eBPF object into OUT_DIR");
}

/// Fails the build when the object was not built from the sources as they are now.
fn refuse_stale(root: &Path, object: &Path) {
    let why = match ebpf_stamp::check(root, object) {
        Ok(ebpf_stamp::Freshness::Fresh) => return,
        Ok(ebpf_stamp::Freshness::Stale { recorded: None, .. }) => format!(
            "it has no stamp ({}), so which sources it came from is unknown",
            ebpf_stamp::stamp_path(object).display()
        ),
        Ok(ebpf_stamp::Freshness::Stale { .. }) => format!(
            "the eBPF sources ({}) changed since it was built",
            ebpf_stamp::SOURCES.join(", ")
        ),
        Err(e) => format!("the eBPF sources could not be read ({e})"),
    };
    println!(
        "cargo::error=the eBPF object {} is out of date: {why}; run `cargo xtask build-ebpf` to rebuild it",
        object.display()
    );
}
