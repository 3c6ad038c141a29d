//! Jobs, VM contexts and VMAs: creation, reads, and the generic fenced job mutation.

use super::batch::Writes;
use super::change::{AuditDraft, JobChange, commit_change, insert_audits, log_transitions};
use super::rows::{
    CONTEXT_COLUMNS, DECISION_COLUMNS, JOB_COLUMNS, JobRecord, audit_from_row, context_from_row,
    decision_record_from_row, job_from_row,
};
use super::{MAX_ATTEMPTS, Store, StoreError};
use crate::model::{Actor, AuditEntry, ContextStatus, JobStatus, VmContext, now_ms};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use utoipa::{IntoParams, ToSchema};

/// Body of `POST /api/v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// Job id; generated (UUID v7) when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// The VM context to replicate; created when it does not exist yet.
    pub vm_context_id: String,
    /// VM name; required when the context is new.
    #[serde(default)]
    pub vm_name: Option<String>,
    /// The registered VMA that runs the job.
    pub vma_id: String,
    /// `full` or `incremental`.
    #[serde(default)]
    pub sync_type: Option<String>,
}

/// Filters of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
// `ApiQuery` is not axum's `Query`, so utoipa cannot tell where these go: say it.
#[into_params(parameter_in = Query)]
pub struct JobFilter {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs of this VMA.
    pub vma_id: Option<String>,
    /// Only jobs of this VM context.
    pub vm_context_id: Option<String>,
    /// At most this many (default 100, from 1 to 1000), newest first.
    #[param(schema_with = limit_schema)]
    pub limit: Option<i64>,
    /// Skip this many (default 0).
    #[param(schema_with = offset_schema)]
    pub offset: Option<i64>,
}

impl JobFilter {
    /// Jobs listed when `limit` is absent.
    pub const DEFAULT_LIMIT: i64 = 100;
    /// Largest `limit`.
    pub const MAX_LIMIT: i64 = 1000;

    /// `limit` from 1 to [`JobFilter::MAX_LIMIT`] and `offset` at least 0, the ranges the
    /// document states; the message names the parameter and its range.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(limit) = self.limit
            && !(1..=Self::MAX_LIMIT).contains(&limit)
        {
            return Err(format!(
                "query parameter `limit` must be from 1 to {}",
                Self::MAX_LIMIT
            ));
        }
        if self.offset.is_some_and(|o| o < 0) {
            return Err("query parameter `offset` must be 0 or more".into());
        }
        Ok(())
    }
}

fn limit_schema() -> utoipa::openapi::schema::ObjectBuilder {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(1))
        .maximum(Some(JobFilter::MAX_LIMIT))
        .default(Some(JobFilter::DEFAULT_LIMIT.into()))
}

fn offset_schema() -> utoipa::openapi::schema::ObjectBuilder {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(0))
        .default(Some(0.into()))
}

/// Reads one job inside a transaction.
pub(crate) async fn load_job(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<JobRecord>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM replication_jobs WHERE id = $1"
    ))
    .bind(id.to_owned())
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(job_from_row).transpose()
}

