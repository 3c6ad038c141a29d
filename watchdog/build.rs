//! Embeds the eBPF object built by `cargo xtask build-ebpf` (at `target/bpf/watchdog-ebpf.o`,
//! or `$WATCHDOG_EBPF_OBJECT`). When it is absent an empty blob is embedded, so that
//! `cargo build` and clippy work without bpf-linker; the eBPF detector then refuses to start
//! with a message that says to run `cargo xtask build-ebpf`, and the daemon falls back to procfs.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out =
        PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("watchdog-ebpf.o");
    println!("cargo::rerun-if-env-changed=WATCHDOG_EBPF_OBJECT");
    let object = std::env::var_os("WATCHDOG_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/watchdog-ebpf.o"));
    // Watch the directory rather than the file: cargo re-runs a build script on every build
    // when a watched path does not exist, and the object is often absent.
    if let Some(dir) = object.parent() {
        let _ = std::fs::create_dir_all(dir);
        println!("cargo::rerun-if-changed={}", dir.display());
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
    std::fs::write(&out, bytes).expect("writing the embedded eBPF object into OUT_DIR");
}
