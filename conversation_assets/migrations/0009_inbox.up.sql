-- Push ingestion: a durable inbox that apps hand finished conversations to in one
-- INSERT (queue_conversation_storage), drained in batches into `conversations`
-- through the same write path as everything else; and the figures the metrics
-- server reads (latency histograms, last success per asset, inbox counters).
-- Nothing here lives in a process's memory: a crash or a deploy loses nothing.

-- Clients allowed to push besides those that have a crew in `crews`: a client is
-- known when it has either. A product that only pushes registers here.
CREATE TABLE inbox_clients (
    client_code text PRIMARY KEY CONSTRAINT inbox_clients_code_printable
        CHECK (crew_code_is_printable(client_code)),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Every client that may push: the union, for people and dashboards.
CREATE VIEW known_clients AS
SELECT client_code FROM crews
UNION
SELECT client_code FROM inbox_clients;

-- Conversations handed off and not yet stored. `id` is the conversation's id in
-- `conversations` (conversation_id('inbox:' || client_code, session_id)), so a
-- repeated idempotency key finds its row; `seq` orders the drain, oldest first.
CREATE TABLE conversation_inbox (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                uuid NOT NULL UNIQUE,
    client_code       text NOT NULL,
    session_id        text NOT NULL,  -- the idempotency key, or a generated uuid
    user_id           text NOT NULL,
    channel           text NOT NULL,
    full_conversation text NOT NULL,
    summary           text,
    metadata          jsonb NOT NULL,
    enqueued_at       timestamptz NOT NULL DEFAULT now(),
    -- How long the caller's previous call took, end to end (its client measured it
    -- and sends it with the next call): the enqueue latency histogram's sample.
    client_latency_ms real,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text,
    last_attempt_at   timestamptz
);

-- Items the drain could not store: refused by the write path (its reason), or
-- failed `max_attempts` times. The whole item is kept, to be fixed and pushed again.
CREATE TABLE conversation_inbox_rejects (
    id                uuid PRIMARY KEY,
    client_code       text NOT NULL,
    session_id        text NOT NULL,
    user_id           text NOT NULL,
    channel           text NOT NULL,
    full_conversation text NOT NULL,
    summary           text,
    metadata          jsonb NOT NULL,
    enqueued_at       timestamptz NOT NULL,
    attempts          integer NOT NULL,
    reason            text NOT NULL,
    rejected_at       timestamptz NOT NULL DEFAULT now()
);

-- The inbox's bound and what the drains counted, one row. The bound check of an
-- enqueue reads it (no count of the inbox per call): pending is estimated as the
-- drain's last count plus the sequence values handed out since (`seq_base`).
CREATE TABLE inbox_state (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_pending    bigint NOT NULL DEFAULT 100000 CHECK (max_pending > 0),
    pending_base   bigint NOT NULL DEFAULT 0,  -- items counted by the last drain
    seq_base       bigint NOT NULL DEFAULT 0,  -- the sequence's value at that count
    counted_at     timestamptz,
    stored_total   bigint NOT NULL DEFAULT 0,  -- items the drains stored
    rejected_total bigint NOT NULL DEFAULT 0   -- items moved to conversation_inbox_rejects
);
INSERT INTO inbox_state DEFAULT VALUES;

-- Calls refused because the inbox was full. A sequence, not a row: nextval() is not
-- undone by the refusal's rollback and takes no row lock. After a crash it may
-- have moved ahead by up to 32 (sequences log ahead), never behind.
CREATE SEQUENCE conversation_inbox_refused_seq;

-- The last of conversation_inbox.seq handed out (0 before the first), without
-- consuming one.
CREATE FUNCTION conversation_inbox_last_seq()
RETURNS bigint
LANGUAGE sql STABLE
RETURN coalesce(pg_sequence_last_value('conversation_inbox_seq_seq'::regclass), 0);

