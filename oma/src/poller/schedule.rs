//! The poller's schedule: per VMA its jobs, how it is asked (feed or job by job), its due
//! time in a min-heap, its backoff; per job only for VMAs polled job by job.

use super::PollProtocol;
use crate::store::Vma;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

/// A cursor of a VMA's feed: its epoch and the last change seen.
pub(super) type Cursor = (Uuid, u64);

/// One VMA's poll, as the loop hands it to a task.
#[derive(Debug, Clone)]
pub(super) struct Work {
    pub vma_id: String,
    pub url: String,
    /// Ask the feed (a VMA on the feed, or one polled job by job due for a probe).
    pub try_feed: bool,
    pub cursor: Option<Cursor>,
    /// When it was due.
    pub due: Instant,
}

/// What one feed poll came to.
#[derive(Debug, Clone, Copy)]
pub(super) enum FeedOutcome {
    /// Answered and applied up to this cursor.
    Applied(Cursor),
    /// No answer, or it could not be applied: back off.
    Failed,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Feed {
        cursor: Option<Cursor>,
    },
    /// Job by job; the feed is asked again at `reprobe_at` (never when `None`).
    PerJob {
        reprobe_at: Option<Instant>,
    },
}

#[derive(Debug, Clone, Copy)]
struct JobPoll {
    next_at: Instant,
    failures: u32,
}

#[derive(Debug)]
struct VmaState {
    url: String,
    jobs: Vec<String>,
    mode: Mode,
    due: Instant,
    failures: u32,
    in_flight: bool,
    /// Per job, for a VMA polled job by job.
    job_polls: HashMap<String, JobPoll>,
    /// The latest feed answer applied.
    feed_ok_at: Option<Instant>,
}

/// How late polls started: the worst of the current window (one interval) and the last.
#[derive(Debug, Default)]
struct LagWindow {
    since: Option<Instant>,
    current: Duration,
    previous: Duration,
}

/// Every VMA with active jobs, and a min-heap of their due times.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    vmas: HashMap<String, VmaState>,
    heap: BinaryHeap<Reverse<(Instant, String)>>,
    tracked: usize,
    lag: LagWindow,
}

impl Schedule {
    /// Takes the active set `(job, vma)` and the registered VMAs: VMAs without active jobs
    /// leave, new ones are due now. Returns the jobs whose VMA is not registered.
    pub(super) fn refresh(
        &mut self,
        active: Vec<(String, String)>,
        vmas: Vec<Vma>,
        protocol: PollProtocol,
        now: Instant,
    ) -> Vec<(String, String)> {
        let urls: HashMap<String, String> = vmas.into_iter().map(|v| (v.id, v.base_url)).collect();
        self.tracked = active.len();
        let mut by_vma: HashMap<String, Vec<String>> = HashMap::new();
        let mut unknown = Vec::new();
        for (job, vma) in active {
            if urls.contains_key(&vma) {
                by_vma.entry(vma).or_default().push(job);
            } else {
                unknown.push((job, vma));
            }
        }
        self.vmas.retain(|id, _| by_vma.contains_key(id));
        for (vma, jobs) in by_vma {
            let url = urls[&vma].clone();
            if let Some(state) = self.vmas.get_mut(&vma) {
                if !state.job_polls.is_empty() {
                    let keep: HashSet<&String> = jobs.iter().collect();
                    state.job_polls.retain(|j, _| keep.contains(j));
                }
                state.url = url;
                state.jobs = jobs;
                continue;
            }
            let mode = match protocol {
                PollProtocol::Auto => Mode::Feed { cursor: None },
                PollProtocol::PerJob => Mode::PerJob { reprobe_at: None },
            };
            self.heap.push(Reverse((now, vma.clone())));
            let state = VmaState {
                url,
                jobs,
                mode,
                due: now,
                failures: 0,
                in_flight: false,
                job_polls: HashMap::new(),
                feed_ok_at: None,
            };
            self.vmas.insert(vma, state);
        }
        unknown
    }

