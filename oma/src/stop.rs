//! Stopping a cancelled job's migratekit on its VMA, until the request gets there.
//!
//! A cancel commits the job `cancelled` together with `stop_pending` (so a crash or a dropped
//! request right after it cannot lose the stop), and only then asks the VMA (a stop for a
//! cancel that did not happen would fail a running job). The request runs in a task of its
//! own, under the job's request guard, so that recovery does not ask at the same time. When
//! the VMA answers (SIGTERM sent, or no process of the job left) the flag is cleared with an
//! audit entry; when it cannot be reached, recovery asks again after each of its runs, in the
//! OMA that holds the recovery lock, until it can. The watchdog signals a process at most
//! once, so a request that got through but whose answer was lost is safe to repeat.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::AppState;
use crate::model::Actor;
use crate::recovery::Recovery;
use crate::store::{JobRecord, PendingStop, Store};
use crate::vma_client::{StopAnswer, VmaClient};

/// Asks the VMA of the just cancelled job `rec` to stop its migratekit, and records the
/// answer. Returns once it is recorded; a client that hangs up does not cut it short.
pub async fn after_cancel(state: &AppState, rec: &JobRecord) {
    let guard = match state.recovery.start_guard(&rec.job.id).await {
        Ok(guard) => guard,
        Err(e) => {
            tracing::warn!(job_id = %rec.job.id, error = %e,
                "cannot ask the VMA to stop the cancelled job now; recovery asks after its next run");
            return;
        }
    };
    let (store, client) = (state.store.clone(), state.vma_client.clone());
    let stop = PendingStop {
        job_id: rec.job.id.clone(),
        vma_id: rec.job.vma_id.clone(),
    };
    let task = tokio::spawn(async move {
        let answer = ask(&store, &client, &stop).await;
        // A failure is recorded too: the operator who cancelled sees at once that the
        // process may still run.
        record(&store, &stop, &answer, Actor::Operator, true).await;
        guard.release().await;
    });
    if let Err(e) = task.await {
        tracing::error!(job_id = %rec.job.id, error = %e, "the stop request's task failed; recovery asks again after its next run");
    }
}

/// Asks again, `concurrency` at a time, for every cancelled job whose stop has not reached
/// its VMA, except jobs with a request to their VMA in flight. A retry that fails again only
/// logs (an audit entry per run would bury the trail). Returns how many got through.
pub async fn retry_pending(recovery: &Recovery, actor: Actor, concurrency: usize) -> usize {
    let pending = match recovery.pending_stops().await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the cancelled jobs still to be stopped; retrying after the next run");
            return 0;
        }
    };
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for stop in pending {
        let (store, client, permits) = (
            recovery.store().clone(),
            recovery.client().clone(),
            Arc::clone(&permits),
        );
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let answer = ask(&store, &client, &stop).await;
            record(&store, &stop, &answer, actor, false).await
        });
    }
    tasks.join_all().await.into_iter().filter(|r| *r).count()
}

async fn ask(store: &Store, client: &VmaClient, stop: &PendingStop) -> StopAnswer {
    match store.get_vma(&stop.vma_id).await {
        Ok(Some(vma)) => client.stop_job(&vma.base_url, &stop.job_id).await,
        Ok(None) => StopAnswer::Failed {
            reason: format!("no VMA is registered under id {}", stop.vma_id),
        },
        Err(e) => StopAnswer::Failed {
            reason: e.to_string(),
        },
    }
}

/// Records the answer; a failure only with `audit_failure`. Returns whether this request
/// was the one that got through.
async fn record(
    store: &Store,
    stop: &PendingStop,
    answer: &StopAnswer,
    actor: Actor,
    audit_failure: bool,
) -> bool {
    let reached = !matches!(answer, StopAnswer::Failed { .. });
    if let StopAnswer::Failed { reason } = answer {
        tracing::warn!(job_id = %stop.job_id, vma_id = %stop.vma_id, %reason,
            "the cancelled job's migratekit could not be stopped and may still run on the VMA; \
             recovery asks again after each run, check that the VMA is reachable");
        if !audit_failure {
            return false;
        }
    }
    let evidence = serde_json::json!({ "vma_id": stop.vma_id, "vma_answer": answer });
    match store
        .record_stop(&stop.job_id, reached, actor, &evidence)
        .await
    {
        Ok(recorded) => reached && recorded,
        Err(e) => {
            tracing::warn!(job_id = %stop.job_id, error = %e, "cannot record the stop request; it is asked again after the next recovery run");
            false
        }
    }
}