impl Store {
    /// Records a new job (status `pending`) and makes it the holder of its VM context.
    pub async fn create_job(&self, new: &NewJob) -> Result<JobRecord, StoreError> {
        let now = now_ms();
        let id = new
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut tx = self.pool.begin().await?;
        if self.get_vma_in(&mut tx, &new.vma_id).await?.is_none() {
            return Err(StoreError::UnknownVma(new.vma_id.clone()));
        }
        if load_job(&mut tx, &id).await?.is_some() {
            return Err(StoreError::JobExists(id));
        }
        take_context(&mut tx, new, now).await?;
        sqlx::query(
            "INSERT INTO replication_jobs (id, vm_context_id, vma_id, status, active, sync_type, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, 1, $5, $6, $7)",
        )
        .bind(id.clone())
        .bind(new.vm_context_id.clone())
        .bind(new.vma_id.clone())
        .bind(JobStatus::Pending.as_str())
        .bind(new.sync_type.clone())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE vm_replication_contexts SET current_job_id = $1, current_status = $2, \
             total_jobs_run = total_jobs_run + 1, last_status_change = $3 WHERE context_id = $4",
        )
        .bind(id.clone())
        .bind(ContextStatus::Replicating.as_str())
        .bind(now)
        .bind(new.vm_context_id.clone())
        .execute(&mut *tx)
        .await?;
        let draft = AuditDraft {
            action: "created",
            from: None,
            to: JobStatus::Pending,
            actor: Actor::Operator,
            failure_class: None,
            evidence: serde_json::json!({ "vma_id": new.vma_id, "vm_context_id": new.vm_context_id }),
        };
        let mut writes = Writes::new(self.backend);
        if !(insert_audits(&mut tx, &mut writes, &[(id.as_str(), &draft)], now).await?
            && writes.flush(&mut tx).await?)
        {
            // One new row that was not inserted: nothing a retry would change.
            return Err(StoreError::Contention(id));
        }
        let rec = load_job(&mut tx, &id)
            .await?
            .ok_or_else(|| StoreError::UnknownJob(id.clone()))?;
        tx.commit().await?;
        log_transitions(&self.metrics, &id, std::slice::from_ref(&draft));
        Ok(rec)
    }

    /// One job.
    pub async fn get_job(&self, id: &str) -> Result<JobRecord, StoreError> {
        let mut conn = self.pool.acquire().await?;
        load_job(&mut conn, id)
            .await?
            .ok_or_else(|| StoreError::UnknownJob(id.to_owned()))
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let mut clauses = Vec::new();
        let mut binds = Vec::new();
        for (column, value) in [
            ("status", filter.status.map(|s| s.as_str().to_owned())),
            ("vma_id", filter.vma_id.clone()),
            ("vm_context_id", filter.vm_context_id.clone()),
        ] {
            if let Some(value) = value {
                binds.push(value);
                clauses.push(format!("{column} = ${}", binds.len()));
            }
        }
        let filter_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let limit = filter
            .limit
            .unwrap_or(JobFilter::DEFAULT_LIMIT)
            .clamp(1, JobFilter::MAX_LIMIT);
        let offset = filter.offset.unwrap_or(0).max(0);
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM replication_jobs {filter_sql} \
             ORDER BY created_at DESC, id DESC LIMIT {limit} OFFSET {offset}"
        );
        let mut query = sqlx::query(&sql);
        for value in binds {
            query = query.bind(value);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Every job in an active state. The literal `active = 1` matches the partial index
    /// `replication_jobs_active_decision`, so this reads the active set, not the whole table.
    pub async fn active_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM replication_jobs WHERE active = 1"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Every active job as recovery's decision needs it: a partial record with only the
    /// columns the decision reads (see `rows::decision_record_from_row`), through the same
    /// partial index as [`Store::active_jobs`], which covers these columns: an index-only scan.
    pub async fn active_jobs_for_decision(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {DECISION_COLUMNS} FROM replication_jobs WHERE active = 1"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decision_record_from_row).collect()
    }

    /// `(job id, VMA id)` of every active job: all the poller's cycle needs (each poll
    /// re-reads its job in the transaction that records the progress).
    pub async fn active_job_ids(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT id, vma_id FROM replication_jobs WHERE active = 1")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("id")?, row.try_get("vma_id")?)))
            .collect()
    }

    /// The audit trail of one job, oldest first.
    pub async fn audit(&self, job_id: &str) -> Result<Vec<AuditEntry>, StoreError> {
        self.get_job(job_id).await?;
        let rows = sqlx::query(
            "SELECT id, job_id, at, from_status, to_status, actor, action, failure_class, \
             evidence FROM job_audit WHERE job_id = $1 ORDER BY id",
        )
        .bind(job_id.to_owned())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Applies a pure decision to one job in one transaction, retrying when another writer
    /// changed the job in between. `decide` returns `Ok(None)` when there is nothing to do.
    pub async fn mutate_job<F>(&self, id: &str, mut decide: F) -> Result<JobRecord, StoreError>
    where
        F: FnMut(&JobRecord, i64) -> Result<Option<JobChange>, StoreError> + Send,
    {
        for _ in 0..MAX_ATTEMPTS {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            let before = load_job(&mut tx, id)
                .await?
                .ok_or_else(|| StoreError::UnknownJob(id.to_owned()))?;
            let Some(change) = decide(&before, now)? else {
                return Ok(before);
            };
            if commit_change(&mut tx, self.backend, &before, &change, now).await? {
                tx.commit().await?;
                log_transitions(&self.metrics, id, &change.audit);
                return Ok(change.after);
            }
        }
        Err(StoreError::Contention(id.to_owned()))
    }

    /// One VM context.
    pub async fn get_context(&self, id: &str) -> Result<VmContext, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CONTEXT_COLUMNS} FROM vm_replication_contexts WHERE context_id = $1"
        ))
        .bind(id.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(context_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::UnknownContext(id.to_owned()))
    }

    /// VM contexts, optionally only those in `status`, by id.
    pub async fn list_contexts(
        &self,
        status: Option<ContextStatus>,
    ) -> Result<Vec<VmContext>, StoreError> {
        let rows = match status {
            Some(status) => {
                sqlx::query(&format!(
                    "SELECT {CONTEXT_COLUMNS} FROM vm_replication_contexts \
                     WHERE current_status = $1 ORDER BY context_id LIMIT 1000"
                ))
                .bind(status.as_str())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {CONTEXT_COLUMNS} FROM vm_replication_contexts \
                     ORDER BY context_id LIMIT 1000"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(context_from_row).collect()
    }

    /// Number of jobs in each status that has any.
    pub async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM replication_jobs GROUP BY status ORDER BY status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                let status = JobStatus::parse(&status).ok_or(StoreError::Corrupt {
                    column: "status",
                    value: status,
                })?;
                Ok((status, row.try_get("n")?))
            })
            .collect()
    }
}

