-- Conversations: one row per chat session (or per conversation an app pushes),
-- with its transcript, summary, metadata and embedding; plus the queue that
-- tells the builder which sessions changed, the rejects, the embedding cache
-- and the product's tags.
--
-- The embedding column's dimension follows the configured model: the migrator
-- sets conversation_pipeline.embedding_dimension for this transaction (256, the
-- bundled local model, when unset).

-- A content checksum per session (XOR of a hash of each message's id and body):
-- it merges incrementally like the counts do, and an in-place edit of a message
-- changes it, so the session is rebuilt even when no count moved.
ALTER TABLE discovered_sessions ADD COLUMN content_checksum bigint NOT NULL DEFAULT 0;

-- Sessions whose discovered row changed and whose conversation must be rebuilt.
-- Discovery inserts here in the same transaction as the change, so nothing is
-- missed whatever order transactions commit in. A repeated change bumps
-- `version` only (no indexed column moves, so the update stays on its page: HOT);
-- the builder deletes an entry only at the version it built from.
CREATE TABLE conversation_queue (
    crew_code  text NOT NULL,
    session_id varchar(255) NOT NULL,
    version    bigint NOT NULL DEFAULT 1,
    queued_at  timestamptz NOT NULL DEFAULT now(),  -- first queued: oldest first
    PRIMARY KEY (crew_code, session_id)
) WITH (fillfactor = 70);
-- Serves: the builder taking the oldest entries first.
CREATE INDEX conversation_queue_queued_at_idx ON conversation_queue (queued_at);

-- A conversation's id: the md5 of its crew and session as a uuid, so the same
-- conversation gets the same id in any database and a from-scratch rebuild
-- equals the incremental result (store.conversation_id is the same function).
CREATE FUNCTION conversation_id(crew_code text, session_id text)
RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN md5(crew_code || chr(31) || session_id)::uuid;

-- Why a staged conversation cannot be stored (NULL when it can): the checks
-- PostgreSQL makes faster than Python. What COPY itself cannot carry (NUL bytes,
-- values that are not text) is caught before, in store.py.
CREATE FUNCTION conversation_reject_reason(
    client_code text, crew_code text, session_id text, user_id text, channel text,
    status text, message_count integer, sentiment real, metadata jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN client_code IS NULL OR btrim(client_code) = '' THEN 'client_code is missing or empty'
    WHEN crew_code IS NULL OR btrim(crew_code) = '' THEN 'crew_code is missing or empty'
    WHEN session_id IS NULL OR btrim(session_id) = '' THEN 'session_id is missing or empty'
    WHEN length(session_id) > 255 THEN 'session_id is longer than 255 characters'
    WHEN user_id IS NULL OR btrim(user_id) = '' THEN 'user_id is missing or empty'
    WHEN length(channel) > 50 THEN 'channel is longer than 50 characters'
    WHEN status IS NULL OR status NOT IN ('active', 'closed', 'handoff_complete', 'archived')
        THEN 'status ' || coalesce(quote_literal(status), 'NULL')
             || ' is not one of active, closed, handoff_complete, archived'
    WHEN message_count IS NULL OR message_count < 0
        THEN 'message_count is missing or negative'
    WHEN sentiment < -1 OR sentiment > 1 THEN 'sentiment is outside [-1, 1]'
    WHEN jsonb_typeof(metadata) IS DISTINCT FROM 'object'
        THEN 'metadata is not a JSON object (' || coalesce(jsonb_typeof(metadata), 'null') || ')'
END;

CREATE TABLE conversations (
    id                uuid PRIMARY KEY,  -- conversation_id(crew_code, session_id)
    client_code       text NOT NULL,
    crew_code         text NOT NULL,
    session_id        varchar(255) NOT NULL,
    user_id           text NOT NULL,
    channel           varchar(50) NOT NULL DEFAULT 'web',
    summary           text,
    full_conversation text,
    embedding         vector(256),
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT conversations_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object'),
    -- The pipeline sets active or handoff_complete; closed and archived are the
    -- product's, and a rebuild keeps them.
    status            varchar(20) NOT NULL DEFAULT 'active'
        CONSTRAINT conversations_status_check
        CHECK (status IN ('active', 'closed', 'handoff_complete', 'archived')),
    message_count     integer NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    sentiment         real CHECK (sentiment BETWEEN -1 AND 1),
    language          text,
    -- sha256 of full_conversation, and of the text the stored embedding came
    -- from: they differ exactly for the conversations waiting to be embedded.
    content_hash      bytea,
    embedding_hash    bytea,
    embedding_model   text,
    embedded_at       timestamptz,
    -- discovered_sessions.updated_at this row was built from: an older build
    -- never overwrites a newer one.
    source_updated_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_message_at   timestamptz,
    deleted_at        timestamptz,
    -- source: the session's rows are gone (restored when they come back);
    -- product: deleted through the query module (only restore() undoes it).
    deleted_by        text CHECK (deleted_by IN ('source', 'product')),
    CONSTRAINT conversations_deleted_consistent
        CHECK ((deleted_at IS NULL) = (deleted_by IS NULL)),
    -- Serves: upserts and the builder's lookups by session; crew first because a
    -- crew code is global (the client is carried, never mixed).
    CONSTRAINT conversations_session_key UNIQUE (crew_code, session_id, client_code)
) WITH (fillfactor = 90);  -- room for rebuilds and embedding writes to stay on the page

-- Serves: a user's conversations, newest first (the product's most common query,
-- keyed by client first so no query can span tenants). `id` is included so the
-- list's total count is an index-only scan, not a heap fetch per match.
CREATE INDEX conversations_user_created_idx
    ON conversations (client_code, user_id, created_at DESC) INCLUDE (id)
    WHERE deleted_at IS NULL;
-- Serves: a client's conversation list, newest first (the list route without a user).
CREATE INDEX conversations_client_created_idx
    ON conversations (client_code, created_at DESC) INCLUDE (id) WHERE deleted_at IS NULL;
-- Serves: a user's active conversations by last activity (partial: active only).
CREATE INDEX conversations_active_idx
    ON conversations (client_code, user_id, last_message_at DESC)
    WHERE status = 'active' AND deleted_at IS NULL;
-- Serves: metadata containment filters, e.g. metadata @> '{"language": "fr"}'.
CREATE INDEX conversations_metadata_idx ON conversations USING gin (metadata jsonb_path_ops);
-- No full-text index: maintaining one (to_tsvector of every transcript) cut bulk
-- upserts to a third (benchmarks/README.md). The list route's text filter scans
-- the client's rows its other filters leave; README says how to add a trigram
-- index where a client's list is large and searched often.
-- Serves: the embedding step's backlog (small: only rows waiting for a vector).
CREATE INDEX conversations_embedding_backlog_idx ON conversations (updated_at)
    WHERE embedding_hash IS DISTINCT FROM content_hash AND deleted_at IS NULL;
-- Serves: partition reads and rebuilds by the UTC day a conversation started.
CREATE INDEX conversations_created_at_idx ON conversations (created_at);

-- The dimension follows the configured model (see the header).
DO $$
DECLARE
    dimension integer := coalesce(
        nullif(current_setting('conversation_pipeline.embedding_dimension', true), '')::integer,
        256);
BEGIN
    IF dimension > 2000 THEN
        RAISE EXCEPTION 'embedding dimension % is above the 2000 that an HNSW index on vector supports; choose a smaller model or dimension', dimension;
    END IF;
    IF dimension <> 256 THEN
        EXECUTE format('ALTER TABLE conversations ALTER COLUMN embedding TYPE vector(%s)', dimension);
    END IF;
END
$$;

-- Serves: semantic search (cosine), only rows that have a vector. Searches run
-- per client with hnsw.iterative_scan so the client filter still yields k rows.
CREATE INDEX conversations_embedding_hnsw_idx
    ON conversations USING hnsw (embedding vector_cosine_ops) WHERE embedding IS NOT NULL;

-- Serves: semantic search within a small client (or the exact recall reference):
-- its vectors ranked exactly by an index-only scan, read in one run of leaf pages
-- instead of one heap page per row. The HNSW scan, filtered to a client holding a
-- small share of all rows, would fetch about k / share heap rows to find k.
CREATE INDEX conversations_client_vectors_idx ON conversations (client_code)
    INCLUDE (id, embedding) WHERE embedding IS NOT NULL AND deleted_at IS NULL;

-- Keeps the timestamps honest whoever updates (a BEFORE UPDATE trigger): updated_at
-- is the time of the write, created_at is kept unless given, last_message_at
-- falls back to the previous value, then to created_at. Inserts need no trigger
-- (a row trigger costs a seventh of the bulk insert speed): the columns default
-- to now(), and the upsert fills last_message_at the same way.
CREATE FUNCTION conversations_set_timestamps()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.created_at := coalesce(NEW.created_at, OLD.created_at);
    NEW.last_message_at := coalesce(NEW.last_message_at, OLD.last_message_at, NEW.created_at);
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER conversations_timestamps
    BEFORE UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION conversations_set_timestamps();

-- Records the writers could not store, with the reason; never fatal to a batch.
CREATE TABLE conversation_rejects (
    record_key     text PRIMARY KEY,  -- crew/session when known, else a hash of the record
    client_code    text,
    crew_code      text,
    session_id     text,
    source         text NOT NULL,     -- pipeline, or the caller's name
    reason         text NOT NULL,
    record_excerpt text,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now()
);

-- Persistent embedding cache (unlike an in-memory LRU cache, it survives restarts): a text
-- whose hash was embedded by this model is never sent to the model again.
-- vector without a dimension: each model keeps its own size.
CREATE TABLE embedding_cache (
    model        text NOT NULL,
    content_hash bytea NOT NULL,
    embedding    vector,              -- NULL: the text embeds to nothing (empty)
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, content_hash)
);

