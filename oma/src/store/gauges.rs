//! The figures the metrics read at each scrape: jobs by status, the oldest active job's last
//! progress, stalled jobs. Two aggregate queries, cheap beside a scrape every few seconds.

use super::{Store, StoreError};
use crate::model::JobStatus;
use sqlx::Row;
use std::collections::HashMap;

/// What the database says about the jobs, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobGauges {
    /// Jobs by status (statuses with no job are absent).
    pub by_status: HashMap<JobStatus, i64>,
    /// The earliest "last sign of life" among active jobs (last progress, else start, else
    /// creation), unix milliseconds; `None` when no job is active.
    pub oldest_active_progress_ms: Option<i64>,
    /// Active jobs flagged stalled.
    pub stalled: i64,
}

impl Store {
    /// Reads [`JobGauges`].
    pub async fn job_gauges(&self) -> Result<JobGauges, StoreError> {
        let rows =
            sqlx::query("SELECT status, COUNT(*) AS n FROM replication_jobs GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let mut by_status = HashMap::new();
        for row in &rows {
            let text: String = row.try_get("status")?;
            let status = JobStatus::parse(&text).ok_or(StoreError::Corrupt {
                column: "replication_jobs.status",
                value: text,
            })?;
            by_status.insert(status, row.try_get::<i64, _>("n")?);
        }
        let row = sqlx::query(
            "SELECT MIN(COALESCE(last_progress_at, started_at, created_at)) AS oldest, \
             COUNT(stalled_since) AS stalled FROM replication_jobs WHERE active = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(JobGauges {
            by_status,
            oldest_active_progress_ms: row.try_get("oldest")?,
            stalled: row.try_get("stalled")?,
        })
    }
}
