//! Types shared by the kernel programs (`watchdog-ebpf`) and the daemon (`vma-watchdog`).
#![no_std]
