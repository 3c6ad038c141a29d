//! `vma-watchdog`: sees every migratekit death on the VMA and reports it.

pub mod clock;
pub mod config;
pub mod daemon;
pub mod detector;
pub(crate) mod disk;
pub mod http;
pub mod launcher;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod peer;
pub mod pidfd;
pub mod proc_reader;
pub mod progress;
pub mod registry;
pub mod secret;
pub mod signal;
pub mod state_dir;
pub mod trust;
