//! `vma-watchdog`: sees every migratekit death on the VMA and reports it.

pub mod detector;
