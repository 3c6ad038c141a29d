//! VMA polling leases and the OMAs' heartbeats (migration 0005), for several OMAs on one
//! PostgreSQL database. The task that uses them is `crate::lease`.
//!
//! Every statement stands alone (no transaction): a claim is one conditional `UPDATE` on the
//! lease's generation and expiry, so of two OMAs racing for the same expired lease exactly one
//! changes the row, and a renewal and a takeover of the same row exclude each other (the one
//! that commits second no longer matches its `WHERE`). Times are the database's clock on
//! PostgreSQL ([`Store::lease_clock_ms`]).

use super::{Backend, Store, StoreError};
use sqlx::Row;

/// An expired (or, on SQLite, foreign) lease that may be claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCandidate {
    /// The VMA.
    pub vma_id: String,
    /// Its last owner's instance id (`""` when never claimed).
    pub owner: String,
    /// The generation the claim must find.
    pub generation: i64,
}

/// An OMA whose heartbeat expired, removed by this OMA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredInstance {
    /// Its instance id.
    pub instance_id: String,
    /// Its `--oma-name`.
    pub name: String,
}

/// PostgreSQL's limit on `application_name` (NAMEDATALEN - 1 bytes); longer ones are cut.
const APPLICATION_NAME_MAX: usize = 63;

/// The `application_name` of every database session of the OMA instance `instance_id` named
/// `name`: `oma/<name>/<instance id>`, the name reduced to the characters PostgreSQL keeps as
/// they are (printable ASCII; others become `_`) and cut so that the whole fits in 63 bytes,
/// so that another OMA computes the same string from `oma_instances` and finds the sessions
/// in `pg_stat_activity` ([`Store::end_instance_sessions`]).
pub fn application_name(name: &str, instance_id: &str) -> String {
    let room = APPLICATION_NAME_MAX.saturating_sub("oma//".len() + instance_id.len());
    let name: String = (name.chars())
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(room)
        .collect();
    let mut full = format!("oma/{name}/{instance_id}");
    full.truncate(APPLICATION_NAME_MAX);
    full
}

