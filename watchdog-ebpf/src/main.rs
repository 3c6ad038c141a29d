//! Kernel programs of vma-watchdog. Built by `cargo xtask build-ebpf` for `bpfel-unknown-none`;
//! on the host this crate is only a stub so that `cargo clippy --workspace` works.
//!
//! See `docs/EBPF.md` for how death is decided and how the filter works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

/// GPL-compatible licence: `bpf_probe_read_kernel` and the ring-buffer helpers are GPL-only.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
