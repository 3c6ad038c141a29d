-- Initial schema of the OMA. This file is released: never edit it, add a new numbered file.
-- One SQL text serves SQLite and PostgreSQL: integer columns are BIGINT (SQLite reads them as
-- INTEGER), booleans are BIGINT 0/1, timestamps are BIGINT unix milliseconds, JSON is TEXT.

CREATE TABLE vmas (
    id TEXT PRIMARY KEY,
    base_url TEXT NOT NULL,
    -- SHA-256 of the VMA's bearer token, hex. The token itself is never stored.
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE vm_replication_contexts (
    context_id TEXT PRIMARY KEY,
    vm_name TEXT NOT NULL,
    current_status TEXT NOT NULL,
    current_job_id TEXT,
    total_jobs_run BIGINT NOT NULL DEFAULT 0,
    successful_jobs BIGINT NOT NULL DEFAULT 0,
    failed_jobs BIGINT NOT NULL DEFAULT 0,
    last_successful_job_id TEXT,
    last_status_change BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE replication_jobs (
    id TEXT PRIMARY KEY,
    vm_context_id TEXT NOT NULL REFERENCES vm_replication_contexts (context_id),
    vma_id TEXT NOT NULL REFERENCES vmas (id),
    status TEXT NOT NULL,
    -- 1 while status is active, 0 once final; the partial index below makes the active set cheap.
    active BIGINT NOT NULL,
    progress_percent DOUBLE PRECISION NOT NULL DEFAULT 0,
    current_operation TEXT,
    bytes_transferred BIGINT NOT NULL DEFAULT 0,
    total_bytes BIGINT,
    throughput BIGINT NOT NULL DEFAULT 0,
    sync_type TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    updated_at BIGINT NOT NULL,
    last_progress_at BIGINT,
    -- The VMA's progress sequence last seen: a new value is new progress.
    progress_sequence BIGINT,
    -- Last time bytes_transferred changed, for the stall flag.
    bytes_moved_at BIGINT,
    stalled_since BIGINT,
    -- migratekit's own status from the latest progress (in_progress|completed|failed).
    progress_status TEXT,
    completed_at BIGINT,
    error_message TEXT,
    failure_class TEXT,
    process_pid BIGINT,
    process_start_time BIGINT,
    attempt BIGINT NOT NULL DEFAULT 0,
    -- The last keep/wait opinion of recovery, so the audit trail records each change of
    -- opinion instead of one line per job per interval.
    recovery_note TEXT,
    -- Optimistic-concurrency counter: every UPDATE checks and bumps it.
    version BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX replication_jobs_active ON replication_jobs (id) WHERE active = 1;
CREATE INDEX replication_jobs_status ON replication_jobs (status, created_at);
CREATE INDEX replication_jobs_vma ON replication_jobs (vma_id, created_at);
CREATE INDEX replication_jobs_context ON replication_jobs (vm_context_id, created_at);

CREATE TABLE job_audit (
    -- UUID v7: unique and ordered by time.
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES replication_jobs (id),
    at BIGINT NOT NULL,
    from_status TEXT,
    to_status TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    failure_class TEXT,
    evidence TEXT NOT NULL
);

CREATE INDEX job_audit_job ON job_audit (job_id, id);

CREATE TABLE processed_events (
    event_id TEXT PRIMARY KEY,
    vma_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    processed_at BIGINT NOT NULL
);

CREATE TABLE recovery_runs (
    id TEXT PRIMARY KEY,
    run_trigger TEXT NOT NULL,
    dry_run BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    examined BIGINT NOT NULL,
    kept BIGINT NOT NULL,
    finalized BIGINT NOT NULL,
    waiting BIGINT NOT NULL,
    superseded BIGINT NOT NULL
);

CREATE INDEX recovery_runs_started ON recovery_runs (started_at);
