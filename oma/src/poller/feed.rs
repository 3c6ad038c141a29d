//! A VMA on the progress feed: one request per interval (more while the answer says `more`),
//! every job in it applied in one transaction, and a sweep that flags the stalls of jobs the
//! feed leaves out because they did not move.

use super::Poller;
use super::schedule::{FeedOutcome, Work};
use crate::job::{on_progress, on_unmoved};
use api::StoredProgress;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Jobs asked per answer.
const PAGE: u32 = 5000;
/// Answers per poll at most; the rest waits for the next interval.
const MAX_PAGES: usize = 8;
/// Jobs per transaction of the stall sweep.
const SWEEP_CHUNK: usize = 200;

/// Polls one VMA's feed and applies it. `None` when the VMA has no feed (HTTP 404/405).
pub(super) async fn poll(poller: &Arc<Poller>, work: &Work) -> Option<FeedOutcome> {
    let metrics = poller.store.metrics();
    let mut cursor = work.cursor;
    for _ in 0..MAX_PAGES {
        metrics.poll_request("feed");
        let feed = match poller.client.progress_feed(&work.url, cursor, PAGE).await {
            Ok(Some(feed)) => feed,
            Ok(None) => return None,
            Err(e) => {
                metrics.poll("unreachable");
                failed(poller, work, &e.to_string());
                return Some(FeedOutcome::Failed);
            }
        };
        metrics.vma_contact(&work.vma_id);
        if let Err(e) = apply(poller, &work.vma_id, &feed.jobs).await {
            metrics.poll("store_error");
            failed(poller, work, &e);
            return Some(FeedOutcome::Failed);
        }
        metrics.poll("ok");
        poller.note_ok();
        cursor = Some((feed.epoch, feed.cursor));
        if !feed.more {
            break;
        }
    }
    cursor.map(FeedOutcome::Applied)
}

fn failed(poller: &Poller, work: &Work, error: &str) {
    tracing::warn!(event = "poll_feed_failed", vma_id = %work.vma_id, error = %error,
        "progress feed poll failed; backing off");
    poller.note_error(format!("VMA {}: {error}", work.vma_id));
}

/// Applies every job of one answer in one transaction ([`crate::store::Store::mutate_jobs`])
/// through [`on_progress`]. An entry that breaks the contract is skipped (and counted); a
/// job of another VMA, or one the OMA does not know, is left alone.
async fn apply(poller: &Poller, vma_id: &str, jobs: &[StoredProgress]) -> Result<(), String> {
    let metrics = poller.store.metrics();
    let mut entries: HashMap<String, &StoredProgress> = HashMap::with_capacity(jobs.len());
    for progress in jobs {
        if let Err(e) = progress.validate() {
            metrics.poll("invalid_answer");
            let error = format!(
                "job {}: the VMA's answer is not usable ({e}); check the VMA's watchdog version",
                progress.job_id
            );
            tracing::warn!(event = "poll_feed_entry_refused", vma_id, error = %error,
                "a job's progress in the feed breaks the contract; skipped");
            poller.note_error(error);
            continue;
        }
        entries.insert(progress.job_id.as_str().to_owned(), progress);
    }
    if entries.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = entries.keys().cloned().collect();
    let stall_ms = poller.stall_ms();
    let _lane = poller.write_lane().await;
    let outcome = poller
        .store
        .mutate_jobs(&ids, |cur, now| {
            if cur.job.vma_id != vma_id {
                return Ok(None);
            }
            Ok(entries
                .get(&cur.job.id)
                .and_then(|p| on_progress(cur, p, now, stall_ms)))
        })
        .await
        .map_err(|e| e.to_string())?;
    for (job_id, error) in outcome.failed {
        poller.note_error(format!("job {job_id}: {error}"));
    }
    Ok(())
}

/// Starts the stall sweep unless one runs.
pub(super) fn spawn_stall_sweep(poller: &Arc<Poller>) {
    if poller.sweeping.swap(true, Ordering::AcqRel) {
        return;
    }
    let poller = Arc::clone(poller);
    tokio::spawn(async move {
        if let Err(e) = stall_sweep(&poller).await {
            tracing::warn!(event = "poll_stall_sweep_failed", error = %e,
                "the stall check of jobs on the progress feed failed; retrying next interval");
        }
        poller.sweeping.store(false, Ordering::Release);
    });
}

/// Flags the jobs of VMAs on the feed whose bytes have not moved for the stall threshold:
/// the feed leaves them out, so no answer would. Only VMAs whose feed answered within the
/// last two intervals: an unreachable VMA's jobs are not known to be unmoved.
async fn stall_sweep(poller: &Poller) -> Result<(), crate::store::StoreError> {
    let stall_ms = poller.stall_ms();
    let moved_before = crate::model::now_ms().saturating_sub(stall_ms);
    let candidates = poller.store.unmoved_active_jobs(moved_before).await?;
    if candidates.is_empty() {
        return Ok(());
    }
    let since = tokio::time::Instant::now()
        .checked_sub(poller.config.interval * 2)
        .unwrap_or_else(tokio::time::Instant::now);
    let healthy = poller.lock_schedule().feed_ok_since(since);
    let ids: Vec<String> = candidates
        .into_iter()
        .filter(|(_, vma)| healthy.contains(vma))
        .map(|(id, _)| id)
        .collect();
    // In transactions of a feed answer's usual size, each in the lane on its own: a fleet
    // stalling at once (a datastore gone slow) must not hold the database for one long write.
    for chunk in ids.chunks(SWEEP_CHUNK) {
        let _lane = poller.write_lane().await;
        poller
            .store
            .mutate_jobs(chunk, |cur, now| Ok(on_unmoved(cur, now, stall_ms)))
            .await?;
    }
    Ok(())
}
