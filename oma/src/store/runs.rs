//! VMAs and the record of recovery runs.

use super::{Store, StoreError};
use crate::model::now_ms;
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use utoipa::ToSchema;

/// A registered VMA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vma {
    /// VMA id.
    pub id: String,
    /// Base URL of its watchdog API, e.g. `http://10.0.0.5:8081`.
    pub base_url: String,
}

/// One recovery run as kept in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryRunRecord {
    /// Run id.
    pub id: String,
    /// `startup`, `periodic` or `operator`.
    pub trigger: String,
    /// True when nothing was changed.
    pub dry_run: bool,
    /// Start, unix milliseconds.
    pub started_at_ms: i64,
    /// End, unix milliseconds.
    pub finished_at_ms: i64,
    /// Active jobs examined.
    pub examined: i64,
    /// Jobs kept (process runs as recorded).
    pub kept: i64,
    /// Jobs moved to a final state (or that would be, in a dry run).
    pub finalized: i64,
    /// Jobs left waiting (VMA unreachable, not stale yet).
    pub waiting: i64,
    /// Decisions not applied because the job changed meanwhile.
    pub superseded: i64,
}

impl Store {
    /// Registers a VMA or updates its URL and token hash.
    pub async fn upsert_vma(
        &self,
        id: &str,
        base_url: &str,
        token_hash: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO vmas (id, base_url, token_hash, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO UPDATE SET \
             base_url = excluded.base_url, token_hash = excluded.token_hash, \
             updated_at = excluded.updated_at",
        )
        .bind(id.to_owned())
        .bind(base_url.to_owned())
        .bind(token_hash.to_owned())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| match e {
            // The id conflict is the upsert's own; the only other unique column is the token.
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::TokenInUse,
            other => StoreError::from(other),
        })?;
        // The VMA's old token must stop working here at once.
        self.vma_tokens.clear();
        Ok(())
    }

    pub(crate) async fn get_vma_in(
        &self,
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<Vma>, StoreError> {
        let row = sqlx::query("SELECT id, base_url FROM vmas WHERE id = $1")
            .bind(id.to_owned())
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|r| {
            Ok(Vma {
                id: r.try_get("id")?,
                base_url: r.try_get("base_url")?,
            })
        })
        .transpose()
    }

    /// One VMA.
    pub async fn get_vma(&self, id: &str) -> Result<Option<Vma>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.get_vma_in(&mut conn, id).await
    }

    /// Every registered VMA.
    pub async fn list_vmas(&self) -> Result<Vec<Vma>, StoreError> {
        let rows = sqlx::query("SELECT id, base_url FROM vmas ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Vma {
                    id: r.try_get("id")?,
                    base_url: r.try_get("base_url")?,
                })
            })
            .collect()
    }

    /// The VMA whose token hashes to `token_hash`.
    /// Read from memory when it was read from the database less than [`super::TOKEN_TTL`] ago.
    pub async fn vma_by_token_hash(&self, token_hash: &str) -> Result<Option<String>, StoreError> {
        if let Some(vma) = self.vma_tokens.get(token_hash) {
            return Ok(Some(vma));
        }
        let row = sqlx::query("SELECT id FROM vmas WHERE token_hash = $1")
            .bind(token_hash.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        let vma: Option<String> = row.map(|r| r.try_get("id")).transpose()?;
        if let Some(vma) = &vma {
            self.vma_tokens.insert(token_hash, vma);
        }
        Ok(vma)
    }

    /// Records a finished recovery run.
    pub async fn record_run(&self, run: &RecoveryRunRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO recovery_runs (id, run_trigger, dry_run, started_at, finished_at, \
             examined, kept, finalized, waiting, superseded) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(run.id.clone())
        .bind(run.trigger.clone())
        .bind(i64::from(run.dry_run))
        .bind(run.started_at_ms)
        .bind(run.finished_at_ms)
        .bind(run.examined)
        .bind(run.kept)
        .bind(run.finalized)
        .bind(run.waiting)
        .bind(run.superseded)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The latest `n` recovery runs, newest first.
    pub async fn recent_runs(&self, n: i64) -> Result<Vec<RecoveryRunRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT id, run_trigger, dry_run, started_at, finished_at, examined, kept, \
             finalized, waiting, superseded FROM recovery_runs \
             ORDER BY started_at DESC, id DESC LIMIT {}",
            n.clamp(1, 100)
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RecoveryRunRecord {
                    id: r.try_get("id")?,
                    trigger: r.try_get("run_trigger")?,
                    dry_run: r.try_get::<i64, _>("dry_run")? != 0,
                    started_at_ms: r.try_get("started_at")?,
                    finished_at_ms: r.try_get("finished_at")?,
                    examined: r.try_get("examined")?,
                    kept: r.try_get("kept")?,
                    finalized: r.try_get("finalized")?,
                    waiting: r.try_get("waiting")?,
                    superseded: r.try_get("superseded")?,
                })
            })
            .collect()
    }
}
