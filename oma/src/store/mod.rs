//! Storage: one `Store` over SQLite (embedded default) or PostgreSQL, with the same code.
//!
//! Why sqlx's `Any` driver with runtime queries rather than two backends: every statement is
//! written once, in the SQL subset both databases accept (`$1` placeholders, BIGINT, TEXT,
//! partial indexes, `ON CONFLICT DO NOTHING`), so the two backends cannot drift apart, and
//! the same store test suite proves both. The price is no compile-time query checking and
//! only portable column types, which is why timestamps are i64 unix milliseconds and
//! booleans are 0/1 integers.
//!
//! Round trips: on SQLite each statement is a hand-off to sqlx's worker thread, so a
//! transaction's statements go together where they can (`batch`); PostgreSQL's protocol takes
//! one statement per message. SQLite's WAL is checkpointed in the background (`checkpoint`).
//!
//! Concurrency: every change is one transaction that re-reads the job and writes it back with
//! `WHERE version = <read version>` (optimistic locking that works on both databases; SQLite
//! has no `SELECT ... FOR UPDATE`). A lost race is retried from the start. SQLite gets a
//! single pooled connection, which serialises writers instead of letting them fail with
//! `SQLITE_BUSY`; PostgreSQL gets a real pool.

mod batch;
mod change;
mod checkpoint;
mod gauges;
mod intake;
mod io_error;
mod jobs;
mod lane;
mod lease;
mod lock;
mod many;
mod rows;
mod runs;
mod stops;
mod token_cache;

pub use change::{AuditDraft, JobChange};
pub use gauges::JobGauges;
pub use intake::{DecideEvent, IntakeOutcome};
pub use io_error::EXIT_SQLITE_IO_ERROR;
pub use jobs::{JobFilter, NewJob};
pub use lane::LanePermit;
pub use lease::{ExpiredInstance, LeaseCandidate, application_name};
pub use lock::{RecoveryLock, Released, StartFence, start_key};
pub use many::ManyOutcome;
pub use rows::{DECISION_COLUMNS, JobRecord};
pub use runs::{RecoveryRunRecord, Vma};
pub use stops::PendingStop;
pub use token_cache::TOKEN_TTL;

use crate::model::JobStatus;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor};
use std::time::Duration;

/// The background checkpoint task (SQLite) and what stops it.
#[derive(Debug)]
struct Checkpoints {
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Which database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Everything that can go wrong in the store, each saying what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a statement. (A SQLite I/O error never gets here: the
    /// conversion ends the process, see `io_error`.)
    #[error("database operation failed ({0}); check that the database is reachable and writable")]
    Database(sqlx::Error),
    /// Migrating the schema at start failed.
    #[error("database migration failed ({0}); the database may be newer than this oma binary")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The `--database` value is neither a SQLite path/URL nor a PostgreSQL URL.
    #[error(
        "unsupported database URL scheme in {0:?}; use a file path, sqlite://PATH or postgres://..."
    )]
    UnsupportedUrl(String),
    /// No job with this id.
    #[error("job {0} does not exist")]
    UnknownJob(String),
    /// No VM context with this id.
    #[error("VM context {0} does not exist")]
    UnknownContext(String),
    /// No VMA with this id.
    #[error("VMA {0} is not registered; register it with PUT /api/v1/vmas/{0} first")]
    UnknownVma(String),
    /// Another VMA has this token: a token names one VMA, the one whose events it posts.
    #[error(
        "another VMA is registered with this token; give each VMA its own token (generate one \
         with `openssl rand -hex 32`)"
    )]
    TokenInUse,
    /// A job with this id exists already.
    #[error("job {0} already exists; choose another id or omit it")]
    JobExists(String),
    /// The transition is not allowed from the job's current status.
    #[error("job {job_id} is {status}: {why}")]
    IllegalTransition {
        /// The job.
        job_id: String,
        /// Its current status.
        status: JobStatus,
        /// Why the change is refused.
        why: &'static str,
    },
    /// The VM context is held by another active job.
    #[error("VM context {context_id} is held by active job {job_id}; cancel or finish it first")]
    ContextBusy {
        /// The context.
        context_id: String,
        /// The job holding it.
        job_id: String,
    },
    /// A cancelled job of the VM context has a stop still to deliver to its VMA.
    #[error(
        "VM context {context_id}: cancelled job {job_id}'s migratekit has not been stopped on its \
         VMA yet and may still run against the VM; wait until the VMA is reachable (recovery \
         retries the stop after each run) and try again"
    )]
    ContextStopping {
        /// The context.
        context_id: String,
        /// The cancelled job whose stop is pending.
        job_id: String,
    },
    /// A stored value is not one this version understands.
    #[error("column {column} holds {value:?}, which this oma version does not understand")]
    Corrupt {
        /// The column.
        column: &'static str,
        /// The value found.
        value: String,
    },
    /// A VMA reported on a job that belongs to another VMA.
    #[error("job {job_id} belongs to another VMA; a VMA may only report on its own jobs")]
    ForeignJob {
        /// The job.
        job_id: String,
    },
    /// Concurrent writers kept changing the same job.
    #[error("job {0} kept changing under concurrent updates; retry the request")]
    Contention(String),
}

