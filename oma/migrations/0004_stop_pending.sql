-- A cancelled job whose migratekit the VMA could not be told to stop (unreachable, error):
-- 1 until a stop request reaches the VMA (SIGTERM sent, or no process left to signal).
-- Recovery retries those every interval, so a cancel never leaves migratekit running
-- unknown to anyone.
ALTER TABLE replication_jobs ADD COLUMN stop_pending BIGINT NOT NULL DEFAULT 0;

CREATE INDEX replication_jobs_stop_pending ON replication_jobs (id) WHERE stop_pending = 1;