    /// Marks every VMA due by `now` in flight and returns their work, with when the next
    /// one is due.
    pub(super) fn take_due(
        &mut self,
        now: Instant,
        interval: Duration,
    ) -> (Vec<Work>, Option<Instant>) {
        let mut work = Vec::new();
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, id))) = self.heap.pop() else {
                break;
            };
            let Some(state) = self.vmas.get_mut(&id) else {
                continue;
            };
            if state.in_flight || state.due != at {
                continue;
            }
            state.in_flight = true;
            let (try_feed, cursor) = match state.mode {
                Mode::Feed { cursor } => (true, cursor),
                Mode::PerJob { reprobe_at } => (reprobe_at.is_some_and(|r| r <= now), None),
            };
            self.lag
                .record(now.saturating_duration_since(at), now, interval);
            work.push(Work {
                vma_id: id,
                url: state.url.clone(),
                try_feed,
                cursor,
                due: at,
            });
        }
        (work, self.heap.peek().map(|Reverse((at, _))| *at))
    }

    /// Records a feed poll's outcome and schedules the VMA's next: one interval after the
    /// last due time on success (a fixed rate, not drifting by the answer's time), backoff
    /// after an error. Returns true when the VMA came back to the feed from job by job.
    pub(super) fn finish_feed(
        &mut self,
        work: &Work,
        outcome: FeedOutcome,
        interval: Duration,
        backoff: impl Fn(u32) -> Duration,
    ) -> bool {
        let now = Instant::now();
        let Some(state) = self.vmas.get_mut(&work.vma_id) else {
            return false;
        };
        state.in_flight = false;
        let was_per_job = matches!(state.mode, Mode::PerJob { .. });
        match outcome {
            FeedOutcome::Applied(cursor) => {
                state.mode = Mode::Feed {
                    cursor: Some(cursor),
                };
                state.failures = 0;
                state.feed_ok_at = Some(now);
                state.job_polls.clear();
                state.due = (work.due + interval).max(now);
            }
            FeedOutcome::Failed => {
                state.failures += 1;
                state.due = now + backoff(state.failures);
            }
        }
        self.heap.push(Reverse((state.due, work.vma_id.clone())));
        was_per_job && matches!(outcome, FeedOutcome::Applied(_))
    }

    /// The VMA has no feed: job by job until `reprobe_at`. True when it was on the feed
    /// (the first time, not a probe that found none again).
    pub(super) fn fall_back(&mut self, vma_id: &str, reprobe_at: Instant) -> bool {
        let Some(state) = self.vmas.get_mut(vma_id) else {
            return false;
        };
        let was_feed = matches!(state.mode, Mode::Feed { .. });
        state.mode = Mode::PerJob {
            reprobe_at: Some(reprobe_at),
        };
        state.failures = 0;
        was_feed
    }

    /// The jobs of a VMA polled job by job that are due.
    pub(super) fn per_job_due(&mut self, vma_id: &str, now: Instant) -> Vec<String> {
        let Some(state) = self.vmas.get_mut(vma_id) else {
            return Vec::new();
        };
        let polls = &mut state.job_polls;
        state
            .jobs
            .iter()
            .filter(|job| {
                let poll = polls.entry((*job).clone()).or_insert(JobPoll {
                    next_at: now,
                    failures: 0,
                });
                poll.next_at <= now
            })
            .cloned()
            .collect()
    }

    /// Records the outcome of each job's poll (the interval after success, backoff after an
    /// error) and makes the VMA due with its earliest job.
    pub(super) fn finish_per_job(
        &mut self,
        work: &Work,
        results: Vec<(String, Result<(), String>)>,
        interval: Duration,
        backoff: impl Fn(u32) -> Duration,
    ) {
        let now = Instant::now();
        let Some(state) = self.vmas.get_mut(&work.vma_id) else {
            return;
        };
        state.in_flight = false;
        for (job, result) in results {
            let Some(poll) = state.job_polls.get_mut(&job) else {
                continue;
            };
            match result {
                Ok(()) => {
                    poll.failures = 0;
                    poll.next_at = (work.due + interval).max(now);
                }
                Err(_) => {
                    poll.failures += 1;
                    poll.next_at = now + backoff(poll.failures);
                }
            }
        }
        let earliest = state
            .jobs
            .iter()
            .filter_map(|j| state.job_polls.get(j).map(|p| p.next_at))
            .min();
        state.due = earliest.unwrap_or(now + interval).max(now);
        if let Mode::PerJob {
            reprobe_at: Some(at),
        } = state.mode
        {
            state.due = state.due.min(at.max(now));
        }
        self.heap.push(Reverse((state.due, work.vma_id.clone())));
    }

    /// VMAs on the feed whose latest answer was applied after `since`.
    pub(super) fn feed_ok_since(&self, since: Instant) -> HashSet<String> {
        self.vmas
            .iter()
            .filter(|(_, s)| matches!(s.mode, Mode::Feed { .. }))
            .filter(|(_, s)| s.feed_ok_at.is_some_and(|at| at >= since))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Active jobs in the work list (those of unregistered VMAs included).
    pub(super) fn jobs_tracked(&self) -> usize {
        self.tracked
    }

    /// Jobs backing off: those of a VMA whose feed fails, and those polled one by one that
    /// failed.
    pub(super) fn jobs_backing_off(&self) -> usize {
        self.vmas
            .values()
            .map(|s| match s.mode {
                Mode::Feed { .. } if s.failures > 0 => s.jobs.len(),
                _ => s.job_polls.values().filter(|p| p.failures > 0).count(),
            })
            .sum()
    }

    /// How late polls started lately, or how overdue the earliest VMA is now.
    pub(super) fn lag(&self, now: Instant, interval: Duration) -> Duration {
        let overdue = self.heap.peek().map_or(Duration::ZERO, |Reverse((at, _))| {
            now.saturating_duration_since(*at)
        });
        let recent = match self.lag.since {
            Some(since) if now.saturating_duration_since(since) < interval * 2 => {
                self.lag.current.max(self.lag.previous)
            }
            _ => Duration::ZERO,
        };
        overdue.max(recent)
    }
}

