//! Group commit: many jobs' changes in one transaction, for the poller's progress feed (one
//! VMA's answer carries every job of it that moved).
//!
//! The jobs are read with one `SELECT ... WHERE id IN (...)`, decided one by one by the same
//! pure functions as [`Store::mutate_job`], and written back with one multi-row `UPDATE ...
//! FROM (VALUES ...)` per 400 jobs (both SQLite and PostgreSQL take it; the `VALUES` columns
//! are `column1`, `column2`, ... on both) and one audit `INSERT` per 100 entries. Each row keeps
//! its optimistic fence (`version = <read version>`): when the statement changes fewer rows
//! than it must, another writer got in between, the transaction is rolled back and every job
//! of the batch goes through [`Store::mutate_job`] on its own, which retries. Audit entries
//! and `job_transition` log lines follow the same rules as the single path (logged after the
//! commit only). A change that ends a job or asks for a stop writes through the single path's
//! statements, inside the same transaction.

use super::batch::Writes;
use super::change::{
    COLUMNS, bind_columns, insert_audits, log_transitions, mark_stop_pending, write_row_change,
};
use super::rows::{JOB_COLUMNS, JobRecord, job_from_row};
use super::{JobChange, Store, StoreError};
use crate::model::now_ms;
use sqlx::{AnyConnection, Row};

/// Jobs per multi-row `UPDATE`: 23 arguments each, under SQLite's 32,766 and the batch's
/// 10,000 before a flush.
const ROWS_PER_UPDATE: usize = 400;
/// Ids per `SELECT ... IN (...)`.
const IDS_PER_SELECT: usize = 1000;

/// What [`Store::mutate_jobs`] did.
#[derive(Debug, Default)]
pub struct ManyOutcome {
    /// The jobs changed, as written.
    pub changed: Vec<JobRecord>,
    /// Jobs asked for that do not exist (they are skipped).
    pub unknown: Vec<String>,
    /// Jobs whose change failed on the single path after a lost race (the rest committed).
    pub failed: Vec<(String, StoreError)>,
    /// Transactions committed (1, or more after a lost race).
    pub transactions: usize,
}

impl Store {
    /// Applies a pure decision to each of `ids` in one transaction (see the module's
    /// documentation). `decide` is given each job (in `ids`' order) with the time of the
    /// transaction and returns `Ok(None)` when there is nothing to do; an `Err` aborts all.
    pub async fn mutate_jobs<F>(
        &self,
        ids: &[String],
        mut decide: F,
    ) -> Result<ManyOutcome, StoreError>
    where
        F: FnMut(&JobRecord, i64) -> Result<Option<JobChange>, StoreError> + Send,
    {
        let mut outcome = ManyOutcome::default();
        if ids.is_empty() {
            return Ok(outcome);
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let mut read = load_jobs(&mut tx, ids).await?;
        let mut changes = Vec::new();
        for id in ids {
            let Some(before) = read.remove(id) else {
                outcome.unknown.push(id.clone());
                continue;
            };
            if let Some(change) = decide(&before, now)? {
                changes.push((before, change));
            }
        }
        if changes.is_empty() {
            return Ok(outcome);
        }
        if write_changes(&mut tx, self.backend, &changes, now).await? {
            tx.commit().await?;
            outcome.transactions = 1;
            for (_, change) in changes {
                log_transitions(&self.metrics, &change.after.job.id, &change.audit);
                outcome.changed.push(change.after);
            }
            return Ok(outcome);
        }
        drop(tx);
        self.one_by_one(changes, &mut decide, &mut outcome).await;
        Ok(outcome)
    }

    /// Active jobs not flagged stalled whose bytes last moved at or before `moved_before`
    /// (unix ms), with their VMA: the stall sweep's candidates.
    pub async fn unmoved_active_jobs(
        &self,
        moved_before: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, vma_id FROM replication_jobs WHERE active = 1 \
             AND stalled_since IS NULL AND bytes_moved_at <= $1",
        )
        .bind(moved_before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("id")?, row.try_get("vma_id")?)))
            .collect()
    }

    /// After a lost race: each job of the batch on its own, re-read and decided again.
    async fn one_by_one<F>(
        &self,
        changes: Vec<(JobRecord, JobChange)>,
        decide: &mut F,
        outcome: &mut ManyOutcome,
    ) where
        F: FnMut(&JobRecord, i64) -> Result<Option<JobChange>, StoreError> + Send,
    {
        for (before, _) in changes {
            let id = before.job.id;
            match self.mutate_job(&id, &mut *decide).await {
                Ok(after) => {
                    outcome.transactions += 1;
                    outcome.changed.push(after);
                }
                Err(e) => outcome.failed.push((id, e)),
            }
        }
    }
}

