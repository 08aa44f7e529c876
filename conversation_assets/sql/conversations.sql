-- Conversation writes and the builder's reads. Placeholders: {histories} is a
-- crew's table (psycopg.sql.Identifier), {created_at} is h.created_at or NULL,
-- {session_match} compares h.session_id with s.session_id in the column's type.

-- name: create_conversation_stage
-- Per connection, emptied at each commit: a COPY target that costs no catalog
-- churn per batch. Loose types on purpose: rows are checked after the COPY.
CREATE TEMP TABLE IF NOT EXISTS conversation_stage (
    client_code       text,
    crew_code         text,
    session_id        text,
    user_id           text,
    channel           text,
    summary           text,
    full_conversation text,
    metadata          jsonb,
    status            text,
    message_count     integer,
    sentiment         real,
    language          text,
    content_hash      bytea,
    source_updated_at timestamptz,
    created_at        timestamptz,
    last_message_at   timestamptz
) ON COMMIT DELETE ROWS;

-- name: empty_conversation_stage
-- Inside a caller's transaction no commit empties the stage between two batches.
TRUNCATE conversation_stage;

-- name: copy_conversation_stage
COPY conversation_stage (
    client_code, crew_code, session_id, user_id, channel, summary, full_conversation,
    metadata, status, message_count, sentiment, language, content_hash, source_updated_at,
    created_at, last_message_at)
FROM STDIN WITH (FORMAT BINARY);

-- name: reject_staged_conversations
-- Staged rows that fail conversation_reject_reason leave the stage for the rejects,
-- with it: the upsert (and its clearing of earlier rejects) then takes every row
-- left without checking it again.
WITH refused AS (
    DELETE FROM conversation_stage AS s
    WHERE conversation_reject_reason(s.client_code, s.crew_code, s.session_id, s.user_id,
                                     s.channel, s.status, s.message_count, s.sentiment,
                                     s.metadata) IS NOT NULL
    RETURNING s.client_code, s.crew_code, s.session_id,
              conversation_reject_reason(s.client_code, s.crew_code, s.session_id, s.user_id,
                                         s.channel, s.status, s.message_count, s.sentiment,
                                         s.metadata) AS reason,
              -- What was sent, in the stage's order (the content hash left out).
              row_to_json((SELECT r FROM (SELECT s.client_code, s.crew_code, s.session_id,
                  s.user_id, s.channel, s.summary, s.full_conversation, s.metadata,
                  s.status, s.message_count, s.sentiment, s.language,
                  s.source_updated_at, s.created_at, s.last_message_at) AS r))::text
                  AS row_text
)
INSERT INTO conversation_rejects AS r (
    record_key, client_code, crew_code, session_id, source, reason, record_excerpt)
SELECT CASE WHEN k.crew_code IS NOT NULL AND k.session_id IS NOT NULL
            THEN left(k.crew_code || '/' || k.session_id, 600)
            ELSE 'sha256:' || encode(sha256(convert_to(k.row_text, 'UTF8')), 'hex') END,
       k.client_code, k.crew_code, k.session_id, %(source)s, k.reason, left(k.row_text, 500)
FROM refused AS k
ON CONFLICT (record_key) DO UPDATE
SET client_code = EXCLUDED.client_code, crew_code = EXCLUDED.crew_code,
    session_id = EXCLUDED.session_id, source = EXCLUDED.source, reason = EXCLUDED.reason,
    record_excerpt = EXCLUDED.record_excerpt, last_seen_at = now()
RETURNING r.record_key, r.reason;

