//! The latest progress of every job, as migratekit posts it, kept on disk in the state dir.
//!
//! Format: one append-only JSON-lines log (`progress.jsonl`), one record per update, compacted
//! to one line per job when the store opens and whenever the log has grown to several times
//! the number of jobs. Measured on this machine's disk (`cargo run -p vma-watchdog --example
//! bench_progress 4000`, 40 jobs): append + `fdatasync` about 270 updates/s (p50 4 ms), the
//! atomic rewrite of a per-job file (temp, fsync, rename, dir fsync) about 100 updates/s
//! (p50 11 ms), and this store with 40 jobs posting at once about 5,700 updates/s thanks to
//! group commit (p50 6 ms, p99 18 ms). migratekit posts a few times a second per job, so
//! dozens of jobs fit with a wide margin; the rewrite would not.
//!
//! Every update is written and `fdatasync`ed before the post is answered: a watchdog crash
//! (and even a host crash) loses nothing that migratekit was told is stored. Concurrent
//! updates share one `fdatasync` (group commit), so throughput grows with the number of jobs
//! posting at once instead of being capped at one sync per update.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use api::{JobId, ProgressFeed, ProgressFeedQuery, ProgressUpdate, StoredProgress};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::disk;

mod feed;

use feed::ChangeIndex;
pub use feed::MAX_FEED_JOBS;

/// File name of the progress log inside the state directory.
pub const LOG_FILE: &str = "progress.jsonl";
/// The log is compacted when it holds more lines than this and more than
/// [`COMPACT_FACTOR`] lines per job, which keeps compaction cost amortised O(1) per update.
const COMPACT_MIN_LINES: u64 = if cfg!(test) { 64 } else { 4096 };
const COMPACT_FACTOR: u64 = 8;
/// At most this many jobs' progress is kept, as many as the registry keeps last exits of
/// (`crate::registry::MAX_LAST_EXITS`). A job's progress is normally forgotten once the OMA
/// has acknowledged its death (see `crate::daemon`); this bound holds when nothing is
/// acknowledged (no `--oma-url`, an OMA down for weeks). Each entry is at most about 2 KB
/// (`api::bounds`), so the store stays under about 20 MB in memory.
pub const MAX_JOBS: usize = 10_000;

/// Errors of the progress store. Each says which file failed; the fix is usually disk space
/// or permissions on the state directory.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The state directory or the log could not be created, read or opened.
    #[error(
        "cannot open the progress log {path}: {source}; check that the state directory exists and is writable"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An update could not be made durable.
    #[error(
        "cannot write the progress log {path}: {source}; check free space on the state directory's filesystem"
    )]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An update could not be encoded (cannot happen with valid `f64`s; NaN percent would).
    #[error("cannot encode a progress update for job {job_id}: {source}")]
    Encode {
        /// The job.
        job_id: JobId,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// One line of the log, as read. The update stays raw JSON and the forgotten id text until
/// the job id has been checked, so that a line whose id a newer rule refuses (an older
/// watchdog took `:` in job ids) is skipped on its own with a warning that says so, instead
/// of passing for a corrupt line.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    /// The latest update of a job.
    Update(serde_json::Value),
    /// The job's progress was forgotten.
    Forget(String),
}

#[derive(Debug)]
struct Inner {
    latest: HashMap<JobId, StoredProgress>,
    /// The jobs by their latest change, for the feed.
    changes: ChangeIndex,
    /// Shared so that a sync can run without holding the lock (group commit).
    log: Arc<File>,
    /// Lines in the log, for the compaction rule.
    lines: u64,
    /// Bytes in the log: a failed write is cut back to here so that no later line is
    /// glued to a partial one.
    len: u64,
    /// Lines written since open, and how many of them are known durable.
    written: u64,
    synced: u64,
    /// A thread is running `fdatasync` for the others.
    syncing: bool,
}

/// Latest progress per job, durable across restarts. Methods block on disk I/O (an
/// `fdatasync`, shared by the updates that arrive while it runs): call them from
/// `spawn_blocking` in async code.
#[derive(Debug)]
pub struct ProgressStore {
    path: PathBuf,
    /// At most this many jobs; see [`MAX_JOBS`].
    max_jobs: usize,
    inner: Mutex<Inner>,
    synced: Condvar,
}

impl ProgressStore {
    /// Opens (or creates) the store in `state_dir`, loads it and compacts its log.
    ///
    /// A torn last line (a crash in the middle of a write) is skipped with a warning; the
    /// previous update of that job is kept.
    pub fn open(state_dir: &Path) -> Result<Self, ProgressError> {
        Self::open_bounded(state_dir, MAX_JOBS)
    }