/// Reads the jobs of `ids` that exist, by id.
async fn load_jobs(
    conn: &mut AnyConnection,
    ids: &[String],
) -> Result<std::collections::HashMap<String, JobRecord>, StoreError> {
    let mut found = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_SELECT) {
        let marks: Vec<String> = (1..=chunk.len()).map(|n| format!("${n}")).collect();
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM replication_jobs WHERE id IN ({})",
            marks.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.clone());
        }
        for row in query.fetch_all(&mut *conn).await? {
            let rec = job_from_row(&row)?;
            found.insert(rec.job.id.clone(), rec);
        }
    }
    Ok(found)
}

/// Writes every change: plain row changes with multi-row `UPDATE`s, the rest (a job ending,
/// a stop asked) with the single path's statements, then all audit entries. `false` when a
/// fence did not hold.
async fn write_changes(
    conn: &mut AnyConnection,
    backend: super::Backend,
    changes: &[(JobRecord, JobChange)],
    now: i64,
) -> Result<bool, StoreError> {
    let mut w = Writes::new(backend);
    let (special, plain): (Vec<_>, Vec<_>) = changes.iter().partition(|(before, change)| {
        change.request_stop || (before.job.status.is_active() && change.after.job.status.is_final())
    });
    let rows: Vec<_> = plain
        .iter()
        .filter(|(before, change)| change.after != *before)
        .map(|(before, change)| (before.version, &change.after))
        .collect();
    for chunk in rows.chunks(ROWS_PER_UPDATE) {
        if !update_rows(conn, &mut w, chunk).await? {
            return Ok(false);
        }
    }
    for (before, change) in special {
        if !write_row_change(conn, &mut w, before, &change.after, now).await? {
            return Ok(false);
        }
        if change.request_stop && !mark_stop_pending(conn, &mut w, &change.after.job.id).await? {
            return Ok(false);
        }
    }
    let entries: Vec<_> = changes
        .iter()
        .flat_map(|(_, c)| c.audit.iter().map(|d| (c.after.job.id.as_str(), d)))
        .collect();
    Ok(insert_audits(conn, &mut w, &entries, now).await? && w.flush(conn).await?)
}

/// One row of the `VALUES` list: id, read version, then [`COLUMNS`], each cast to its type
/// (a NULL argument has no type of its own on PostgreSQL).
fn row_values(w: &mut Writes<'_>, version: i64, rec: &JobRecord) -> Result<String, StoreError> {
    let mut values = vec![w.arg(rec.job.id.clone())?, w.arg(version)?];
    values.extend(bind_columns(w, rec)?);
    let types = ["TEXT", "BIGINT"]
        .into_iter()
        .chain(COLUMNS.iter().map(|(_, t)| *t));
    let cast: Vec<String> = values
        .iter()
        .zip(types)
        .map(|(v, t)| format!("CAST({v} AS {t})"))
        .collect();
    Ok(format!("({})", cast.join(", ")))
}

/// One multi-row `UPDATE` of `rows` (read version, job after), each fenced by its version.
async fn update_rows(
    conn: &mut AnyConnection,
    w: &mut Writes<'_>,
    rows: &[(i64, &JobRecord)],
) -> Result<bool, StoreError> {
    let mut values = Vec::with_capacity(rows.len());
    for (version, rec) in rows {
        values.push(row_values(w, *version, rec)?);
    }
    // VALUES columns: column1 = id, column2 = version, column3.. = COLUMNS.
    let set: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .map(|(n, (name, _))| format!("{name} = v.column{}", n + 3))
        .collect();
    let sql = format!(
        "UPDATE replication_jobs SET {}, version = replication_jobs.version + 1 \
         FROM (VALUES {}) AS v WHERE replication_jobs.id = v.column1 \
         AND replication_jobs.version = v.column2",
        set.join(", "),
        values.join(", ")
    );
    w.end(conn, &sql, rows.len() as u64).await
}

#[cfg(test)]
mod tests {
    use super::COLUMNS;
    use crate::store::rows::JOB_COLUMNS;

    #[test]
    fn every_written_column_is_a_column_the_store_reads() {
        let read: Vec<&str> = JOB_COLUMNS.split(',').map(str::trim).collect();
        // `active` is derived from `status` for the active-set index; it is written, never read.
        for (name, _) in COLUMNS.into_iter().filter(|(name, _)| *name != "active") {
            assert!(read.contains(&name), "{name} is not in {JOB_COLUMNS}");
        }
    }
}
