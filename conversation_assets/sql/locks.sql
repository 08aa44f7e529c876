-- Advisory locks by key; conversation_assets/locks.py derives each key from a name.

-- name: lock_wait
SELECT pg_advisory_lock(%(key)s::bigint);

-- name: lock_try
SELECT pg_try_advisory_lock(%(key)s::bigint);

-- name: lock_release
SELECT pg_advisory_unlock(%(key)s::bigint);

-- name: lock_transaction
SELECT pg_advisory_xact_lock(%(key)s::bigint);

-- name: statement_timeout_off
-- For a wait on a lock with no bound (a backfill waits for the run under way).
SET statement_timeout = 0;

-- name: statement_timeout_reset
RESET statement_timeout;
