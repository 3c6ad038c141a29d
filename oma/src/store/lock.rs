//! The cross-process recovery lock: on PostgreSQL a session advisory lock, so two OMAs on one
//! database never recover at once; on SQLite (one OMA per file) the in-process mutex suffices.

use super::{Backend, Store, StoreError};
use sqlx::Row;
use sqlx::pool::PoolConnection;

/// Advisory-lock key of recovery runs ("OMAREC" in ASCII).
const RECOVERY_LOCK_KEY: i64 = 0x4f4d_4152_4543;

/// Held while a recovery run goes on; give it back with [`RecoveryLock::release`].
#[derive(Debug)]
pub struct RecoveryLock {
    conn: Option<PoolConnection<sqlx::Any>>,
}

impl Store {
    /// Takes the database-wide recovery lock, or `None` when another OMA holds it.
    pub async fn try_recovery_lock(&self) -> Result<Option<RecoveryLock>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(Some(RecoveryLock { conn: None }));
        }
        let mut conn = self.pool.acquire().await?;
        // If the holder is dropped without `release` (a panic, a cancelled request), closing
        // the session is what frees the lock.
        conn.close_on_drop();
        let row = sqlx::query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind(RECOVERY_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await?;
        let locked: bool = row.try_get("locked")?;
        Ok(locked.then_some(RecoveryLock { conn: Some(conn) }))
    }
}

impl RecoveryLock {
    /// Gives the lock back. On failure the connection is closed, which frees it as well.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(RECOVERY_LOCK_KEY)
                .execute(&mut *conn)
                .await;
            if let Err(e) = unlocked {
                tracing::warn!(error = %e, "could not release the recovery lock; closing its session");
            }
        }
    }
}
