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
    /// Records the outcome of a stop request for `job_id`: whether a stop is still `pending`
    /// and, with `evidence`, an audit entry `stop_requested` (the job's status unchanged) in
    /// the same transaction.
    pub async fn record_stop(
        &self,
        job_id: &str,
        pending: bool,
        audit: Option<(Actor, serde_json::Value)>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let mut w = Writes::new(self.backend);
        let sql = format!(
            "UPDATE replication_jobs SET stop_pending = {} WHERE id = {}",
            w.arg(i64::from(pending))?,
            w.arg(job_id.to_owned())?
        );
        let mut written = w.end(&mut tx, &sql, 1).await?;
        if let Some((actor, evidence)) = audit {
            let sql = format!(
                "INSERT INTO job_audit (id, job_id, at, from_status, to_status, actor, action, \
                 failure_class, evidence) SELECT {}, id, {}, status, status, {}, \
                 'stop_requested', NULL, {} FROM replication_jobs WHERE id = {}",
                w.arg(Uuid::now_v7().to_string())?,
                w.arg(now)?,
                w.arg(actor.as_str())?,
                w.arg(evidence.to_string())?,
                w.arg(job_id.to_owned())?
            );
            written &= w.end(&mut tx, &sql, 1).await?;
        }
        if !(written && w.flush(&mut tx).await?) {
            return Err(StoreError::UnknownJob(job_id.to_owned()));
        }
        tx.commit().await?;
        Ok(())
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
