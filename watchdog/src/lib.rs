//! `vma-watchdog`: sees every migratekit death on the VMA and reports it.

pub mod config;
pub mod daemon;
pub mod detector;
pub mod journal;
pub mod logging;
pub mod procfs;
pub mod registry;
