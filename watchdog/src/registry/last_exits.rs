//! The last exit of every job, the newest [`MAX_LAST_EXITS`] kept.
//!
//! Both maps are persistent (structure-sharing) maps: a clone costs O(1) and a change made
//! while a clone is alive copies O(log n) nodes, not the map. The registry's writer encodes
//! a clone outside the lock while deaths go on changing the original, and a death of a new
//! job on a VMA that has run [`MAX_LAST_EXITS`] jobs drops the oldest through the age index
//! instead of sorting every entry. Measured by `examples/bench_registry.rs` at 10,000 last
//! exits: a death took p50 0.7 ms (0.9 ms during a write) with a `BTreeMap` behind an
//! `Arc` copied on write and a sort to prune.

use std::collections::BTreeMap;

use api::JobId;
use chrono::{DateTime, Utc};
use imbl::{OrdMap, OrdSet};

use super::{LastExit, MAX_LAST_EXITS};

/// Last exits by job, with an index by age for pruning.
#[derive(Debug, Clone, Default)]
pub(super) struct LastExits {
    by_job: OrdMap<JobId, LastExit>,
    /// `(exited_at, job id)` of every entry, oldest first (ties by job id).
    by_age: OrdSet<(DateTime<Utc>, JobId)>,
}

impl LastExits {
    /// The last exits as the registry's file holds them, pruned to the newest
    /// [`MAX_LAST_EXITS`] (a file written with a larger limit is cut down as it is read).
    pub(super) fn from_file(exits: BTreeMap<JobId, LastExit>) -> Self {
        let mut this = Self::default();
        for (job, last) in exits {
            this.insert(job, last);
        }
        this
    }

    /// Records `last` as `job`'s last exit, replacing any earlier one, and returns the
    /// oldest entries dropped beyond [`MAX_LAST_EXITS`].
    pub(super) fn insert(&mut self, job: JobId, last: LastExit) -> Vec<(JobId, LastExit)> {
        if let Some(before) = self.by_job.get(&job) {
            self.by_age.remove(&(before.exited_at, job.clone()));
        }
        self.by_age.insert((last.exited_at, job.clone()));
        self.by_job.insert(job, last);
        let mut dropped = Vec::new();
        while self.by_job.len() > MAX_LAST_EXITS {
            let Some((_, oldest)) = self.by_age.remove_min() else {
                break;
            };
            if let Some(last) = self.by_job.remove(&oldest) {
                dropped.push((oldest, last));
            }
        }
        dropped
    }

    /// `job`'s last exit.
    pub(super) fn get(&self, job: &str) -> Option<&LastExit> {
        self.by_job.get(job)
    }

    /// Every job with a last exit, in id order.
    pub(super) fn jobs(&self) -> impl Iterator<Item = &JobId> {
        self.by_job.keys()
    }

    /// Every last exit.
    pub(super) fn exits(&self) -> impl Iterator<Item = &LastExit> {
        self.by_job.values()
    }

    /// The map by job, for encoding (an O(1) clone of it is a consistent snapshot).
    pub(super) fn by_job(&self) -> &OrdMap<JobId, LastExit> {
        &self.by_job
    }

    /// How many jobs have a last exit.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_job.len()
    }
}