-- name: upsert_staged_conversations
-- One statement for the batch's good rows (reject_staged_conversations left only
-- them). A row is rewritten only when something in it changed, and never by a
-- build older than the one stored. The product's statuses (closed, archived) and
-- deletions are kept; a deletion because the source rows were gone is undone now
-- that they are back. A record stored now (every row left in the stage) clears
-- its earlier reject, in the same statement. Answers two counts, not a row per
-- conversation: the client needs only the totals. A conversation never changes
-- client: the guard in DO UPDATE's WHERE is evaluated on the row as it is when the
-- conflict is settled (a concurrent writer's committed row included), and a row it
-- keeps is rejected by reject_staged_of_other_clients.
WITH cleared AS (
    DELETE FROM conversation_rejects AS r
    USING conversation_stage AS s
    WHERE r.record_key = left(s.crew_code || '/' || s.session_id, 600)
      AND EXISTS (SELECT 1 FROM conversation_rejects)  -- nothing to join when none
), written AS (
    INSERT INTO conversations AS c (
        id, client_code, crew_code, session_id, user_id, channel, summary, full_conversation,
        metadata, status, message_count, sentiment, language, content_hash, source_updated_at,
        created_at, last_message_at)
    SELECT conversation_id(s.crew_code, s.session_id), s.client_code, s.crew_code, s.session_id,
           s.user_id, coalesce(s.channel, 'web'), s.summary, s.full_conversation, s.metadata,
           s.status, s.message_count, s.sentiment, s.language, s.content_hash, s.source_updated_at,
           -- Times not given keep the stored ones (looked up only then); a new row starts now.
           coalesce(s.created_at,
                    (SELECT e.created_at FROM conversations AS e
                     WHERE e.id = conversation_id(s.crew_code, s.session_id)),
                    now()),
           coalesce(s.last_message_at,
                    (SELECT e.last_message_at FROM conversations AS e
                     WHERE e.id = conversation_id(s.crew_code, s.session_id)),
                    s.created_at, now())
    FROM conversation_stage AS s
    ON CONFLICT (id) DO UPDATE
    SET user_id = EXCLUDED.user_id,
        channel = EXCLUDED.channel,
        summary = EXCLUDED.summary,
        full_conversation = EXCLUDED.full_conversation,
        metadata = EXCLUDED.metadata,
        status = CASE WHEN c.status IN ('closed', 'archived') THEN c.status
                      ELSE EXCLUDED.status END,
        message_count = EXCLUDED.message_count,
        sentiment = EXCLUDED.sentiment,
        language = EXCLUDED.language,
        content_hash = EXCLUDED.content_hash,
        source_updated_at = EXCLUDED.source_updated_at,
        created_at = EXCLUDED.created_at,
        last_message_at = EXCLUDED.last_message_at,
        deleted_at = CASE WHEN c.deleted_by = 'source' THEN NULL ELSE c.deleted_at END,
        deleted_by = CASE WHEN c.deleted_by = 'source' THEN NULL ELSE c.deleted_by END
    WHERE c.client_code = EXCLUDED.client_code
      AND (c.source_updated_at IS NULL OR EXCLUDED.source_updated_at IS NULL
           OR EXCLUDED.source_updated_at >= c.source_updated_at)
      AND ((c.client_code, c.user_id, c.channel, c.summary, c.full_conversation, c.metadata,
            c.message_count, c.sentiment, c.language, c.content_hash, c.source_updated_at,
            c.created_at, c.last_message_at, c.deleted_by IS NOT DISTINCT FROM 'source',
            c.status IN ('closed', 'archived') OR c.status = EXCLUDED.status)
           IS DISTINCT FROM
           (EXCLUDED.client_code, EXCLUDED.user_id, EXCLUDED.channel, EXCLUDED.summary,
            EXCLUDED.full_conversation, EXCLUDED.metadata, EXCLUDED.message_count,
            EXCLUDED.sentiment, EXCLUDED.language, EXCLUDED.content_hash,
            EXCLUDED.source_updated_at, EXCLUDED.created_at, EXCLUDED.last_message_at, false,
            true))
    RETURNING (c.xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted, count(*) AS written FROM written;

-- name: reject_staged_of_other_clients
-- Staged rows whose conversation belongs to another client (the upsert's guard
-- kept it as it was): rejected, naming both clients. Run after the upsert, in the
-- same transaction, so that it sees a row another writer committed meanwhile.
INSERT INTO conversation_rejects AS r (
    record_key, client_code, crew_code, session_id, source, reason, record_excerpt)
SELECT left(s.crew_code || '/' || s.session_id, 600), s.client_code, s.crew_code,
       s.session_id, %(source)s,
       'conversation ' || c.id || ' belongs to client ' || quote_literal(c.client_code)
           || ', not ' || quote_literal(s.client_code)
           || ': a write never moves a conversation to another client',
       left(row_to_json((SELECT x FROM (SELECT s.client_code, s.crew_code, s.session_id,
           s.user_id, s.channel, s.summary) AS x))::text, 500)
FROM conversation_stage AS s
JOIN conversations AS c ON c.id = conversation_id(s.crew_code, s.session_id)
WHERE c.client_code <> s.client_code
ON CONFLICT (record_key) DO UPDATE
SET client_code = EXCLUDED.client_code, crew_code = EXCLUDED.crew_code,
    session_id = EXCLUDED.session_id, source = EXCLUDED.source, reason = EXCLUDED.reason,
    record_excerpt = EXCLUDED.record_excerpt, last_seen_at = now()
RETURNING r.record_key, r.reason;

-- name: soft_delete_gone_sessions
-- Sessions whose source rows are gone: the conversation stays, marked deleted.
UPDATE conversations AS c
SET deleted_at = now(), deleted_by = 'source', source_updated_at = g.source_updated_at
FROM unnest(%(crew_codes)s::text[], %(session_ids)s::text[],
            %(source_updated_at)s::timestamptz[]) AS g(crew_code, session_id, source_updated_at)
WHERE c.id = conversation_id(g.crew_code, g.session_id)
  AND c.deleted_at IS NULL
  AND (c.source_updated_at IS NULL OR g.source_updated_at >= c.source_updated_at)
RETURNING c.id;

-- name: record_conversation_rejects
INSERT INTO conversation_rejects AS r (
    record_key, client_code, crew_code, session_id, source, reason, record_excerpt)
SELECT * FROM unnest(%(keys)s::text[], %(client_codes)s::text[], %(crew_codes)s::text[],
                     %(session_ids)s::text[], %(sources)s::text[], %(reasons)s::text[],
                     %(excerpts)s::text[])
ON CONFLICT (record_key) DO UPDATE
SET client_code = EXCLUDED.client_code, crew_code = EXCLUDED.crew_code,
    session_id = EXCLUDED.session_id, source = EXCLUDED.source, reason = EXCLUDED.reason,
    record_excerpt = EXCLUDED.record_excerpt, last_seen_at = now();

-- name: peek_conversation_queue
-- The oldest queued sessions with the version each was queued at (not locked:
-- the builder deletes an entry only at that version, after writing).
SELECT q.crew_code, q.session_id::text, q.version
FROM conversation_queue AS q
WHERE NOT (q.crew_code = ANY(%(skip_crews)s::text[]))
ORDER BY q.queued_at, q.crew_code, q.session_id
LIMIT %(limit)s;

-- name: dequeue_built
DELETE FROM conversation_queue AS q
USING unnest(%(crew_codes)s::text[], %(session_ids)s::text[], %(versions)s::bigint[])
      AS b(crew_code, session_id, version)
WHERE q.crew_code = b.crew_code AND q.session_id = b.session_id AND q.version = b.version;

-- name: sessions_to_build
-- What the builder needs of chosen sessions: the discovered row, the crew's
-- table, and the day the stored conversation is filed under now.
SELECT d.crew_code, d.session_id::text, d.client_code, cr.histories_table,
       d.message_count, d.first_message_id, d.last_message_id, d.started_at, d.ended_at,
       d.updated_at, d.deleted_at, c.created_at AS stored_created_at
FROM unnest(%(crew_codes)s::text[], %(session_ids)s::text[]) AS k(crew_code, session_id)
JOIN discovered_sessions AS d ON d.crew_code = k.crew_code AND d.session_id = k.session_id
JOIN crews AS cr ON cr.crew_code = d.crew_code
LEFT JOIN conversations AS c
       ON c.crew_code = d.crew_code AND c.session_id = d.session_id
ORDER BY d.crew_code, d.session_id;

-- name: window_session_keys
-- Every session filed under a partition: started in the window, or its stored
-- conversation is (a session whose start moved to another day).
SELECT d.crew_code, d.session_id::text
FROM discovered_sessions AS d
WHERE d.started_at >= %(window_start)s AND d.started_at < %(window_end)s
UNION
SELECT c.crew_code, c.session_id::text
FROM conversations AS c
WHERE c.created_at >= %(window_start)s AND c.created_at < %(window_end)s
  AND c.source_updated_at IS NOT NULL
ORDER BY 1, 2;

-- name: session_messages_by_session
-- The messages of chosen sessions, each found through its own id range (and the
-- session_id index when the table has one). Rows discovery rejects are left out,
-- by discovery's own rule (histories_row_problem, migration 0011_row_rules) on the
-- row as discovery reads it ({message}, {message_text} and {message_join}:
-- json_message_join for a json column), so a json row jsonb cannot hold is left
-- out, not cast. {session_match} compares the stored text id
-- in the column's type where an index can serve (Source.session_id_sides): an id
-- that is no value of that type matches no row.
SELECT s.session_id, m.id, m.message, m.created_at
FROM unnest(%(session_ids)s::text[], %(first_ids)s::bigint[], %(last_ids)s::bigint[])
     AS s(session_id, first_id, last_id)
CROSS JOIN LATERAL (
    SELECT h.id::bigint AS id, {message} AS message, {created_at} AS created_at
    FROM {histories} AS h {message_join}
    WHERE {session_match}
      AND h.id BETWEEN s.first_id AND s.last_id
      AND histories_row_problem(h.session_id::text, {message}, {message_text},
                                {created_at}) IS NULL
) AS m
ORDER BY s.session_id, m.id;

-- name: session_messages_by_range
-- The same, through one scan of the id range all chosen sessions share: cheaper
-- when their ranges overlap (a day's sessions, interleaved) and no session_id
-- index exists.
SELECT h.session_id::text AS session_id, h.id::bigint AS id, {message} AS message,
       {created_at} AS created_at
FROM {histories} AS h {message_join}
WHERE h.id BETWEEN %(low)s AND %(high)s
  AND h.session_id::text = ANY(%(session_ids)s::text[])
  AND histories_row_problem(h.session_id::text, {message}, {message_text}, {created_at})
      IS NULL
ORDER BY 1, 2;

-- name: queue_backlog
SELECT count(*) AS sessions, min(queued_at) AS oldest FROM conversation_queue;

-- name: embedding_column_dimension
-- pgvector keeps a vector(N) column's N as its type modifier.
SELECT a.atttypmod AS dimension
FROM pg_attribute AS a
WHERE a.attrelid = 'conversations'::regclass AND a.attname = 'embedding';

-- name: embedding_model_change
-- Record the model in force; when it changed, every stored vector is queued to
-- be embedded again (they came from another model). Returns the rows re-queued.
WITH previous AS (
    SELECT model FROM embedding_state WHERE singleton
),
saved AS (
    INSERT INTO embedding_state AS e (singleton, model, dimension)
    VALUES (true, %(model)s, %(dimension)s)
    ON CONFLICT (singleton) DO UPDATE
    SET model = EXCLUDED.model, dimension = EXCLUDED.dimension, changed_at = now()
    WHERE e.model IS DISTINCT FROM EXCLUDED.model OR e.dimension <> EXCLUDED.dimension
),
requeued AS (
    UPDATE conversations AS c
    SET embedding_hash = NULL
    WHERE EXISTS (SELECT 1 FROM previous AS p WHERE p.model IS DISTINCT FROM %(model)s)
      AND c.embedding_hash IS NOT NULL
    RETURNING 1
)
SELECT (SELECT model FROM previous) AS previous_model, (SELECT count(*) FROM requeued) AS requeued;

-- name: embedding_backlog_batch
-- Conversations whose text has no vector yet (served by the backlog index).
SELECT c.id, c.content_hash, c.full_conversation
FROM conversations AS c
WHERE c.embedding_hash IS DISTINCT FROM c.content_hash AND c.deleted_at IS NULL
ORDER BY c.updated_at
LIMIT %(limit)s;

-- name: embedding_backlog_count
SELECT count(*) FROM conversations AS c
WHERE c.embedding_hash IS DISTINCT FROM c.content_hash AND c.deleted_at IS NULL;

-- name: embedding_cache_lookup
SELECT e.content_hash, e.embedding
FROM embedding_cache AS e
WHERE e.model = %(model)s AND e.content_hash = ANY(%(hashes)s::bytea[]);

-- name: create_embedding_stage
CREATE TEMP TABLE IF NOT EXISTS embedding_stage (
    id           uuid NOT NULL,
    content_hash bytea NOT NULL,
    embedding    vector,
    fresh        boolean NOT NULL
) ON COMMIT DELETE ROWS;

-- name: copy_embedding_stage
COPY embedding_stage (id, content_hash, embedding, fresh) FROM STDIN WITH (FORMAT BINARY);

-- name: save_embeddings
-- Fresh vectors into the cache, then onto the conversations whose text is still
-- the one embedded (a text changed meanwhile waits for the next batch).
WITH cached AS (
    INSERT INTO embedding_cache (model, content_hash, embedding)
    SELECT DISTINCT ON (s.content_hash) %(model)s, s.content_hash, s.embedding
    FROM embedding_stage AS s
    WHERE s.fresh
    ON CONFLICT (model, content_hash) DO NOTHING
),
saved AS (
    UPDATE conversations AS c
    SET embedding = s.embedding, embedding_hash = s.content_hash,
        embedding_model = %(model)s, embedded_at = now()
    FROM embedding_stage AS s
    WHERE c.id = s.id AND c.content_hash = s.content_hash
    RETURNING 1
)
SELECT count(*) FROM saved;

-- name: conversations_vs_sessions
-- The conversations check: live sessions without a live conversation, counts
-- that differ, and live conversations of deleted sessions; queued sessions are
-- still to be built and not counted.
WITH pairs AS (
    SELECT d.crew_code, d.session_id, d.deleted_at AS session_deleted_at,
           d.message_count AS session_messages,
           c.id IS NOT NULL AS has_conversation, c.deleted_at AS conversation_deleted_at,
           c.deleted_by, c.message_count AS conversation_messages
    FROM discovered_sessions AS d
    LEFT JOIN conversations AS c ON c.crew_code = d.crew_code AND c.session_id = d.session_id
    WHERE NOT EXISTS (SELECT 1 FROM conversation_queue AS q
                      WHERE q.crew_code = d.crew_code AND q.session_id = d.session_id)
),
problems AS (
    SELECT p.*,
           CASE
               WHEN p.session_deleted_at IS NULL
                    AND (NOT p.has_conversation OR p.deleted_by = 'source') THEN 'missing'
               WHEN p.session_deleted_at IS NULL AND p.has_conversation
                    AND p.conversation_messages <> p.session_messages THEN 'stale'
               WHEN p.session_deleted_at IS NOT NULL AND p.has_conversation
                    AND p.conversation_deleted_at IS NULL THEN 'orphaned'
           END AS problem
    FROM pairs AS p
)
SELECT count(*) FILTER (WHERE problem = 'missing') AS missing,
       count(*) FILTER (WHERE problem = 'stale') AS stale,
       count(*) FILTER (WHERE problem = 'orphaned') AS orphaned,
       (SELECT coalesce(jsonb_agg(x), '[]'::jsonb) FROM (
            SELECT jsonb_build_object('crew_code', crew_code, 'session_id', session_id,
                                      'problem', problem) AS x
            FROM problems WHERE problem IS NOT NULL
            ORDER BY crew_code, session_id LIMIT 10) AS e) AS examples
FROM problems;
