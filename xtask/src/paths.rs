//! Fixed locations inside the workspace that several tasks agree on.

use std::path::PathBuf;

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Project-local tools (bpf-linker), kept apart from any user-wide install.
pub fn tools_dir() -> PathBuf {
    workspace_root().join("target").join("tools")
}

/// The `bin` directory of [`tools_dir`], prepended to `PATH` for eBPF builds.
pub fn tools_bin() -> PathBuf {
    tools_dir().join("bin")
}

/// Where `build-ebpf` puts the eBPF object and where `watchdog/build.rs` looks for it.
///
/// Keep in sync with `watchdog/build.rs`.
pub fn ebpf_object() -> PathBuf {
    workspace_root()
        .join("target")
        .join("bpf")
        .join("watchdog-ebpf.o")
}
