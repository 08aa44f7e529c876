-- Settings of the current session or transaction, and the database's clock: small
-- statements that several modules share.

-- name: commit_without_flush
-- Bookkeeping a crash may lose (the next run redoes it): this transaction's commit
-- need not wait for its WAL to reach the disk.
SET LOCAL synchronous_commit = off;

-- name: current_work_mem
SELECT current_setting('work_mem') AS work_mem;

-- name: set_local_work_mem
-- Until the end of the current transaction.
SELECT set_config('work_mem', %(work_mem)s, true);

-- name: database_now
-- The current transaction's start, by the database's clock (the one its rows use).
SELECT now();

-- name: statement_start
-- When the current statement began, by the database's clock.
SELECT statement_timestamp();
