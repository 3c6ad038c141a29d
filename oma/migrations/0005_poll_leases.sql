-- Several OMAs on one database (PostgreSQL): each VMA's progress polling is owned by one live
-- OMA through a lease, which another OMA takes over once it expires (its owner died or stalled).
-- On SQLite (one OMA per file) the one OMA owns every lease. Times are the database's clock
-- (unix milliseconds) on PostgreSQL, so that OMAs whose clocks differ agree on expiry.

-- The OMAs alive on this database: each renews its row every lease period / 3, and the live
-- ones (expires_at in the future) share the VMAs. A row that expired is deleted by the first
-- OMA that sees it, which then runs recovery (the dead OMA may have died mid-run).
CREATE TABLE oma_instances (
    -- Random at each start.
    instance_id TEXT PRIMARY KEY,
    -- --oma-name (default: the host name), for operators.
    name TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- One row per registered VMA. owner is an oma_instances.instance_id ('' before the first
-- claim); generation grows by one at each change of owner, and a claim is a conditional update
-- on (generation, expires_at), so two OMAs can never both take the same expired lease.
CREATE TABLE vma_poll_leases (
    vma_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    generation BIGINT NOT NULL
);

CREATE INDEX vma_poll_leases_owner ON vma_poll_leases (owner);
CREATE INDEX vma_poll_leases_expires_at ON vma_poll_leases (expires_at);
