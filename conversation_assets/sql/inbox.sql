-- Push ingestion: the app's enqueue call and the drain's steps. The inbox and its
-- function are created by migration 0009_inbox.

-- name: inbox_enqueue
SELECT queue_conversation_storage(
    user_id => %(user_id)s, channel => %(channel)s, transcript => %(transcript)s,
    summary => %(summary)s, metadata => %(metadata)s::jsonb, client_code => %(client_code)s,
    idempotency_key => %(idempotency_key)s, client_latency_ms => %(client_latency_ms)s::real);

-- name: inbox_set_max_pending
-- The bound lives in the database, so that callers in any language share it.
UPDATE inbox_state SET max_pending = %(max_pending)s
WHERE singleton AND max_pending <> %(max_pending)s;

-- name: inbox_take_batch
-- The oldest items no other drain holds; those that failed in this run are left.
-- Metadata as text: each item's is read on its own, so one no reader can load is
-- that item's failure, not the batch's.
SELECT i.seq, i.client_code, i.session_id, i.user_id, i.channel, i.full_conversation,
       i.summary, i.metadata::text, i.enqueued_at
FROM conversation_inbox AS i
WHERE i.seq <> ALL(%(skip)s::bigint[])
ORDER BY i.seq
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: inbox_take_items
-- Part of a batch that failed, taken again to find the item at fault.
SELECT i.seq, i.client_code, i.session_id, i.user_id, i.channel, i.full_conversation,
       i.summary, i.metadata::text, i.enqueued_at
FROM conversation_inbox AS i
WHERE i.seq = ANY(%(seqs)s::bigint[])
ORDER BY i.seq
FOR UPDATE SKIP LOCKED;

-- name: inbox_settle_batch
-- In the transaction that stored the batch: its items leave the inbox (the refused
-- ones into the rejects, with their reason), the latency samples they carry and
-- the batch's own go into the histograms, and the counters and the pending
-- estimate move. The estimate is counted in the statement's snapshot, which still
-- sees the rows it deletes: they are subtracted.
WITH removed AS (
    DELETE FROM conversation_inbox AS i
    WHERE i.seq = ANY(%(stored)s::bigint[]) OR i.seq = ANY(%(rejected)s::bigint[])
    RETURNING i.*
),
moved AS (
    INSERT INTO conversation_inbox_rejects AS r (
        id, client_code, session_id, user_id, channel, full_conversation, summary, metadata,
        enqueued_at, attempts, reason)
    SELECT m.id, m.client_code, m.session_id, m.user_id, m.channel, m.full_conversation,
           m.summary, m.metadata, m.enqueued_at,
           -- this attempt, unless inbox_record_failure counted it already
           m.attempts + CASE WHEN %(attempt_counted)s THEN 0 ELSE 1 END, k.reason
    FROM removed AS m
    JOIN unnest(%(rejected)s::bigint[], %(reasons)s::text[]) AS k (seq, reason)
        ON k.seq = m.seq
    ORDER BY m.id
    ON CONFLICT (id) DO UPDATE
    SET client_code = EXCLUDED.client_code, session_id = EXCLUDED.session_id,
        user_id = EXCLUDED.user_id, channel = EXCLUDED.channel,
        full_conversation = EXCLUDED.full_conversation, summary = EXCLUDED.summary,
        metadata = EXCLUDED.metadata, enqueued_at = EXCLUDED.enqueued_at,
        attempts = EXCLUDED.attempts, reason = EXCLUDED.reason, rejected_at = now()
    RETURNING 1
),
samples AS (
    SELECT 'enqueue' AS operation, m.client_latency_ms / 1000.0 AS seconds
    FROM removed AS m WHERE m.client_latency_ms IS NOT NULL
    UNION ALL
    SELECT 'drain_batch', %(batch_seconds)s::double precision
    WHERE %(batch_seconds)s::double precision IS NOT NULL
    UNION ALL
    SELECT 'embedding', %(embed_seconds)s::double precision
    WHERE %(embed_seconds)s::double precision IS NOT NULL
),
observed AS (
    INSERT INTO operation_latency AS o (operation, bucket, samples, seconds)
    SELECT s.operation, operation_latency_bucket(s.seconds), count(*), sum(s.seconds)
    FROM samples AS s
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (operation, bucket) DO UPDATE
    SET samples = o.samples + EXCLUDED.samples, seconds = o.seconds + EXCLUDED.seconds
),
gone AS (
    SELECT count(*) AS n FROM removed
)
UPDATE inbox_state AS s
SET stored_total = s.stored_total + cardinality(%(stored)s::bigint[]),
    rejected_total = s.rejected_total + (SELECT count(*) FROM moved),
    seq_base = conversation_inbox_last_seq(),
    pending_base = greatest(0, (SELECT count(*) FROM (
        SELECT 1 FROM conversation_inbox
        LIMIT s.max_pending + (SELECT n FROM gone) + 1) AS p) - (SELECT n FROM gone)),
    counted_at = now()
WHERE s.singleton
RETURNING s.pending_base;

-- name: inbox_record_failure
-- An item that failed alone: one more attempt and its error (only when no other
-- drain holds it). Returns its attempts so far.
UPDATE conversation_inbox AS i
SET attempts = i.attempts + 1, last_error = %(reason)s, last_attempt_at = now()
WHERE i.seq = (SELECT x.seq FROM conversation_inbox AS x WHERE x.seq = %(seq)s
               FOR UPDATE SKIP LOCKED)
RETURNING i.attempts;

-- name: inbox_recount
-- The pending estimate from an exact bounded count (the drain, when it finds the
-- inbox empty or starts).
UPDATE inbox_state AS s
SET seq_base = conversation_inbox_last_seq(),
    pending_base = (SELECT count(*) FROM (
        SELECT 1 FROM conversation_inbox LIMIT s.max_pending + 1) AS p),
    counted_at = now()
WHERE s.singleton
RETURNING s.pending_base;

-- name: inbox_has_items
SELECT EXISTS (SELECT 1 FROM conversation_inbox);

-- name: inbox_oldest_age
-- Seconds since the oldest waiting item was handed off (NULL: the inbox is empty),
-- and how many wait.
SELECT (SELECT extract(epoch FROM now() - i.enqueued_at)::double precision
        FROM conversation_inbox AS i ORDER BY i.seq LIMIT 1),
       (SELECT count(*) FROM conversation_inbox);