impl From<sqlx::Error> for StoreError {
    /// Every sqlx error of the store passes here (`?`), at once after the statement that
    /// failed, so a SQLite I/O error ends the OMA before its connection serves anything else.
    fn from(error: sqlx::Error) -> Self {
        io_error::exit_on_sqlite_io_error(&error);
        Self::Database(error)
    }
}

/// Connections of the PostgreSQL pool.
const PG_CONNECTIONS: u32 = 16;

/// How many times a transaction that lost an optimistic-locking race is retried.
pub(crate) const MAX_ATTEMPTS: usize = 8;

/// The OMA's database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// VMA tokens by hash, read from `vmas` (see `token_cache`).
    vma_tokens: std::sync::Arc<token_cache::TokenCache>,
    /// Stops the background checkpoints (SQLite): `close` sends `true` and waits for the task;
    /// dropping the last clone of the store drops the sender, which stops it too.
    checkpoints: std::sync::Arc<Checkpoints>,
    /// Start fences that may hold a pooled connection at once (PostgreSQL): half the pool.
    fences: std::sync::Arc<tokio::sync::Semaphore>,
    /// Writes that can wait (the poller's) hold a place in it (see `lane`).
    lane: lane::Lane,
    /// The OMA's metrics: every part that counts something holds the store (see
    /// `crate::metrics`).
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Store {
    /// Opens (creating a SQLite file if needed) and migrates the database at `url`.
    ///
    /// A plain path or `sqlite://PATH` selects SQLite; `postgres://` or `postgresql://` selects
    /// PostgreSQL.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, Some(checkpoint::INTERVAL)).await
    }

    /// [`Store::connect`], each PostgreSQL session named `application_name` (see
    /// [`application_name`]), set as each connection opens, before any of them serves: the
    /// name by which another OMA ends this one's sessions if it stalls. Ignored on SQLite.
    pub async fn connect_as(url: &str, application_name: &str) -> Result<Self, StoreError> {
        let name = Some(application_name.to_owned());
        Self::open(url, Some(checkpoint::INTERVAL), name).await
    }

    /// [`Store::connect`], with SQLite's background checkpoints every `checkpoints` (none
    /// with `None`: the tests that watch them run their own).
    async fn connect_with(url: &str, checkpoints: Option<Duration>) -> Result<Self, StoreError> {
        Self::open(url, checkpoints, None).await
    }

    /// Opens the store; `application_name` names the PostgreSQL sessions.
    async fn open(
        url: &str,
        checkpoints: Option<Duration>,
        application_name: Option<String>,
    ) -> Result<Self, StoreError> {
        install_default_drivers();
        let (backend, url) = normalise_url(url)?;
        let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        let pool = match backend {
            Backend::Sqlite => {
                options
                    .max_connections(1)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            // WAL lets readers run beside the writer; FULL keeps every
                            // acknowledged event durable across power loss.
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            // Checkpoints run in the background (see `checkpoint`).
                            conn.execute(
                                format!(
                                    "PRAGMA wal_autocheckpoint = {}",
                                    checkpoint::BACKSTOP_PAGES
                                )
                                .as_str(),
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Backend::Postgres => {
                // Set in the session rather than in the URL: it wins over an
                // `application_name` the operator's URL may carry, and needs no escaping.
                options
                    .max_connections(PG_CONNECTIONS)
                    .after_connect(move |conn, _meta| {
                        let name = application_name.clone();
                        Box::pin(async move {
                            if let Some(name) = name {
                                sqlx::query("SELECT set_config('application_name', $1, false)")
                                    .bind(name)
                                    .execute(conn)
                                    .await?;
                            }
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
        };
        sqlx::migrate!("./migrations").run(&pool).await?;
        let (stop, running) = tokio::sync::watch::channel(false);
        let task = match (backend, checkpoints) {
            (Backend::Sqlite, Some(every)) => Some(checkpoint::spawn_every(url, running, every)),
            _ => None,
        };
        Ok(Self {
            pool,
            backend,
            vma_tokens: std::sync::Arc::default(),
            checkpoints: std::sync::Arc::new(Checkpoints {
                stop,
                task: std::sync::Mutex::new(task),
            }),
            fences: std::sync::Arc::new(tokio::sync::Semaphore::new(PG_CONNECTIONS as usize / 2)),
            lane: lane::Lane::new(backend),
            metrics: crate::metrics::Metrics::new(),
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A place in the lane of writes that can wait: the poller takes one for each of its
    /// transactions, so that a death's intake never queues behind a fleet's progress (see
    /// `lane`). The wait is observed in `oma_background_write_wait_seconds`.
    pub async fn background_lane(&self) -> LanePermit {
        let permit = self.lane.enter().await;
        self.metrics.background_write_waited(permit.waited);
        permit
    }

    /// The OMA's metrics.
    pub fn metrics(&self) -> &std::sync::Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The connection pool, for the benchmark's bulk loading and the metrics.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Readiness: one round trip to the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Stops the background checkpoints and closes the pool, waiting for connections to be
    /// returned.
    pub async fn close(&self) {
        self.checkpoints.stop.send_replace(true);
        let task = self
            .checkpoints
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Its connection closed first, so that the pool's is the database's last: SQLite then
        // checkpoints the WAL a last time and removes it.
        if let Some(task) = task
            && let Err(error) = task.await
        {
            tracing::warn!(%error, "the background checkpoint task failed");
        }
        self.pool.close().await;
    }
}

/// Turns a `--database` value into a backend and a URL sqlx understands.
fn normalise_url(url: &str) -> Result<(Backend, String), StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((Backend::Postgres, url.to_owned()));
    }
    let path = if let Some(rest) = url.strip_prefix("sqlite://") {
        rest
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest
    } else if url.contains("://") {
        return Err(StoreError::UnsupportedUrl(url.to_owned()));
    } else {
        url
    };
    let path = path.split('?').next().unwrap_or(path);
    Ok((Backend::Sqlite, format!("sqlite://{path}?mode=rwc")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_select_the_backend() {
        assert_eq!(
            normalise_url("/var/lib/oma/oma.db").unwrap(),
            (
                Backend::Sqlite,
                "sqlite:///var/lib/oma/oma.db?mode=rwc".into()
            )
        );
        assert_eq!(
            normalise_url("sqlite://x.db").unwrap().1,
            "sqlite://x.db?mode=rwc"
        );
        assert_eq!(
            normalise_url("postgres://u@h/db").unwrap().0,
            Backend::Postgres
        );
        assert!(normalise_url("mysql://h/db").is_err());
    }
}