-- Hand a finished conversation off: checks, then one INSERT; returns the
-- conversation's id. Bad input raises 22023 (invalid_parameter_value) naming the
-- field (also in the error's COLUMN field); a full inbox raises CPQ01 with the
-- count. A repeated idempotency key returns the same id and stores nothing more.
CREATE FUNCTION queue_conversation_storage(
    user_id         text,
    channel         text,
    transcript      text,
    summary         text DEFAULT NULL,
    metadata        jsonb DEFAULT '{}'::jsonb,
    client_code     text DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    client_latency_ms real DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v_channel  text := coalesce(queue_conversation_storage.channel, 'web');
    v_metadata jsonb := coalesce(queue_conversation_storage.metadata, '{}'::jsonb);
    v_session  text;
    v_id       uuid;
    v_state    inbox_state;
    v_pending  bigint;
    v_problem  text;
    v_field    text;
BEGIN
    SELECT f, p INTO v_field, v_problem FROM (VALUES
        (1, 'client_code', CASE
            WHEN queue_conversation_storage.client_code IS NULL
              OR text_is_blank(queue_conversation_storage.client_code)
                THEN 'client_code is missing or empty'
            WHEN NOT crew_code_is_printable(queue_conversation_storage.client_code)
                THEN 'client_code must be 1 to 100 characters without control, '
                     'whitespace or invisible characters' END),
        (2, 'user_id', CASE
            WHEN queue_conversation_storage.user_id IS NULL
              OR text_is_blank(queue_conversation_storage.user_id)
                THEN 'user_id is missing or empty'
            WHEN length(queue_conversation_storage.user_id) > 255
                THEN 'user_id is longer than 255 characters' END),
        (3, 'channel', CASE
            WHEN text_is_blank(v_channel) THEN 'channel is empty'
            WHEN length(v_channel) > 50 THEN 'channel is longer than 50 characters' END),
        (4, 'transcript', CASE
            WHEN queue_conversation_storage.transcript IS NULL
              OR text_is_blank(queue_conversation_storage.transcript)
                THEN 'transcript is empty'
            WHEN length(queue_conversation_storage.transcript) > 1000000
                THEN 'transcript is longer than 1,000,000 characters ('
                     || length(queue_conversation_storage.transcript) || ')' END),
        (5, 'summary', CASE
            WHEN length(queue_conversation_storage.summary) > 10000
                THEN 'summary is longer than 10,000 characters' END),
        (6, 'metadata', CASE
            WHEN jsonb_typeof(v_metadata) <> 'object'
                THEN 'metadata is not a JSON object (' || jsonb_typeof(v_metadata) || ')'
            WHEN octet_length(v_metadata::text) > 65536
                THEN 'metadata is larger than 64 KB as JSON' END),
        (7, 'idempotency_key', CASE
            WHEN text_is_blank(queue_conversation_storage.idempotency_key)
                THEN 'idempotency_key is empty (pass NULL for none)'
            WHEN length(queue_conversation_storage.idempotency_key) > 255
                THEN 'idempotency_key is longer than 255 characters' END)
    ) AS checks (n, f, p)
    WHERE p IS NOT NULL
    ORDER BY n
    LIMIT 1;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'queue_conversation_storage: %', v_problem
            USING ERRCODE = 'invalid_parameter_value', COLUMN = v_field;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM crews AS c
                   WHERE c.client_code = queue_conversation_storage.client_code)
       AND NOT EXISTS (SELECT 1 FROM inbox_clients AS k
                       WHERE k.client_code = queue_conversation_storage.client_code) THEN
        RAISE EXCEPTION 'queue_conversation_storage: client_code % is not a known client',
                quote_literal(queue_conversation_storage.client_code)
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'client_code',
                  HINT = 'register it: INSERT INTO inbox_clients (client_code) VALUES (...), '
                         'or give it a crew in crews';
    END IF;

    v_session := coalesce(queue_conversation_storage.idempotency_key, gen_random_uuid()::text);
    v_id := conversation_id('inbox:' || queue_conversation_storage.client_code, v_session);
    IF queue_conversation_storage.idempotency_key IS NOT NULL
       AND (EXISTS (SELECT 1 FROM conversation_inbox AS i WHERE i.id = v_id)
            OR EXISTS (SELECT 1 FROM conversations AS c WHERE c.id = v_id)) THEN
        RETURN v_id;  -- handed off before: stored once
    END IF;

    SELECT * INTO v_state FROM inbox_state WHERE singleton;
    v_pending := v_state.pending_base + conversation_inbox_last_seq() - v_state.seq_base;
    IF v_pending >= v_state.max_pending THEN
        PERFORM nextval('conversation_inbox_refused_seq');
        RAISE EXCEPTION 'queue_conversation_storage: the inbox holds about % conversations, '
                        'its bound is % (INBOX_MAX_PENDING): try again later', v_pending,
                        v_state.max_pending
            USING ERRCODE = 'CPQ01',
                  HINT = 'the drain (inbox_drain_job) is behind or stopped';
    END IF;

    INSERT INTO conversation_inbox AS i (
        id, client_code, session_id, user_id, channel, full_conversation, summary, metadata,
        client_latency_ms)
    VALUES (v_id, queue_conversation_storage.client_code, v_session,
            queue_conversation_storage.user_id, v_channel, queue_conversation_storage.transcript,
            queue_conversation_storage.summary, v_metadata,
            queue_conversation_storage.client_latency_ms)
    ON CONFLICT (id) DO NOTHING;  -- the same key at the same instant: stored once
    RETURN v_id;
END
$$;

-- Latency histograms, cumulative and durable: one row per operation and bucket
-- (non-cumulative counts; the exporter sums them). Fed by the drain (enqueue
-- samples, drain batches, embedding) and by every pipeline_runs row written.
CREATE TABLE operation_latency (
    operation text NOT NULL,
    bucket    integer NOT NULL,  -- index into operation_latency_bounds(); past the end: +Inf
    samples   bigint NOT NULL DEFAULT 0,
    seconds   double precision NOT NULL DEFAULT 0,  -- sum of the samples in this bucket
    PRIMARY KEY (operation, bucket)
);

-- Bucket upper bounds, seconds: from half a millisecond (an enqueue) to an hour (a
-- backfill).
CREATE FUNCTION operation_latency_bounds()
RETURNS double precision[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
             30, 60, 120, 300, 600, 1800, 3600]::double precision[];

-- The bucket a duration falls in: the first bound >= it (Prometheus' `le`).
CREATE FUNCTION operation_latency_bucket(seconds double precision)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT count(*)::integer FROM unnest(operation_latency_bounds()) AS b
        WHERE b < seconds) + 1;

-- The operation a pipeline_runs row measures (NULL: none of the histograms').
CREATE FUNCTION operation_of_asset(asset text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE asset
    WHEN 'discovered_sessions' THEN 'discovery'
    WHEN 'conversations' THEN 'conversations_build'
    WHEN 'conversation_embeddings' THEN 'embedding'
    WHEN 'enriched_conversations' THEN 'enrichment_refresh'
    WHEN 'conversation_metrics' THEN 'metrics_refresh'
    WHEN 'performance_stats' THEN 'metrics_refresh'
END;

-- When each asset last succeeded (pipeline_runs rows are written at the end of a
-- successful materialization), kept by the trigger below: read per scrape
-- without grouping the whole run history.
CREATE TABLE asset_last_success (
    asset       text PRIMARY KEY,
    finished_at timestamptz NOT NULL
);

CREATE FUNCTION pipeline_runs_observe() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO asset_last_success AS s (asset, finished_at)
    SELECT r.asset, max(r.finished_at) FROM written_runs AS r GROUP BY r.asset
    ORDER BY r.asset
    ON CONFLICT (asset) DO UPDATE SET finished_at = greatest(s.finished_at, EXCLUDED.finished_at);
    IF TG_OP = 'INSERT' THEN  -- a run's row rewritten (ON CONFLICT) is not a new sample
        INSERT INTO operation_latency AS o (operation, bucket, samples, seconds)
        SELECT operation_of_asset(r.asset), operation_latency_bucket(r.duration_ms / 1000),
               count(*), sum(r.duration_ms / 1000)
        FROM written_runs AS r
        WHERE operation_of_asset(r.asset) IS NOT NULL
        GROUP BY 1, 2
        ORDER BY 1, 2
        ON CONFLICT (operation, bucket) DO UPDATE
        SET samples = o.samples + EXCLUDED.samples, seconds = o.seconds + EXCLUDED.seconds;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER pipeline_runs_observe_insert
    AFTER INSERT ON pipeline_runs REFERENCING NEW TABLE AS written_runs
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_runs_observe();
CREATE TRIGGER pipeline_runs_observe_update
    AFTER UPDATE ON pipeline_runs REFERENCING NEW TABLE AS written_runs
    FOR EACH STATEMENT EXECUTE FUNCTION pipeline_runs_observe();

-- The history recorded before this migration.
INSERT INTO asset_last_success (asset, finished_at)
SELECT asset, max(finished_at) FROM pipeline_runs GROUP BY asset;
INSERT INTO operation_latency (operation, bucket, samples, seconds)
SELECT operation_of_asset(asset), operation_latency_bucket(duration_ms / 1000), count(*),
       sum(duration_ms / 1000)
FROM pipeline_runs
WHERE operation_of_asset(asset) IS NOT NULL
GROUP BY 1, 2;
