//! Idempotent event intake: a batch of watchdog events applied in one transaction, each
//! event id at most once, each job's change decided by `crate::job::on_event`.

use super::batch::Writes;
use super::change::{AuditDraft, JobChange, insert_audits, log_transitions, write_row_change};
use super::rows::{JOB_COLUMNS, JobRecord, job_from_row};
use super::{Backend, MAX_ATTEMPTS, Store, StoreError};
use crate::model::now_ms;
use api::ProcessEvent;
use sqlx::{AnyConnection, Row};
use std::collections::{HashMap, HashSet};

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

/// How one event decision is taken (`crate::job::on_event`; the benchmark passes its own).
pub type DecideEvent = fn(&JobRecord, &ProcessEvent, i64) -> IntakeOutcome;

/// The batch as decided inside one transaction: what to write after the job rows.
#[derive(Debug, Default)]
struct Decided {
    /// The batch's jobs by id, as the events decided so far left them.
    jobs: HashMap<String, JobRecord>,
    /// Events that changed a job.
    applied: u32,
    /// `(event id, job id, outcome)` of every event seen for the first time.
    processed: Vec<(String, String, &'static str)>,
    /// Audit entries, by job id.
    audit: Vec<(String, AuditDraft)>,
}

impl Store {
    /// Applies a batch of events from `vma_id` in one transaction, each at most once.
    /// Returns the acknowledged event ids and how many changed a job. An event about a job
    /// of another VMA refuses the whole batch ([`StoreError::ForeignJob`]).
    ///
    /// The already-processed ids and the jobs are read with one query each, and the processed
    /// ids written with one statement, so a batch of 100 costs a few statements plus one
    /// update and audit entry per applied event. A write that finds a row changed by another
    /// writer since the read starts the whole batch over.
    pub async fn apply_events(
        &self,
        vma_id: &str,
        events: &[ProcessEvent],
        decide: DecideEvent,
    ) -> Result<(Vec<uuid::Uuid>, u32), StoreError> {
        let started = std::time::Instant::now();
        for _ in 0..MAX_ATTEMPTS {
            if let Some(decided) = self.intake_once(vma_id, events, decide).await? {
                self.metrics.intake_committed(started.elapsed());
                self.metrics.vma_contact(vma_id);
                for (job_id, draft) in &decided.audit {
                    log_transitions(&self.metrics, job_id, std::slice::from_ref(draft));
                }
                for (_, _, outcome) in &decided.processed {
                    self.metrics.watchdog_event(outcome, 1);
                }
                let duplicates = events.len() - decided.processed.len();
                self.metrics.watchdog_event("duplicate", duplicates as u64);
                let acknowledged = events.iter().map(|e| e.event_id).collect();
                return Ok((acknowledged, decided.applied));
            }
        }
        Err(StoreError::Contention("event batch".into()))
    }

    /// One attempt at the batch's transaction; `None` when a concurrent writer got in the way
    /// (nothing was committed, the caller starts over).
    async fn intake_once(
        &self,
        vma_id: &str,
        events: &[ProcessEvent],
        decide: DecideEvent,
    ) -> Result<Option<Decided>, StoreError> {
        let wall_us = || chrono::Utc::now().timestamp_micros();
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
        let (mut seen, jobs) = read_intake(&mut tx, self.backend, &ids, &job_ids).await?;
        let mut writes = Writes::new(self.backend);
        let mut decided = Decided {
            jobs,
            ..Decided::default()
        };
        for event in events {
            let id = event.event_id.to_string();
            if !seen.insert(id.clone()) {
                continue;
            }
            let judge = (vma_id, decide, now);
            let Some(outcome) = decided.one(&mut tx, &mut writes, event, judge).await? else {
                return Ok(None);
            };
            decided
                .processed
                .push((id, event.job_id.to_string(), outcome));
        }
        let entries: Vec<_> = decided.audit.iter().map(|(j, d)| (j.as_str(), d)).collect();
        if !insert_audits(&mut tx, &mut writes, &entries, now).await?
            || !record_processed(&mut tx, &mut writes, vma_id, &decided.processed, now).await?
            || !writes.flush(&mut tx).await?
        {
            return Ok(None);
        }
        let commit_us = wall_us();
        tx.commit().await?;
        tracing::debug!(target: crate::LATENCY_TARGET, event = "tx_timing",
            first_event_id = events.first().map(|e| e.event_id.to_string()),
            begun_us, commit_us, committed_us = wall_us(), "event batch committed");
        Ok(Some(decided))
    }
}

impl Decided {
    /// Decides one event against its job as the batch has it so far, writes the job's row and
    /// keeps its audit entries for later. `judge` is the VMA the batch came from, the
    /// decision and the time. Returns the event's outcome, or `None` when the row changed
    /// under us (start over).
    async fn one(
        &mut self,
        conn: &mut AnyConnection,
        writes: &mut Writes<'_>,
        event: &ProcessEvent,
        (vma_id, decide, now): (&str, DecideEvent, i64),
    ) -> Result<Option<&'static str>, StoreError> {
        let before = match self.jobs.get_mut(event.job_id.as_str()) {
            None => return Ok(Some("unknown_job")),
            Some(job) if job.job.vma_id != vma_id => {
                return Err(StoreError::ForeignJob {
                    job_id: event.job_id.to_string(),
                });
            }
            Some(before) => before,
        };
        let outcome = decide(before, event, now);
        if let Some(JobChange { after, audit, .. }) = outcome.change {
            if !write_row_change(conn, writes, before, &after, now).await? {
                return Ok(None);
            }
            let job_id = &after.job.id;
            self.audit
                .extend(audit.into_iter().map(|d| (job_id.clone(), d)));
            // Later events of the batch about this job see it as written.
            let version = before.version + i64::from(after != *before);
            *before = JobRecord { version, ..after };
        }
        self.applied += u32::from(outcome.applied);
        Ok(Some(outcome.outcome))
    }
}

/// Records the batch's new event ids with their outcomes, 200 per statement. `false` when
/// fewer rows went in than events: a concurrent request recorded some of these events first,
/// and the caller starts over, seeing them this time as duplicates.
async fn record_processed(
    conn: &mut AnyConnection,
    writes: &mut Writes<'_>,
    vma_id: &str,
    processed: &[(String, String, &'static str)],
    now: i64,
) -> Result<bool, StoreError> {
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
        if !writes.end(conn, &sql, chunk.len() as u64).await? {
            return Ok(false);
        }
    }
    Ok(true)
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
