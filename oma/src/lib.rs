//! `oma`: replication jobs, VM contexts and evidence-based recovery.
