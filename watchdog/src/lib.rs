//! `vma-watchdog`: sees every migratekit death on the VMA and reports it.

pub mod detector;
pub mod http;
pub mod launcher;
pub mod outbox;
pub mod progress;
