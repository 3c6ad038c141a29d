//! Cross-process locks, on PostgreSQL session advisory locks: the recovery lock, so two OMAs on
//! one database never recover at once, and the start fence, so that no OMA's recovery judges a
//! job whose start request another OMA has in flight. On SQLite (one OMA per file) the
//! in-process mutex and guard suffice.

use super::{Backend, Store, StoreError};
use sqlx::Row;
use sqlx::any::AnyArguments;
use sqlx::pool::PoolConnection;
use sqlx::query::Query;
use std::collections::HashSet;
use std::sync::Arc;

/// Advisory-lock key of recovery runs ("OMAREC" in ASCII).
const RECOVERY_LOCK_KEY: i64 = 0x4f4d_4152_4543;

/// TCP keepalive of the recovery lock's session, set on the server's side: when the host of
/// the OMA holding the lock vanishes (power, network), with no FIN or RST to end its
/// connection, PostgreSQL ends the session after idle + interval x count = 5 + 2 x 3 = 11 s
/// and so frees the lock, instead of after the system's default of two hours. A process that
/// dies (even by SIGKILL) has its connection closed by its kernel, which frees the lock at once.
const LOCK_SESSION_KEEPALIVE: &str = "SELECT set_config('tcp_keepalives_idle', '5', false),      set_config('tcp_keepalives_interval', '2', false),      set_config('tcp_keepalives_count', '3', false),      set_config('tcp_user_timeout', '11000', false)";

/// Held while a recovery run goes on; give it back with [`RecoveryLock::release`].
#[derive(Debug)]
pub struct RecoveryLock {
    session: LockedSession,
}

/// A pooled connection whose session holds an advisory lock (none on SQLite). Unlocked, it
/// goes back to the pool; dropped without unlocking (a panic, a cancelled request) it is
/// closed, which is what frees the lock, instead of the pool handing it on still locked.
#[derive(Debug)]
struct LockedSession(Option<PoolConnection<sqlx::Any>>);

/// What releasing (or checking) a lock found.
#[derive(Debug)]
pub enum Released {
    /// The lock was held to the end (always, on SQLite).
    Held,
    /// The lock had gone with its session before (the server ended it, the connection was cut):
    /// other OMAs could take it meanwhile.
    Lost,
    /// Releasing failed otherwise; the lock may have been lost. The session is closed, which
    /// frees the lock in any case.
    Unknown(sqlx::Error),
}

impl Released {
    /// Whether the lock was held to the end.
    pub fn held(&self) -> bool {
        matches!(self, Self::Held)
    }
}

impl LockedSession {
    /// Runs `unlock` (a `pg_advisory_unlock` call) on the session and says whether the lock
    /// was still held. A session the server ended frees its advisory locks without a word;
    /// the first query after it fails, or on a new session the unlock answers `false`. On any
    /// failure the connection is closed, which frees the lock as well.
    async fn release<'q>(mut self, unlock: Query<'q, sqlx::Any, AnyArguments<'q>>) -> Released {
        let Some(mut conn) = self.0.take() else {
            return Released::Held;
        };
        ask(&mut conn, unlock).await
    }

    /// Runs `held` (a query answering whether the session still holds its lock) on the
    /// session, which stays locked. On any failure the connection is closed when dropped,
    /// which frees the lock in any case.
    async fn check<'q>(&mut self, held: Query<'q, sqlx::Any, AnyArguments<'q>>) -> Released {
        match self.0.as_mut() {
            Some(conn) => ask(conn, held).await,
            None => Released::Held,
        }
    }
}

/// Runs `query`, whose one column says whether the lock is (or was) held, on the lock's
/// session. A session the server ended (`pg_terminate_backend`, a restart) fails it.
async fn ask<'q>(
    conn: &mut PoolConnection<sqlx::Any>,
    query: Query<'q, sqlx::Any, AnyArguments<'q>>,
) -> Released {
    match query.fetch_one(&mut **conn).await {
        Ok(row) if row.try_get::<bool, _>(0).unwrap_or(false) => Released::Held,
        Ok(_) => Released::Lost,
        Err(e) => {
            conn.close_on_drop();
            // The connection failed, or the server ended the session (SQLSTATE class 57:
            // administrator or crash shutdown, a server that cannot take connections now).
            let ended = match &e {
                sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("57P")),
                _ => false,
            };
            if ended {
                Released::Lost
            } else {
                Released::Unknown(e)
            }
        }
    }
}

impl Drop for LockedSession {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.0 {
            conn.close_on_drop();
        }
    }
}

