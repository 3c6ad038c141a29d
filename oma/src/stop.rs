//! Stopping a cancelled job's migratekit on its VMA, until the request gets there.
//!
//! A cancel is committed first and the VMA asked afterwards (a stop for a cancel that did not
//! happen would fail a running job). When the VMA cannot be reached, the job keeps
//! `stop_pending`, and recovery asks again every interval until the VMA answers that it sent
//! SIGTERM or that no process of the job runs there. Once a stop has reached the VMA it is not
//! repeated: a second SIGTERM could cut short migratekit's own orderly shutdown.

use crate::model::Actor;
use crate::store::{JobRecord, Store};
use crate::vma_client::{StopAnswer, VmaClient};

/// Asks the VMA of the cancelled job `rec` to stop its migratekit and records the answer
/// (audit entry `stop_requested`; `stop_pending` while the request has not got through).
pub async fn after_cancel(store: &Store, client: &VmaClient, rec: &JobRecord) {
    let answer = ask(store, client, &rec.job.vma_id, &rec.job.id).await;
    record(
        store,
        &rec.job.id,
        &rec.job.vma_id,
        &answer,
        Actor::Operator,
        true,
    )
    .await;
}

/// Asks again for every cancelled job whose stop has not reached its VMA yet. A retry that
/// fails again only logs (one audit entry per interval would bury the trail); the one that
/// gets through is recorded. Returns how many got through.
pub async fn retry_pending(store: &Store, client: &VmaClient, actor: Actor) -> usize {
    let pending = match store.pending_stops().await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the cancelled jobs still to be stopped; retrying next interval");
            return 0;
        }
    };
    let mut reached = 0;
    for stop in pending {
        let answer = ask(store, client, &stop.vma_id, &stop.job_id).await;
        let got_through = !matches!(answer, StopAnswer::Failed { .. });
        record(
            store,
            &stop.job_id,
            &stop.vma_id,
            &answer,
            actor,
            got_through,
        )
        .await;
        reached += usize::from(got_through);
    }
    reached
}

async fn ask(store: &Store, client: &VmaClient, vma_id: &str, job_id: &str) -> StopAnswer {
    match store.get_vma(vma_id).await {
        Ok(Some(vma)) => client.stop_job(&vma.base_url, job_id).await,
        Ok(None) => StopAnswer::Failed {
            reason: format!("no VMA is registered under id {vma_id}"),
        },
        Err(e) => StopAnswer::Failed {
            reason: e.to_string(),
        },
    }
}

/// Stores the answer: `stop_pending` unless it got through, and with `audit` an audit entry.
async fn record(
    store: &Store,
    job_id: &str,
    vma_id: &str,
    answer: &StopAnswer,
    actor: Actor,
    audit: bool,
) {
    let pending = matches!(answer, StopAnswer::Failed { .. });
    if let StopAnswer::Failed { reason } = answer {
        tracing::warn!(job_id, vma_id, %reason,
            "the cancelled job's migratekit could not be stopped and may still run on the VMA; \
             recovery asks again every interval, check that the VMA is reachable");
    }
    let evidence = serde_json::json!({ "vma_id": vma_id, "vma_answer": answer });
    if let Err(e) = store
        .record_stop(job_id, pending, audit.then_some((actor, evidence)))
        .await
    {
        tracing::warn!(job_id, error = %e, "cannot record the stop request; it is asked again next interval");
    }
}