impl LagWindow {
    fn record(&mut self, late: Duration, now: Instant, interval: Duration) {
        let fresh = self
            .since
            .is_some_and(|s| now.saturating_duration_since(s) < interval);
        if !fresh {
            self.previous = self.current;
            self.current = Duration::ZERO;
            self.since = Some(now);
        }
        self.current = self.current.max(late);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn vma(id: &str) -> Vma {
        Vma {
            id: id.into(),
            base_url: format!("http://{id}"),
        }
    }

    fn active(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(j, v)| ((*j).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn each_vma_is_due_once_then_at_a_fixed_rate_or_backed_off() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        let unknown = s.refresh(
            active(&[("j1", "a"), ("j2", "a"), ("j3", "b"), ("j4", "gone")]),
            vec![vma("a"), vma("b")],
            PollProtocol::Auto,
            t0,
        );
        assert_eq!(unknown, [("j4".to_owned(), "gone".to_owned())]);
        let (work, next) = s.take_due(t0, 5 * SEC);
        assert_eq!(work.len(), 2);
        assert!(work.iter().all(|w| w.try_feed && w.cursor.is_none()));
        assert_eq!(next, None, "both in flight");
        assert!(s.take_due(t0 + SEC, 5 * SEC).0.is_empty());
        let (a, b) = (&work[0], &work[1]);
        let cursor = (Uuid::new_v4(), 7);
        assert!(!s.finish_feed(a, FeedOutcome::Applied(cursor), 5 * SEC, |_| SEC));
        s.finish_feed(b, FeedOutcome::Failed, 5 * SEC, |f| SEC * f);
        assert_eq!(s.jobs_backing_off(), if b.vma_id == "a" { 2 } else { 1 });
        // The failed one is due after its backoff, the other one interval after its due time.
        let (soon, _) = s.take_due(Instant::now() + SEC * 2, 5 * SEC);
        assert_eq!(soon.len(), 1);
        assert_eq!(soon[0].vma_id, b.vma_id);
        let (later, _) = s.take_due(t0 + 5 * SEC, 5 * SEC);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].cursor, Some(cursor));
    }

    #[test]
    fn a_vma_without_the_feed_is_polled_job_by_job_until_the_probe() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        s.refresh(
            active(&[("j1", "a"), ("j2", "a")]),
            vec![vma("a")],
            PollProtocol::Auto,
            t0,
        );
        let (work, _) = s.take_due(t0, SEC);
        let probe_at = t0 + 600 * SEC;
        assert!(s.fall_back("a", probe_at), "first fallback");
        assert!(!s.fall_back("a", probe_at), "not the first any more");
        let due = s.per_job_due("a", t0);
        assert_eq!(due, ["j1", "j2"]);
        let results = vec![("j1".into(), Ok(())), ("j2".into(), Err("down".into()))];
        s.finish_per_job(&work[0], results, SEC, |_| 3 * SEC);
        assert_eq!(s.jobs_backing_off(), 1);
        let (next, _) = s.take_due(Instant::now() + SEC, SEC);
        assert!(!next[0].try_feed, "job by job before the probe");
        // A VMA that leaves the active set leaves the schedule.
        s.refresh(Vec::new(), vec![vma("a")], PollProtocol::Auto, t0);
        assert_eq!((s.jobs_tracked(), s.jobs_backing_off()), (0, 0));
    }

    #[test]
    fn the_per_job_protocol_never_probes_the_feed() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        s.refresh(
            active(&[("j1", "a")]),
            vec![vma("a")],
            PollProtocol::PerJob,
            t0,
        );
        let (work, _) = s.take_due(t0, SEC);
        assert!(!work[0].try_feed);
    }
}