    /// [`ProgressStore::open`] keeping at most `max_jobs` jobs (at least 1): past it, the job
    /// whose latest update is the oldest is forgotten to make room for a new one.
    pub fn open_bounded(state_dir: &Path, max_jobs: usize) -> Result<Self, ProgressError> {
        let max_jobs = max_jobs.max(1);
        let path = state_dir.join(LOG_FILE);
        let open_err = |source| ProgressError::Open {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(open_err)?;
        let (records, damage) = disk::read_json_lines::<Record>(&path).map_err(open_err)?;
        if damage.torn_tail {
            tracing::warn!(file = %path.display(), "skipped a torn last line in the progress log (a write interrupted by a crash); the job keeps its previous update");
        }
        if !damage.corrupt_lines.is_empty() {
            tracing::error!(file = %path.display(), lines = ?damage.corrupt_lines, "skipped corrupt lines in the progress log; the affected jobs keep their previous update");
        }
        let mut latest = replay(&path, records);
        // A log written with a larger bound (or none) is cut down as it is read.
        while latest.len() > max_jobs {
            let Some(oldest) = oldest_job(&latest) else {
                break;
            };
            latest.remove(&oldest);
            evicted(&oldest, max_jobs);
        }
        let log = write_compacted(&path, &latest).map_err(open_err)?;
        disk::sync_dir(state_dir).map_err(open_err)?;
        let len = log.metadata().map_err(open_err)?.len();
        let log = Arc::new(log);
        let lines = latest.len() as u64;
        let changes = index_loaded(&latest);
        Ok(Self {
            path,
            max_jobs,
            inner: Mutex::new(Inner {
                latest,
                changes,
                log,
                lines,
                len,
                written: 0,
                synced: 0,
                syncing: false,
            }),
            synced: Condvar::new(),
        })
    }

    /// Stores `update` as the latest of `job_id`, durably, and returns what was stored.
    pub fn record(
        &self,
        job_id: &JobId,
        update: ProgressUpdate,
    ) -> Result<StoredProgress, ProgressError> {
        let mut inner = self.lock();
        if !inner.latest.contains_key(job_id) && inner.latest.len() >= self.max_jobs {
            self.evict_oldest(&mut inner)?;
        }
        let sequence = inner.latest.get(job_id).map_or(0, |p| p.sequence) + 1;
        let stored = StoredProgress {
            job_id: job_id.clone(),
            update,
            received_at: Utc::now(),
            sequence,
        };
        let mine = self.append(&mut inner, &RecordRef::Update(&stored), job_id)?;
        inner.latest.insert(job_id.clone(), stored.clone());
        inner.changes.changed(job_id);
        self.maybe_compact(&mut inner)?;
        self.wait_durable(inner, mine)?;
        Ok(stored)
    }

    /// The latest progress of `job_id`, if any was received.
    pub fn get(&self, job_id: &str) -> Option<StoredProgress> {
        self.lock().latest.get(job_id).cloned()
    }

    /// Every job's latest progress.
    pub fn all(&self) -> Vec<StoredProgress> {
        self.lock().latest.values().cloned().collect()
    }

    /// The latest progress of every job that changed after the query's cursor, oldest change
    /// first, at most `limit` (default and cap [`MAX_FEED_JOBS`]); see the `feed` module.
    pub fn feed(&self, query: &ProgressFeedQuery) -> ProgressFeed {
        let limit = query
            .limit
            .filter(|&l| l > 0)
            .map_or(MAX_FEED_JOBS, |l| l as usize);
        let inner = self.lock();
        let page = inner.changes.page(query.since, query.epoch, limit);
        let jobs = page
            .jobs
            .iter()
            .filter_map(|id| inner.latest.get(id).cloned())
            .collect();
        ProgressFeed {
            epoch: page.epoch,
            cursor: page.cursor,
            more: page.more,
            jobs,
        }
    }

    /// Forgets a job's progress (for example once the OMA has recorded its final state).
    /// Returns whether there was any.
    pub fn forget(&self, job_id: &JobId) -> Result<bool, ProgressError> {
        let mut inner = self.lock();
        if !inner.latest.contains_key(job_id) {
            return Ok(false);
        }
        let mine = self.append(&mut inner, &RecordRef::Forget(job_id), job_id)?;
        inner.latest.remove(job_id);
        inner.changes.forgot(job_id);
        self.wait_durable(inner, mine)?;
        Ok(true)
    }

    /// Forgets the progress of each of `job_ids` that has any, with one sync for all.
    /// Returns how many had some.
    pub fn forget_many(&self, job_ids: &[JobId]) -> Result<usize, ProgressError> {
        let mut inner = self.lock();
        let mut mine = None;
        let mut forgotten = 0;
        for job_id in job_ids {
            if inner.latest.contains_key(job_id) {
                mine = Some(self.append(&mut inner, &RecordRef::Forget(job_id), job_id)?);
                inner.latest.remove(job_id);
                inner.changes.forgot(job_id);
                forgotten += 1;
            }
        }
        if let Some(mine) = mine {
            self.wait_durable(inner, mine)?;
        }
        Ok(forgotten)
    }

    /// How many jobs have progress.
    pub fn len(&self) -> usize {
        self.lock().latest.len()
    }

    /// True when no job has progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes room for a new job at the bound: forgets the job whose latest update is the
    /// oldest. A running job posts every few seconds, so that is one long finished, whose
    /// death the OMA has had all that time to record. The scan is O(jobs), and runs only
    /// when a new job arrives at a full store.
    fn evict_oldest(&self, inner: &mut Inner) -> Result<(), ProgressError> {
        let Some(oldest) = oldest_job(&inner.latest) else {
            return Ok(());
        };
        // Not synced here: the caller's own line follows, and its sync covers both.
        self.append(inner, &RecordRef::Forget(&oldest), &oldest)?;
        inner.latest.remove(&oldest);
        inner.changes.forgot(&oldest);
        evicted(&oldest, self.max_jobs);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one line (not yet synced) and returns its number for [`Self::wait_durable`].
    fn append(
        &self,
        inner: &mut Inner,
        record: &RecordRef<'_>,
        job_id: &JobId,
    ) -> Result<u64, ProgressError> {
        let mut line = serde_json::to_vec(record).map_err(|source| ProgressError::Encode {
            job_id: job_id.clone(),
            source,
        })?;
        line.push(b'\n');
        let write_err = |source| ProgressError::Write {
            path: self.path.clone(),
            source,
        };
        if let Err(e) = (&*inner.log).write_all(&line) {
            // Cut a partial line off, so the next append starts on a line of its own.
            let _ = inner.log.set_len(inner.len);
            return Err(write_err(e));
        }
        inner.len += line.len() as u64;
        inner.lines += 1;
        inner.written += 1;
        Ok(inner.written)
    }

    /// Returns once line `mine` is on disk. Group commit: one caller runs `fdatasync` for
    /// every line written so far while the others wait, so concurrent updates share one
    /// sync instead of queueing for one each.
    fn wait_durable<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        mine: u64,
    ) -> Result<(), ProgressError> {
        loop {
            if inner.synced >= mine {
                return Ok(());
            }
            if inner.syncing {
                inner = self.synced.wait(inner).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            inner.syncing = true;
            let target = inner.written;
            let log = Arc::clone(&inner.log);
            drop(inner);
            let result = log.sync_data();
            inner = self.lock();
            inner.syncing = false;
            if result.is_ok() {
                inner.synced = inner.synced.max(target);
            }
            self.synced.notify_all();
            result.map_err(|source| ProgressError::Write {
                path: self.path.clone(),
                source,
            })?;
        }
    }

    fn maybe_compact(&self, inner: &mut Inner) -> Result<(), ProgressError> {
        let jobs = inner.latest.len() as u64;
        if inner.lines <= COMPACT_MIN_LINES || inner.lines <= COMPACT_FACTOR * jobs {
            return Ok(());
        }
        let log =
            write_compacted(&self.path, &inner.latest).map_err(|source| ProgressError::Write {
                path: self.path.clone(),
                source,
            })?;
        // The compacted file was fsynced whole, so every line written so far is durable.
        inner.len = log.metadata().map(|m| m.len()).unwrap_or(0);
        inner.log = Arc::new(log);
        inner.lines = jobs;
        inner.synced = inner.written;
        disk::sync_dir(self.path.parent().unwrap_or(Path::new("."))).map_err(|source| {
            ProgressError::Write {
                path: self.path.clone(),
                source,
            }
        })?;
        Ok(())
    }
}

/// The change index of the jobs loaded at open, numbered in the order their latest updates
/// came (ties by job id), so the first answer of the feed is oldest first too.
fn index_loaded(latest: &HashMap<JobId, StoredProgress>) -> ChangeIndex {
    let mut loaded: Vec<&StoredProgress> = latest.values().collect();
    loaded.sort_by(|a, b| (a.received_at, &a.job_id).cmp(&(b.received_at, &b.job_id)));
    let mut index = ChangeIndex::new();
    for stored in loaded {
        index.changed(&stored.job_id);
    }
    index
}

/// The job whose latest update came first (ties by job id, so the choice is stable).
fn oldest_job(latest: &HashMap<JobId, StoredProgress>) -> Option<JobId> {
    latest
        .values()
        .min_by(|a, b| (a.received_at, &a.job_id).cmp(&(b.received_at, &b.job_id)))
        .map(|p| p.job_id.clone())
}

fn evicted(job_id: &JobId, max_jobs: usize) {
    tracing::warn!(event = "progress_evicted", job_id = %job_id, max_jobs,
        "the progress store is full; forgot the job whose latest update is the oldest");
}

/// Writes a new log with one line per job and renames it over the old one; the returned
/// handle is on the new file (see [`disk::replace_keep_open`]). The caller syncs the dir.
fn write_compacted(path: &Path, latest: &HashMap<JobId, StoredProgress>) -> std::io::Result<File> {
    let mut contents = Vec::new();
    for stored in latest.values() {
        // Serializing a value we hold cannot fail except for a NaN percent, which
        // serde_json writes as null; that line is then skipped on the next load.
        if let Ok(mut line) = serde_json::to_vec(&RecordRef::Update(stored)) {
            line.push(b'\n');
            contents.extend_from_slice(&line);
        }
    }
    disk::replace_keep_open(path, &contents)
}

/// The latest update per job from the log's records, in order. A record whose job id breaks
/// the rule is skipped with a warning; an update that is otherwise malformed is skipped as a
/// corrupt one, with an error line.
fn replay(path: &Path, records: Vec<Record>) -> HashMap<JobId, StoredProgress> {
    let skipped = |error: &dyn std::fmt::Display| {
        tracing::warn!(event = "progress_entry_skipped", file = %path.display(), reason = %error,
            "skipped a progress record whose job id is not valid under the job-id rule; that job's progress is forgotten");
    };
    let mut latest = HashMap::new();
    for record in records {
        match record {
            Record::Update(value) => {
                let id = value
                    .get("job_id")
                    .and_then(|v| v.as_str())
                    .map(JobId::parse);
                if let Some(Err(error)) = id {
                    skipped(&error);
                    continue;
                }
                match serde_json::from_value::<StoredProgress>(value) {
                    Ok(stored) => {
                        latest.insert(stored.job_id.clone(), stored);
                    }
                    Err(error) => {
                        tracing::error!(event = "progress_entry_skipped", file = %path.display(), %error,
                            "skipped a corrupt progress record; the job keeps its previous update");
                    }
                }
            }
            Record::Forget(job_id) => match JobId::parse(&job_id) {
                Ok(id) => {
                    latest.remove(&id);
                }
                Err(error) => skipped(&error),
            },
        }
    }
    latest
}

/// Borrowing twin of [`Record`], so writing does not clone every update.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum RecordRef<'a> {
    Update(&'a StoredProgress),
    Forget(&'a JobId),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> JobId {
        JobId::parse(text).unwrap()
    }

    fn update(bytes: u64) -> ProgressUpdate {
        serde_json::from_value(serde_json::json!({
            "stage": "Transfer", "bytes_transferred": bytes, "throughput_bps": 10
        }))
        .unwrap()
    }

    #[test]
    fn latest_update_and_sequence_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        store.record(&id("job-a"), update(1)).unwrap();
        store.record(&id("job-a"), update(2)).unwrap();
        store.record(&id("job-b"), update(7)).unwrap();
        drop(store);
        let store = ProgressStore::open(dir.path()).unwrap();
        let a = store.get("job-a").unwrap();
        assert_eq!((a.update.bytes_transferred, a.sequence), (2, 2));
        assert_eq!(store.record(&id("job-a"), update(3)).unwrap().sequence, 3);
        assert_eq!(store.get("job-b").unwrap().update.bytes_transferred, 7);
    }

    #[test]
    fn torn_last_line_keeps_the_previous_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        store.record(&id("job-a"), update(1)).unwrap();
        drop(store);
        let mut log = disk::open_append(&dir.path().join(LOG_FILE)).unwrap();
        log.write_all(br#"{"update":{"job_id":"job-a","upd"#)
            .unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        assert_eq!(store.get("job-a").unwrap().update.bytes_transferred, 1);
        // The log was rewritten clean, so the next append is not glued to the torn line.
        store.record(&id("job-a"), update(5)).unwrap();
        drop(store);
        let store = ProgressStore::open(dir.path()).unwrap();
        assert_eq!(store.get("job-a").unwrap().update.bytes_transferred, 5);
    }

    #[test]
    fn concurrent_updates_are_all_durable_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ProgressStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 1..=50 {
                        let stored = store.record(&id(&format!("job-{t}")), update(i)).unwrap();
                        assert_eq!(stored.sequence, i);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(store);
        let store = ProgressStore::open(dir.path()).unwrap();
        for t in 0..8 {
            let stored = store.get(&format!("job-{t}")).unwrap();
            assert_eq!((stored.sequence, stored.update.bytes_transferred), (50, 50));
        }
    }

    #[test]
    fn compaction_bounds_the_log_and_forget_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        for i in 0..(COMPACT_MIN_LINES + 10) {
            store.record(&id("job-a"), update(i)).unwrap();
        }
        let lines = std::fs::read_to_string(dir.path().join(LOG_FILE))
            .unwrap()
            .lines()
            .count() as u64;
        assert!(lines < 100, "log not compacted: {lines} lines");
        assert!(store.forget(&id("job-a")).unwrap());
        drop(store);
        let store = ProgressStore::open(dir.path()).unwrap();
        assert!(store.get("job-a").is_none());
    }

