//! A VMA polled job by job (`--poll-protocol per-job`, or a watchdog older than the feed):
//! one request per due job, at most `per_vma_concurrency` in flight.

use super::Poller;
use super::schedule::Work;
use crate::job::on_progress;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Polls each of `due` on the VMA and returns each outcome.
pub(super) async fn round(
    poller: &Arc<Poller>,
    work: &Work,
    due: Vec<String>,
) -> Vec<(String, Result<(), String>)> {
    let permits = Arc::new(Semaphore::new(poller.config.per_vma_concurrency.max(1)));
    let mut polls = JoinSet::new();
    for job_id in due {
        let (poller, permits, work) = (Arc::clone(poller), Arc::clone(&permits), work.clone());
        polls.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let result = poll(&poller, &job_id, &work.vma_id, &work.url).await;
            (job_id, result)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = polls.join_next().await {
        if let Ok(result) = joined {
            results.push(result);
        }
    }
    results
}

/// Polls one job's progress on its VMA and applies it; counts the poll and the VMA's answer
/// in the metrics.
async fn poll(poller: &Poller, job_id: &str, vma_id: &str, url: &str) -> Result<(), String> {
    let metrics = poller.store.metrics();
    metrics.poll_request("per_job");
    let answer = poller.client.progress(url, job_id).await;
    let answer_failed = answer.is_err();
    if !answer_failed {
        metrics.vma_contact(vma_id);
    }
    let stall_ms = poller.stall_ms();
    let result = match answer {
        Ok(Some(progress)) => {
            let _lane = poller.write_lane().await;
            poller
                .store
                .mutate_job(job_id, |cur, now| {
                    Ok(on_progress(cur, &progress, now, stall_ms))
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    metrics.poll(match &result {
        Ok(()) => "ok",
        Err(_) if answer_failed => "unreachable",
        Err(_) => "store_error",
    });
    match &result {
        Ok(()) => poller.note_ok(),
        Err(error) => {
            tracing::warn!(event = "poll_failed", job_id = %job_id, error = %error,
                "progress poll failed; backing off");
            poller.note_error(format!("job {job_id}: {error}"));
        }
    }
    result
}
