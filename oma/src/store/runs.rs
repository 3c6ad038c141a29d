//! VMAs, idempotent event intake and the record of recovery runs.

use super::batch::Writes;
use super::change::{AuditDraft, JobChange, insert_audits, log_transitions, write_row_change};
use super::rows::JobRecord;
use super::rows::{JOB_COLUMNS, job_from_row};
use super::{Backend, MAX_ATTEMPTS, Store, StoreError};
use crate::model::now_ms;
use api::ProcessEvent;
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use std::collections::{HashMap, HashSet};
use utoipa::ToSchema;

/// What a pure event decision says about one event.
#[derive(Debug, Clone, PartialEq)]
pub struct IntakeOutcome {
    /// The change to write (audit only for stale attempts and final jobs).
    pub change: Option<JobChange>,
    /// Short outcome stored with the event id (`applied`, `stale_attempt`, ...).
    pub outcome: &'static str,
    /// True when the job itself changed.
    pub applied: bool,
}

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
        .await?;
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

    /// Applies a batch of events from `vma_id` in one transaction, each at most once.
    /// Returns the acknowledged event ids and how many changed a job. An event about a job
    /// of another VMA refuses the whole batch ([`StoreError::ForeignJob`]).
    ///
    /// The already-processed ids and the jobs are read with one query each, and the processed
    /// ids written with one statement, so a batch of 100 costs a few statements plus one
    /// update and audit entry per applied event.
    pub async fn apply_events(
        &self,
        vma_id: &str,
        events: &[ProcessEvent],
        decide: fn(&JobRecord, &ProcessEvent, i64) -> IntakeOutcome,
    ) -> Result<(Vec<uuid::Uuid>, u32), StoreError> {
        let acknowledged: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
        let wall_us = || chrono::Utc::now().timestamp_micros();
        'retry: for _ in 0..MAX_ATTEMPTS {
            let now = now_ms();
            let mut tx = self.pool.begin().await?;
            let begun_us = wall_us();
            let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
            let job_ids: Vec<String> = events
                .iter()
                .map(|e| e.job_id.to_string())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            let (mut seen, mut jobs) = read_intake(&mut tx, self.backend, &ids, &job_ids).await?;
            let mut writes = Writes::new(self.backend);
            let mut applied = 0;
            let mut processed = Vec::new();
            let mut audit: Vec<(String, AuditDraft)> = Vec::new();
            for event in events {
                let id = event.event_id.to_string();
                if !seen.insert(id.clone()) {
                    continue;
                }
                let outcome = match jobs.get_mut(event.job_id.as_str()) {
                    None => "unknown_job",
                    Some(job) if job.job.vma_id != vma_id => {
                        return Err(StoreError::ForeignJob {
                            job_id: event.job_id.to_string(),
                        });
                    }
                    Some(before) => {
                        let decision = decide(before, event, now);
                        if let Some(change) = decision.change {
                            if !write_row_change(&mut tx, &mut writes, before, &change.after, now)
                                .await?
                            {
                                continue 'retry;
                            }
                            let job_id = change.after.job.id.clone();
                            audit.extend(change.audit.into_iter().map(|d| (job_id.clone(), d)));
                            let mut after = change.after;
                            if after != *before {
                                after.version = before.version + 1;
                            }
                            *before = after;
                        }
                        applied += u32::from(decision.applied);
                        decision.outcome
                    }
                };
                processed.push((id, event.job_id.to_string(), outcome));
            }
            let entries: Vec<_> = audit.iter().map(|(j, d)| (j.as_str(), d)).collect();
            if !insert_audits(&mut tx, &mut writes, &entries, now).await? {
                continue 'retry;
            }
            for chunk in processed.chunks(200) {
                let vma = writes.arg(vma_id.to_owned())?;
                let at = writes.arg(now)?;
                let mut values = Vec::with_capacity(chunk.len());
                for (id, job_id, outcome) in chunk {
                    values.push(format!(
                        "({}, {vma}, {}, {}, {at})",
                        writes.arg(id.clone())?,
                        writes.arg(job_id.clone())?,
                        writes.arg(*outcome)?,
                    ));
                }
                let sql = format!(
                    "INSERT INTO processed_events (event_id, vma_id, job_id, outcome, processed_at) \
                     VALUES {} ON CONFLICT (event_id) DO NOTHING",
                    values.join(", ")
                );
                // Fewer rows than events: a concurrent request recorded some of these events
                // first. Start over, and this time they are seen as duplicates.
                if !writes.end(&mut tx, &sql, chunk.len() as u64).await? {
                    continue 'retry;
                }
            }
            if !writes.flush(&mut tx).await? {
                continue 'retry;
            }
            let commit_us = wall_us();
            tx.commit().await?;
            tracing::debug!(target: crate::LATENCY_TARGET, event = "tx_timing",
                first_event_id = events.first().map(|e| e.event_id.to_string()),
                begun_us, commit_us, committed_us = wall_us(), "event batch committed");
            for (job_id, draft) in &audit {
                log_transitions(job_id, std::slice::from_ref(draft));
            }
            return Ok((acknowledged, applied));
        }
        Err(StoreError::Contention("event batch".into()))
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

/// What intake needs before deciding: which of the event ids `ids` were processed before,
/// and the jobs `job_ids` by id. On SQLite both reads go in one round trip (see `batch`);
/// PostgreSQL takes one statement at a time.
async fn read_intake<'a>(
    conn: &mut AnyConnection,
    backend: Backend,
    ids: &'a [String],
    job_ids: &'a [String],
) -> Result<(HashSet<String>, HashMap<String, JobRecord>), StoreError> {
    let mut seen = HashSet::new();
    let mut jobs = HashMap::new();
    let together = backend == Backend::Sqlite;
    let (mut ids, mut job_ids) = (ids.chunks(500), job_ids.chunks(500));
    loop {
        let (seen_chunk, jobs_chunk) = (ids.next(), job_ids.next());
        if seen_chunk.is_none() && jobs_chunk.is_none() {
            return Ok((seen, jobs));
        }
        // Each statement with its arguments; numbered across both when they go together.
        let mut statements: Vec<(String, Vec<&String>)> = Vec::new();
        let mut numbered = 0;
        let mut add = |prefix: String, chunk: &'a [String]| {
            let from = if together { numbered } else { 0 };
            numbered += chunk.len();
            statements.push((
                format!("{prefix} IN ({})", placeholders(from, chunk.len())),
                chunk.iter().collect(),
            ));
        };
        if let Some(chunk) = seen_chunk {
            add(
                "SELECT event_id AS seen_event_id FROM processed_events WHERE event_id".into(),
                chunk,
            );
        }
        if let Some(chunk) = jobs_chunk {
            add(
                format!("SELECT {JOB_COLUMNS} FROM replication_jobs WHERE id"),
                chunk,
            );
        }
        if together {
            let (sqls, args): (Vec<String>, Vec<Vec<&String>>) = statements.into_iter().unzip();
            statements = vec![(sqls.join(";\n"), args.concat())];
        }
        for (sql, args) in &statements {
            let mut query = sqlx::query(sql);
            for arg in args {
                query = query.bind((*arg).clone());
            }
            // Rows of the first statement have the one column `seen_event_id`.
            for row in query.fetch_all(&mut *conn).await? {
                if row.columns().len() == 1 {
                    seen.insert(row.try_get("seen_event_id")?);
                } else {
                    let rec = job_from_row(&row)?;
                    jobs.insert(rec.job.id.clone(), rec);
                }
            }
        }
    }
}

/// `$from+1, ..., $from+n`.
fn placeholders(from: usize, n: usize) -> String {
    (from + 1..=from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
