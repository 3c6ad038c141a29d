//! The change feed of the progress store: which jobs changed since a cursor, for
//! `GET /api/v1/progress?since=&epoch=&limit=`, so that the OMA asks a VMA once per poll
//! interval instead of once per job.
//!
//! Every update of a job gives it the next number of a counter kept in memory (never on
//! disk): the job's latest change. Numbers are only comparable within one watchdog process,
//! which the epoch (a random UUID drawn at start) names; a cursor of another epoch is answered
//! from the beginning. An answer costs O(changed jobs · log jobs), not O(jobs): the jobs are
//! indexed by their latest change in a `BTreeMap`.

use std::collections::{BTreeMap, HashMap};

use api::JobId;
use uuid::Uuid;

/// Jobs per answer when the query gives no `limit` (or 0), and the most ever given.
pub const MAX_FEED_JOBS: usize = 5000;

/// The index of jobs by their latest change.
#[derive(Debug)]
pub(super) struct ChangeIndex {
    epoch: Uuid,
    /// The number of the latest change.
    head: u64,
    by_change: BTreeMap<u64, JobId>,
    change_of: HashMap<JobId, u64>,
}

/// One answer of the feed: the jobs to send, oldest change first, and the cursor after them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct FeedPage {
    pub epoch: Uuid,
    pub cursor: u64,
    pub more: bool,
    pub jobs: Vec<JobId>,
}

impl ChangeIndex {
    /// An empty index with a fresh epoch.
    pub(super) fn new() -> Self {
        Self {
            epoch: Uuid::new_v4(),
            head: 0,
            by_change: BTreeMap::new(),
            change_of: HashMap::new(),
        }
    }

    /// Records a change of `job_id` (its update, or its arrival at start).
    pub(super) fn changed(&mut self, job_id: &JobId) {
        self.head += 1;
        if let Some(old) = self.change_of.insert(job_id.clone(), self.head) {
            self.by_change.remove(&old);
        }
        self.by_change.insert(self.head, job_id.clone());
    }

    /// Drops a forgotten job: it is in no later answer.
    pub(super) fn forgot(&mut self, job_id: &str) {
        if let Some(old) = self.change_of.remove(job_id) {
            self.by_change.remove(&old);
        }
    }

    /// The jobs whose latest change is after `since`, oldest first, at most `limit`. A
    /// cursor of another epoch, none, or one past the head (not one this process gave) is
    /// answered from the beginning. When the answer is not cut, the cursor is the head: every
    /// change up to it has been seen.
    pub(super) fn page(&self, since: Option<u64>, epoch: Option<Uuid>, limit: usize) -> FeedPage {
        let since = match (since, epoch) {
            (Some(since), Some(epoch)) if epoch == self.epoch && since <= self.head => since,
            _ => 0,
        };
        let limit = limit.clamp(1, MAX_FEED_JOBS);
        let mut jobs = Vec::new();
        let mut cursor = self.head;
        let mut more = false;
        for (&change, job_id) in self.by_change.range(since + 1..) {
            if jobs.len() == limit {
                more = true;
                break;
            }
            jobs.push(job_id.clone());
            cursor = change;
        }
        if !more {
            cursor = self.head;
        }
        FeedPage {
            epoch: self.epoch,
            cursor,
            more,
            jobs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> JobId {
        JobId::parse(text).unwrap()
    }

    fn names(page: &FeedPage) -> Vec<&str> {
        page.jobs.iter().map(JobId::as_str).collect()
    }

    #[test]
    fn a_job_appears_once_at_its_latest_change() {
        let mut index = ChangeIndex::new();
        for job in ["job-a", "job-b", "job-a", "job-c"] {
            index.changed(&id(job));
        }
        let all = index.page(None, None, MAX_FEED_JOBS);
        assert_eq!(names(&all), ["job-b", "job-a", "job-c"]);
        assert_eq!((all.cursor, all.more), (4, false));
        let epoch = Some(all.epoch);
        assert!(index.page(Some(4), epoch, 10).jobs.is_empty());
        index.changed(&id("job-b"));
        let next = index.page(Some(4), epoch, 10);
        assert_eq!((names(&next), next.cursor), (vec!["job-b"], 5));
    }

    #[test]
    fn a_cut_answer_says_more_and_resumes_after_its_last_job() {
        let mut index = ChangeIndex::new();
        for n in 0..5 {
            index.changed(&id(&format!("job-{n}")));
        }
        let first = index.page(Some(0), None, 2);
        assert_eq!(
            (names(&first), first.cursor, first.more),
            (vec!["job-0", "job-1"], 2, true)
        );
        let rest = index.page(Some(first.cursor), Some(first.epoch), 3);
        assert_eq!(names(&rest), ["job-2", "job-3", "job-4"]);
        assert!(!rest.more);
    }

    #[test]
    fn another_epoch_or_a_cursor_past_the_head_starts_over_and_forgotten_jobs_leave() {
        let mut index = ChangeIndex::new();
        index.changed(&id("job-a"));
        index.changed(&id("job-b"));
        index.forgot("job-a");
        assert_eq!(
            names(&index.page(Some(2), Some(Uuid::new_v4()), 10)),
            ["job-b"]
        );
        let epoch = Some(index.epoch);
        assert_eq!(names(&index.page(Some(99), epoch, 10)), ["job-b"]);
        assert_eq!(names(&index.page(Some(2), None, 10)), ["job-b"]);
    }
}