-- Which model the stored vectors come from; a change re-queues every vector.
CREATE TABLE embedding_state (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    model      text NOT NULL,
    dimension  integer NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);

-- The product's labels on conversations (conversation_tags, filtered by the list's include and exclude tags).
CREATE TABLE conversation_tags (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    tag             text NOT NULL CHECK (btrim(tag) <> '' AND length(tag) <= 100),
    client_code     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Serves: include/exclude tag filters (EXISTS per conversation).
    PRIMARY KEY (conversation_id, tag)
);
-- Serves: a client's conversations carrying a tag.
CREATE INDEX conversation_tags_client_tag_idx ON conversation_tags (client_code, tag);

-- The usage figures for one user over the last p_days days, within one
-- client. Served by conversations_user_created_idx.
CREATE FUNCTION get_conversation_stats(p_client_code text, p_user_id text, p_days integer DEFAULT 30)
RETURNS TABLE (
    total_conversations   bigint,
    active_conversations  bigint,
    with_embeddings       bigint,
    handoff_complete      bigint,
    avg_per_day           numeric
)
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_days IS NULL OR p_days < 1 THEN
        RAISE EXCEPTION 'get_conversation_stats: p_days must be at least 1, got %', p_days;
    END IF;
    RETURN QUERY
    SELECT count(*),
           count(*) FILTER (WHERE c.status = 'active'),
           count(*) FILTER (WHERE c.embedding IS NOT NULL),
           count(*) FILTER (WHERE c.status = 'handoff_complete'),
           round(count(*)::numeric / p_days, 2)
    FROM conversations AS c
    WHERE c.client_code = p_client_code
      AND c.user_id = p_user_id
      AND c.deleted_at IS NULL
      AND c.created_at >= now() - make_interval(days => p_days);
END
$$;