impl Store {
    /// Ends the database sessions of another OMA instance, found by their `application_name`
    /// (see [`application_name`]): an OMA whose heartbeat expired may only have stalled, and
    /// its sessions would go on holding the recovery lock and its start fences. Returns how
    /// many sessions were ended (none on SQLite, which has no sessions to end). Needs the
    /// same database role as the other OMA's (or `pg_signal_backend`).
    pub async fn end_instance_sessions(&self, application_name: &str) -> Result<u64, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(0);
        }
        let row = sqlx::query(
            "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(application_name)
        .fetch_one(&self.pool)
        .await?;
        let n: i64 = row.try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// "Now" for leases, in unix milliseconds: the database server's clock on PostgreSQL (one
    /// clock for every OMA), this host's on SQLite (one OMA).
    pub async fn lease_clock_ms(&self) -> Result<i64, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(crate::model::now_ms());
        }
        let row = sqlx::query(
            "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) AS now_ms",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("now_ms")?)
    }

    /// Records that `instance` is alive until `expires_at`. Returns `true` when its row was
    /// new: at its first heartbeat, or after another OMA removed it as expired (it stalled).
    pub async fn oma_heartbeat(
        &self,
        instance: &str,
        name: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        // `started_at` is `now` only in a row this statement inserted.
        let row = sqlx::query(
            "INSERT INTO oma_instances (instance_id, name, started_at, heartbeat_at, expires_at) \
             VALUES ($1, $2, $3, $3, $4) ON CONFLICT (instance_id) DO UPDATE \
             SET heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at \
             RETURNING started_at",
        )
        .bind(instance)
        .bind(name)
        .bind(now)
        .bind(expires_at)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("started_at")? == now)
    }

    /// Deletes the OMAs whose heartbeat expired by `now` and returns them: each to exactly one
    /// caller, however many OMAs reap at once.
    pub async fn reap_oma_instances(&self, now: i64) -> Result<Vec<ExpiredInstance>, StoreError> {
        let rows = sqlx::query(
            "DELETE FROM oma_instances WHERE expires_at <= $1 RETURNING instance_id, name",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ExpiredInstance {
                    instance_id: r.try_get("instance_id")?,
                    name: r.try_get("name")?,
                })
            })
            .collect()
    }

    /// The instance ids of the OMAs alive at `now` (heartbeat not expired), in order.
    pub async fn live_oma_instances(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT instance_id FROM oma_instances WHERE expires_at > $1 ORDER BY instance_id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get("instance_id"))
            .collect::<Result<_, _>>()?)
    }

    /// Gives every registered VMA a lease row (unowned, expired) and returns how many leases
    /// there are.
    pub async fn seed_poll_leases(&self) -> Result<i64, StoreError> {
        // `WHERE true`: SQLite needs a WHERE before ON CONFLICT in INSERT ... SELECT.
        sqlx::query(
            "INSERT INTO vma_poll_leases (vma_id, owner, expires_at, generation) \
             SELECT id, '', 0, 0 FROM vmas WHERE true ON CONFLICT (vma_id) DO NOTHING",
        )
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT COUNT(*) AS n FROM vma_poll_leases")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// Extends every lease `instance` still owns to `expires_at` and returns their VMAs. A
    /// lease another OMA took over meanwhile is not among them.
    pub async fn renew_poll_leases(
        &self,
        instance: &str,
        expires_at: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "UPDATE vma_poll_leases SET expires_at = $2 WHERE owner = $1 RETURNING vma_id",
        )
        .bind(instance)
        .bind(expires_at)
        .fetch_all(&self.pool)
        .await?;
        let mut vmas = rows
            .iter()
            .map(|r| r.try_get("vma_id"))
            .collect::<Result<Vec<String>, _>>()?;
        vmas.sort();
        Ok(vmas)
    }

    /// The leases `instance` may claim at `now`: the expired ones, and on SQLite (one OMA per
    /// database) every lease not its own, since their owner can only be a dead predecessor.
    pub async fn claimable_poll_leases(
        &self,
        instance: &str,
        now: i64,
    ) -> Result<Vec<LeaseCandidate>, StoreError> {
        let rows = sqlx::query(
            "SELECT vma_id, owner, generation FROM vma_poll_leases \
             WHERE owner <> $1 AND (expires_at <= $2 OR $3 = 1) ORDER BY vma_id",
        )
        .bind(instance)
        .bind(now)
        .bind(i64::from(self.backend == Backend::Sqlite))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LeaseCandidate {
                    vma_id: r.try_get("vma_id")?,
                    owner: r.try_get("owner")?,
                    generation: r.try_get("generation")?,
                })
            })
            .collect()
    }

    /// Claims `lease` for `instance` until `expires_at`, if it is still as it was read and
    /// still claimable at `now`; `true` when this OMA got it.
    pub async fn claim_poll_lease(
        &self,
        instance: &str,
        lease: &LeaseCandidate,
        now: i64,
        expires_at: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE vma_poll_leases SET owner = $1, expires_at = $2, generation = generation + 1 \
             WHERE vma_id = $3 AND generation = $4 AND (expires_at <= $5 OR $6 = 1)",
        )
        .bind(instance)
        .bind(expires_at)
        .bind(&lease.vma_id)
        .bind(lease.generation)
        .bind(now)
        .bind(i64::from(self.backend == Backend::Sqlite))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Lets `vma_id`'s lease expire now, if `instance` owns it, so that another OMA claims it
    /// at its next tick (rebalancing, shutdown).
    pub async fn release_poll_lease(&self, instance: &str, vma_id: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE vma_poll_leases SET expires_at = 0 WHERE vma_id = $1 AND owner = $2")
            .bind(vma_id)
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// At an OMA's first tick: takes the leases of earlier instances of the same `name` (its
    /// predecessor, dead since this one started in its place) until `expires_at`, and removes
    /// their heartbeats, so that a restart after a crash polls at once instead of a lease
    /// period later. Returns the VMAs taken.
    pub async fn adopt_poll_leases(
        &self,
        instance: &str,
        name: &str,
        expires_at: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "UPDATE vma_poll_leases SET owner = $1, expires_at = $3, generation = generation + 1 \
             WHERE owner IN (SELECT instance_id FROM oma_instances \
             WHERE name = $2 AND instance_id <> $1) RETURNING vma_id",
        )
        .bind(instance)
        .bind(name)
        .bind(expires_at)
        .fetch_all(&self.pool)
        .await?;
        sqlx::query("DELETE FROM oma_instances WHERE name = $1 AND instance_id <> $2")
            .bind(name)
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.try_get("vma_id"))
            .collect::<Result<_, _>>()?)
    }

    /// At a clean stop: lets every lease of `instance` expire now and removes its heartbeat,
    /// so that the other OMAs take its VMAs at their next tick instead of a lease period later.
    pub async fn leave_poll_leases(&self, instance: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE vma_poll_leases SET expires_at = 0 WHERE owner = $1")
            .bind(instance)
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM oma_instances WHERE instance_id = $1")
            .bind(instance)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every lease as (VMA, owner instance id, expires_at, generation), for tests and the
    /// audit of a kill test.
    pub async fn poll_leases(&self) -> Result<Vec<(String, String, i64, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT vma_id, owner, expires_at, generation FROM vma_poll_leases ORDER BY vma_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("vma_id")?,
                    r.try_get("owner")?,
                    r.try_get("expires_at")?,
                    r.try_get("generation")?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::application_name;

    #[test]
    fn application_names_fit_postgres_and_keep_the_instance_id_whole() {
        let id = "0b6c3f5e-8a41-4f1e-9d37-2f5a8c1e7d90";
        assert_eq!(application_name("oma-1", id), format!("oma/oma-1/{id}"));
        let long = application_name("a rather long OMA name, with ü", id);
        assert_eq!(long, format!("oma/a_rather_long_OMA_name/{id}"));
        assert_eq!(long.len(), 63);
    }
}