    #[test]
    fn past_the_bound_the_oldest_job_is_forgotten_also_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open_bounded(dir.path(), 3).unwrap();
        for job in ["job-1", "job-2", "job-3"] {
            store.record(&id(job), update(1)).unwrap();
        }
        // An update of a known job takes no room.
        store.record(&id("job-1"), update(2)).unwrap();
        assert_eq!(store.len(), 3);
        // A new job makes room by forgetting the one updated longest ago: job-2.
        store.record(&id("job-4"), update(1)).unwrap();
        assert_eq!(store.len(), 3);
        assert!(store.get("job-2").is_none());
        assert_eq!(store.get("job-1").unwrap().update.bytes_transferred, 2);
        drop(store);
        let store = ProgressStore::open_bounded(dir.path(), 3).unwrap();
        assert!(store.get("job-2").is_none(), "the eviction is durable");
        assert_eq!(store.len(), 3);
        drop(store);
        // A smaller bound cuts the log down as it is read, oldest first.
        let store = ProgressStore::open_bounded(dir.path(), 2).unwrap();
        assert_eq!(store.len(), 2);
        assert!(store.get("job-3").is_none());
        assert!(store.get("job-1").is_some() && store.get("job-4").is_some());
    }

    #[test]
    fn a_flood_of_new_jobs_stays_within_the_bound_on_disk_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open_bounded(dir.path(), 10).unwrap();
        for i in 0..(COMPACT_MIN_LINES * 4) {
            store.record(&id(&format!("job-{i}")), update(i)).unwrap();
        }
        assert_eq!(store.len(), 10);
        let lines = std::fs::read_to_string(dir.path().join(LOG_FILE))
            .unwrap()
            .lines()
            .count() as u64;
        // Compaction keeps it at one line per job once it passes its threshold.
        let threshold = COMPACT_MIN_LINES.max(COMPACT_FACTOR * 10);
        assert!(lines <= threshold + 2, "log not bounded: {lines} lines");
    }

    #[test]
    fn forget_many_forgets_those_with_progress_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        store.record(&id("job-a"), update(1)).unwrap();
        store.record(&id("job-b"), update(1)).unwrap();
        let forgotten = store
            .forget_many(&[id("job-a"), id("job-b"), id("job-none")])
            .unwrap();
        assert_eq!(forgotten, 2);
        assert!(store.is_empty());
        assert_eq!(store.forget_many(&[id("job-a")]).unwrap(), 0);
        drop(store);
        assert!(ProgressStore::open(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_record_with_an_id_the_rule_refuses_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        store.record(&id("job-a"), update(1)).unwrap();
        drop(store);
        // Lines an older watchdog could write: ':' was allowed in job ids then.
        let mut log = disk::open_append(&dir.path().join(LOG_FILE)).unwrap();
        let old = serde_json::json!({"update": {"job_id": "job:old", "update":
            {"stage": "Transfer", "bytes_transferred": 3, "throughput_bps": 1},
            "received_at": "2026-01-01T00:00:00Z", "sequence": 1}});
        writeln!(log, "{old}").unwrap();
        writeln!(log, r#"{{"forget":"job:old"}}"#).unwrap();
        let store = ProgressStore::open(dir.path()).unwrap();
        assert_eq!(store.get("job-a").unwrap().update.bytes_transferred, 1);
        assert!(store.get("job:old").is_none());
        assert_eq!(store.all().len(), 1);
    }
}
