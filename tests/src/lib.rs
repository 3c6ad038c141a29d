//! Harness for end-to-end tests of `oma` and `vma-watchdog` together, with real processes.
//!
//! The e2e tests in `tests/tests/` and the `kill-test` runner (`cargo xtask kill-test`) share it:
//! - [`bins`] finds the built binaries;
//! - [`daemon`] runs one child process (start, SIGTERM, SIGKILL, restart, log capture);
//! - [`oma`] and [`watchdog`] run the two daemons on free ports with temporary state and talk
//!   to their REST APIs;
//! - [`procs`] finds and kills migratekit processes;
//! - [`observed`] reads back what happened (the watchdog's downtimes, the deaths it logged,
//!   each stand-in's own end), which the kill tests judge by;
//! - [`netns`] and [`cgroup`] build the network partition and the memory limit of the kill tests;
//! - [`soak`] runs the long seeded fault schedule of `cargo xtask soak` on the same system.

pub mod bins;
pub mod cgroup;
pub mod contrib;
pub mod daemon;
pub mod error;
pub mod http;
pub mod killtest;
pub mod netns;
pub mod observed;
pub mod oma;
pub mod procs;
pub mod soak;
pub mod system;
pub mod tls;
pub mod watchdog;

pub use error::HarnessError;

/// Result of harness calls.
pub type Result<T> = std::result::Result<T, HarnessError>;

/// True when the process runs as root. Privileged tests call [`skip_unless_root`] instead.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints `SKIP: <test>: <why>` to stderr and returns false when not root, so a privileged
/// test can `if !skip_unless_root("name") { return; }` and pass without running.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!(
        "SKIP: {test}: needs root (killing processes, eBPF, namespaces); run the tests as root"
    );
    false
}
