-- Recovery and the poller read the active set every interval. With only `id` in the partial
-- index, each active row cost a random lookup in the table (about 10 us a row: 100 ms for
-- 10,000 active jobs among 1,000,000). This partial index holds every column recovery's
-- decision reads, so that read is an index-only scan; it replaces replication_jobs_active,
-- whose queries (the active set, its count) it serves as well. Only active rows are in it, so
-- final jobs cost it nothing.
CREATE INDEX replication_jobs_active_decision ON replication_jobs (
    id, vma_id, status, created_at, started_at, last_progress_at, progress_status,
    process_pid, process_start_time, attempt
) WHERE active = 1;

DROP INDEX replication_jobs_active;