impl Store {
    /// Takes the database-wide recovery lock, or `None` when another OMA holds it.
    pub async fn try_recovery_lock(&self) -> Result<Option<RecoveryLock>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(Some(RecoveryLock {
                session: LockedSession(None),
            }));
        }
        let mut conn = self.pool.acquire().await?;
        sqlx::query(LOCK_SESSION_KEEPALIVE)
            .execute(&mut *conn)
            .await?;
        let row = sqlx::query("SELECT pg_try_advisory_lock($1) AS locked")
            .bind(RECOVERY_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await?;
        let locked: bool = row.try_get("locked")?;
        Ok(locked.then_some(RecoveryLock {
            session: LockedSession(Some(conn)),
        }))
    }
}

impl RecoveryLock {
    /// Whether this OMA still holds the lock, asked on the lock's own session: before each
    /// decision a run writes, since an OMA that stalled long enough for the others to find
    /// its heartbeat expired has had its sessions ended (`Store::end_instance_sessions`) and
    /// another OMA may be recovering now. [`Released::Held`] on SQLite.
    pub async fn check(&mut self) -> Released {
        let held = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid() AND granted AND objsubid = 1 \
             AND classid::bigint = $1 AND objid::bigint = $2)",
        )
        .bind(RECOVERY_LOCK_KEY >> 32)
        .bind(RECOVERY_LOCK_KEY & 0xffff_ffff);
        self.session.check(held).await
    }

    /// Gives the lock back, and says whether it had been held to the end.
    pub async fn release(self) -> Released {
        let unlock = sqlx::query("SELECT pg_advisory_unlock($1)").bind(RECOVERY_LOCK_KEY);
        self.session.release(unlock).await
    }
}

/// Advisory-lock class of job starts ("OMAS" in ASCII); the object is [`start_key`].
const START_LOCK_CLASS: i32 = 0x4f4d_4153;

/// The advisory-lock object of `job_id`'s start: FNV-1a of the id, the same in every OMA and
/// every version. Two ids that share a key only make recovery wait for both starts.
pub fn start_key(job_id: &str) -> u32 {
    job_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// Held while a job's start request is in flight: on PostgreSQL a session advisory lock,
/// which every OMA's recovery sees ([`Store::starts_in_flight`]) and which the database frees
/// by itself if this OMA dies. On SQLite (one OMA per file) it holds nothing.
#[derive(Debug)]
pub struct StartFence {
    session: LockedSession,
    key: u32,
    /// A place among the fences that may hold a connection at once (see `Store::fences`).
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Store {
    /// Marks the start of `job_id` as in flight for every OMA on this database, until
    /// [`StartFence::release`].
    pub async fn fence_start(&self, job_id: &str) -> Result<StartFence, StoreError> {
        let key = start_key(job_id);
        if self.backend != Backend::Postgres {
            return Ok(StartFence {
                session: LockedSession(None),
                key,
                _permit: None,
            });
        }
        // Each fence holds a pooled connection while the start goes on; the permit keeps
        // enough of the pool for the starts' own transactions and everything else.
        let permit = Arc::clone(&self.fences)
            .acquire_owned()
            .await
            .expect("the fences' semaphore is never closed");
        let mut conn = self.pool.acquire().await?;
        // The two-key form, so that the class keeps these apart from other advisory locks.
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(START_LOCK_CLASS)
            .bind(key as i32)
            .execute(&mut *conn)
            .await?;
        Ok(StartFence {
            session: LockedSession(Some(conn)),
            key,
            _permit: Some(permit),
        })
    }

    /// The [`start_key`]s of the starts in flight in any OMA on this database (none on SQLite,
    /// where the OMA's own guard is all there is).
    pub async fn starts_in_flight(&self) -> Result<HashSet<u32>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(HashSet::new());
        }
        let rows = sqlx::query(
            "SELECT objid::bigint AS objid FROM pg_locks WHERE locktype = 'advisory' \
             AND classid::bigint = $1 AND objsubid = 2 AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(i64::from(START_LOCK_CLASS))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let objid: i64 = r.try_get("objid")?;
                u32::try_from(objid).map_err(|_| StoreError::Corrupt {
                    column: "pg_locks.objid",
                    value: objid.to_string(),
                })
            })
            .collect()
    }
}

impl StartFence {
    /// Ends the fence. [`Released::Lost`] when it had ended before, unasked: the database
    /// session that held it ended (a server restart, a connection cut), so other OMAs'
    /// recovery runs no longer saw the start in flight for a while.
    pub async fn release(self) -> Released {
        let unlock = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(START_LOCK_CLASS)
            .bind(self.key as i32);
        self.session.release(unlock).await
    }
}

#[cfg(test)]
mod tests {
    use super::start_key;

    #[test]
    fn start_keys_are_fnv1a_so_every_oma_version_agrees() {
        // FNV-1a 32-bit reference values: a changed hash would let two OMA versions on one
        // database miss each other's starts.
        assert_eq!(start_key(""), 0x811c_9dc5);
        assert_eq!(start_key("a"), 0xe40c_292c);
        assert_eq!(start_key("foobar"), 0xbf9c_f968);
    }
}
