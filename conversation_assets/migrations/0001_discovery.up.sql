-- Crews, discovery state and discovered sessions.
CREATE EXTENSION IF NOT EXISTS vector;

-- Which histories table belongs to which crew and client. The product registers
-- crews; table names are validated and quoted at run time, never trusted.
CREATE TABLE crews (
    crew_code       text PRIMARY KEY,
    client_code     text NOT NULL,
    histories_table text NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- Serves: a client's crews (tenant-scoped reads).
CREATE INDEX crews_client_code_idx ON crews (client_code);

-- Per-crew watermark, moved only by discovery runs holding the crew's lock.
-- Every id <= high_water_id has been read, except the ids in pending_ids: those
-- were not visible yet (a writer's transaction still open, a rollback, a delete).
-- They are re-probed each run until they are settled (see
-- discovery_pending_settled), after which whatever is still missing never appears.
CREATE TABLE crew_discovery_state (
    crew_code        text PRIMARY KEY REFERENCES crews (crew_code) ON DELETE CASCADE,
    high_water_id    bigint NOT NULL DEFAULT 0,
    pending_ids      int8multirange NOT NULL DEFAULT int8multirange(),
    pending_xid      xid8,
    pending_vxids    text[],
    -- What the last whole-crew pass saw: the table's delete+update counter, its
    -- file (TRUNCATE swaps it) and the crew's client. A change means sessions may
    -- have lost rows or moved tenant: the next run recomputes the crew.
    source_changes   bigint,
    source_filenode  oid,
    client_code      text,
    reconciled_at    timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- How each crew's last run went. Kept apart from the watermark so that a run that
-- fails while another holds the crew's lock never touches the row that one updates.
CREATE TABLE crew_discovery_status (
    crew_code        text PRIMARY KEY REFERENCES crews (crew_code) ON DELETE CASCADE,
    last_run_at      timestamptz NOT NULL DEFAULT now(),
    last_success_at  timestamptz,
    last_error       text
);

-- Virtual ids of the transactions running now, other than ours. A transaction
-- has one from its start, while it gets a real xid only at its first write, and
-- takes sequence values before that (COPY buffers rows, apps call nextval early).
CREATE FUNCTION discovery_running_vxids()
RETURNS text[]
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(array_agg(virtualxid), ARRAY[]::text[])
    FROM pg_locks
    WHERE locktype = 'virtualxid' AND pid IS DISTINCT FROM pg_backend_pid()
$$;

-- Pending ids recorded by the run with xid pending_xid, while the transactions
-- pending_vxids were running, can be let go once every transaction that could
-- own them has ended: no xid older than the recording run is running, and none
-- of the transactions running back then (with or without an xid) still is.
CREATE FUNCTION discovery_pending_settled(pending_xid xid8, pending_vxids text[])
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT pending_xid IS NOT NULL
       AND pg_snapshot_xmin(pg_current_snapshot()) > pending_xid
       AND NOT EXISTS (
           SELECT 1 FROM pg_locks
           WHERE locktype = 'virtualxid' AND virtualxid = ANY(pending_vxids))
$$;

-- One row per chat session, kept by set-based incremental runs and exact
-- partition recomputes.
CREATE TABLE discovered_sessions (
    crew_code            text NOT NULL,
    session_id           varchar(255) NOT NULL,
    client_code          text NOT NULL,
    message_count        integer NOT NULL,
    human_message_count  integer NOT NULL,
    ai_message_count     integer NOT NULL,
    first_message_id     bigint NOT NULL,
    last_message_id      bigint NOT NULL,
    started_at           timestamptz NOT NULL,
    ended_at             timestamptz NOT NULL,
    duration_seconds     double precision
        GENERATED ALWAYS AS (extract(epoch FROM ended_at - started_at)::double precision) STORED,
    -- 'created_at': times come from the source rows; 'discovery': the source has
    -- no created_at, so times are when discovery first and last saw the session.
    time_source          text NOT NULL CHECK (time_source IN ('created_at', 'discovery')),
    discovered_at        timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz,
    PRIMARY KEY (crew_code, session_id)
) WITH (fillfactor = 85);  -- room on each page: merges update in place (HOT)
-- Serves: partition recomputes and partition reads (daily partitions by start).
CREATE INDEX discovered_sessions_started_at_idx ON discovered_sessions (started_at);
-- Serves: the product's "a client's live sessions, newest first".
CREATE INDEX discovered_sessions_client_started_idx
    ON discovered_sessions (client_code, started_at DESC) WHERE deleted_at IS NULL;

-- Source rows discovery could not use, with the reason; kept, never fatal.
CREATE TABLE discovery_rejects (
    crew_code       text NOT NULL,
    message_id      bigint NOT NULL,
    session_id      text,
    reason          text NOT NULL,
    message_excerpt text,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (crew_code, message_id)
);

-- Why a histories row cannot be used (NULL when it can). One definition shared by
-- incremental runs, recomputes and the sensor.
CREATE FUNCTION discovery_reject_reason(session_id text, message jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN session_id IS NULL THEN 'session_id is null'
    WHEN btrim(session_id) = '' THEN 'session_id is empty'
    WHEN length(session_id) > 255 THEN 'session_id is longer than 255 characters'
    WHEN message IS NULL THEN 'message is null'
    WHEN jsonb_typeof(message) <> 'object' THEN 'message is not a JSON object'
    WHEN jsonb_typeof(message -> 'type') IS DISTINCT FROM 'string' THEN 'message has no "type"'
END;
