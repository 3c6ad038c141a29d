//! Stop requests for cancelled jobs: whether one still has to reach the job's VMA.

use super::batch::Writes;
use super::{Store, StoreError};
use crate::model::{Actor, now_ms};
use sqlx::Row;
use uuid::Uuid;

/// A cancelled job whose VMA has not yet been told to stop its migratekit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingStop {
    /// The job.
    pub job_id: String,
    /// Its VMA.
    pub vma_id: String,
}

impl Store {
    /// Records the answer to a stop request for `job_id` as an audit entry `stop_requested`
    /// (the job's status unchanged). When the request `reached` the VMA (SIGTERM sent, or no
    /// process left to signal) it also clears `stop_pending`, and writes both only if the flag
    /// was still set: returns `false`, writing nothing, when another request got there first.
    pub async fn record_stop(
        &self,
        job_id: &str,
        reached: bool,
        actor: Actor,
        evidence: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let mut w = Writes::new(self.backend);
        // The entry first, conditioned on the flag the next statement clears.
        let sql = format!(
            "INSERT INTO job_audit (id, job_id, at, from_status, to_status, actor, action, \
             failure_class, evidence) SELECT {}, id, {}, status, status, {}, \
             'stop_requested', NULL, {} FROM replication_jobs WHERE id = {}{}",
            w.arg(Uuid::now_v7().to_string())?,
            w.arg(now)?,
            w.arg(actor.as_str())?,
            w.arg(evidence.to_string())?,
            w.arg(job_id.to_owned())?,
            if reached { " AND stop_pending = 1" } else { "" }
        );
        let mut written = w.end(&mut tx, &sql, 1).await?;
        if reached && written {
            let sql = format!(
                "UPDATE replication_jobs SET stop_pending = 0 WHERE id = {} AND stop_pending = 1",
                w.arg(job_id.to_owned())?
            );
            written = w.end(&mut tx, &sql, 1).await?;
        }
        if !(written && w.flush(&mut tx).await?) {
            // Nothing to record: the flag was cleared meanwhile, or the job is gone.
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Cancelled jobs whose stop request has not reached their VMA yet, oldest first.
    pub async fn pending_stops(&self) -> Result<Vec<PendingStop>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, vma_id FROM replication_jobs WHERE stop_pending = 1 ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingStop {
                    job_id: r.try_get("id")?,
                    vma_id: r.try_get("vma_id")?,
                })
            })
            .collect()
    }
}