/// Checks that the job's VM context is free, creating it when it is new (then `vm_name` is
/// required). A context is busy while its holder is active, and also while a cancelled job
/// of it still has a stop to deliver (`stop_pending`): its migratekit may still run against
/// the VM, and a second replication must not start beside it.
async fn take_context(conn: &mut AnyConnection, new: &NewJob, now: i64) -> Result<(), StoreError> {
    let context = sqlx::query(&format!(
        "SELECT {CONTEXT_COLUMNS} FROM vm_replication_contexts WHERE context_id = $1"
    ))
    .bind(new.vm_context_id.clone())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(ctx) = context.as_ref().map(context_from_row).transpose()? else {
        let vm_name = new
            .vm_name
            .clone()
            .ok_or_else(|| StoreError::UnknownContext(new.vm_context_id.clone()))?;
        sqlx::query(
            "INSERT INTO vm_replication_contexts (context_id, vm_name, current_status, \
             last_status_change, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(new.vm_context_id.clone())
        .bind(vm_name)
        .bind(ContextStatus::Discovered.as_str())
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        return Ok(());
    };
    if let Some(holder) = ctx.current_job_id {
        let holder_active = load_job(conn, &holder)
            .await?
            .is_some_and(|j| j.job.status.is_active());
        if holder_active {
            return Err(StoreError::ContextBusy {
                context_id: ctx.context_id,
                job_id: holder,
            });
        }
    }
    let stopping: Option<String> = sqlx::query_scalar(
        "SELECT id FROM replication_jobs WHERE vm_context_id = $1 AND stop_pending = 1 LIMIT 1",
    )
    .bind(new.vm_context_id.clone())
    .fetch_optional(&mut *conn)
    .await?;
    match stopping {
        Some(job_id) => Err(StoreError::ContextStopping {
            context_id: ctx.context_id,
            job_id,
        }),
        None => Ok(()),
    }
}
