-- Recovery's decision now also reads progress_sequence (whether the VMA's last progress of an
-- exited job is newer than the job's). The index of migration 0002 holds every column that
-- read selects, so that it stays an index-only scan; without this column each active row
-- would cost a random lookup in the table again.
DROP INDEX replication_jobs_active_decision;

CREATE INDEX replication_jobs_active_decision ON replication_jobs (
    id, vma_id, status, created_at, started_at, last_progress_at, progress_status,
    progress_sequence, process_pid, process_start_time, attempt
) WHERE active = 1;
