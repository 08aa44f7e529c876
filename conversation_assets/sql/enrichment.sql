-- Enrichment and metrics. Placeholders: {user_insights} and {linked_tickets} are the
-- product's tables (psycopg.sql.Identifier), or an empty relation of the same
-- shape when the product has not created them.

-- name: empty_user_insights
(SELECT NULL::text AS client_code, NULL::text AS user_id WHERE false)

-- name: empty_linked_tickets
(SELECT NULL::uuid AS conversation_id, NULL::text AS client_code, NULL::text AS identifier,
        NULL::text AS title, NULL::text AS state, NULL::text AS url WHERE false)

-- name: product_table_columns
SELECT a.attname
FROM pg_attribute AS a
WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0 AND NOT a.attisdropped;

-- name: enrichment_diff_settings
-- For the transaction that diffs the product tables: room for the hash tables of
-- both (a sort on disk otherwise), and row texts that do not depend on the
-- session's settings (the row hashes are taken over them).
SELECT set_config('work_mem', %(work_mem)s, true),
       set_config('DateStyle', 'ISO, YMD', true),
       set_config('TimeZone', 'UTC', true),
       set_config('extra_float_digits', '1', true);

-- name: product_table_fingerprint
-- The table's file and write counters now ('missing' when it does not exist; NULL
-- when the counters are off), and what the last refresh saw.
SELECT CASE
           WHEN to_regclass(%(source)s) IS NULL THEN 'missing'
           WHEN current_setting('track_counts')::boolean THEN
               concat_ws(':', pg_relation_filenode(to_regclass(%(source)s)),
                         pg_stat_get_tuples_inserted(to_regclass(%(source)s)),
                         pg_stat_get_tuples_updated(to_regclass(%(source)s)),
                         pg_stat_get_tuples_deleted(to_regclass(%(source)s)))
       END,
       (SELECT f.fingerprint FROM enrichment_source_fingerprints AS f
        WHERE f.source = %(source)s);

-- name: save_product_table_fingerprint
INSERT INTO enrichment_source_fingerprints AS f (source, fingerprint)
VALUES (%(source)s, %(fingerprint)s)
ON CONFLICT (source) DO UPDATE SET fingerprint = EXCLUDED.fingerprint;

-- name: user_insights_rows
-- A hash of the row's text (of all its rows, should the table lack a key): record
-- output is several times cheaper than to_jsonb, and no sort is needed.
SELECT u.client_code::text AS client_code, u.user_id::text AS source_key,
       sum(hashtextextended(u::text, 0)) AS row_hash
FROM {user_insights} AS u
WHERE u.client_code IS NOT NULL AND u.user_id IS NOT NULL
GROUP BY 1, 2

-- name: linked_tickets_rows
-- Ids that are not uuids cannot name a conversation: left out, not an error.
SELECT t.client_code::text AS client_code, lower(t.conversation_id::text) AS source_key,
       sum(hashtextextended(t::text, 0)) AS row_hash
FROM {linked_tickets} AS t
WHERE t.client_code IS NOT NULL
  AND t.conversation_id::text ~* '^[0-9a-f]{{8}}-?[0-9a-f]{{4}}-?[0-9a-f]{{4}}-?[0-9a-f]{{4}}-?[0-9a-f]{{12}}$'
GROUP BY 1, 2

-- name: user_insights_conversations
c.client_code = d.client_code AND c.user_id = d.source_key

-- name: linked_tickets_conversations
c.id = d.source_key::uuid AND c.client_code = d.client_code

-- name: queue_changed_product_rows
-- Rows of a product table (the rows placeholder: key and hash) that changed,
-- appeared or went since the last refresh: their hashes are saved and the
-- conversations they join queued, in this one statement.
WITH current_rows AS (
    {rows}
),
known AS (
    SELECT s.client_code, s.source_key, s.row_hash
    FROM enrichment_source_state AS s
    WHERE s.source = %(source)s
),
changed AS (
    SELECT coalesce(c.client_code, k.client_code) AS client_code,
           coalesce(c.source_key, k.source_key) AS source_key, c.row_hash
    FROM current_rows AS c
    FULL JOIN known AS k ON k.client_code = c.client_code AND k.source_key = c.source_key
    WHERE c.row_hash IS DISTINCT FROM k.row_hash
),
saved AS (
    INSERT INTO enrichment_source_state AS s (source, client_code, source_key, row_hash)
    SELECT %(source)s, d.client_code, d.source_key, d.row_hash
    FROM changed AS d WHERE d.row_hash IS NOT NULL
    ON CONFLICT (source, client_code, source_key) DO UPDATE SET row_hash = EXCLUDED.row_hash
),
forgotten AS (
    DELETE FROM enrichment_source_state AS s
    USING changed AS d
    WHERE d.row_hash IS NULL AND s.source = %(source)s
      AND s.client_code = d.client_code AND s.source_key = d.source_key
),
queued AS (
    INSERT INTO enrichment_queue AS q (conversation_id)
    SELECT c.id
    FROM changed AS d
    JOIN conversations AS c ON {conversations_of}
    WHERE c.deleted_at IS NULL
    ORDER BY c.id
    ON CONFLICT (conversation_id) DO UPDATE SET version = q.version + 1
    RETURNING 1
)
SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM queued);

-- name: peek_enrichment_queue
-- The next entries after a cursor (queued_at, id), queued before the run began:
-- an entry queued again during the run keeps its place behind the cursor and one
-- queued anew is left for the next run, so a run always ends.
SELECT q.conversation_id, q.version, q.queued_at
FROM enrichment_queue AS q
WHERE q.queued_at <= %(until)s
  AND (%(after)s::timestamptz IS NULL
       OR (q.queued_at, q.conversation_id) > (%(after)s::timestamptz, %(after_id)s::uuid))
ORDER BY q.queued_at, q.conversation_id
LIMIT %(limit)s;

-- name: enrichment_queue_left
SELECT count(*) FROM enrichment_queue;

-- name: lock_enriched_entries
-- The batch's queue entries, locked in id order (as every writer of the queue
-- does) before they are deleted: no deadlock with a concurrent writer.
SELECT 1 FROM enrichment_queue
WHERE conversation_id = ANY(%(ids)s::uuid[])
ORDER BY conversation_id
FOR UPDATE;

-- name: dequeue_enriched
DELETE FROM enrichment_queue AS q
USING unnest(%(ids)s::uuid[], %(versions)s::bigint[]) AS b(conversation_id, version)
WHERE q.conversation_id = b.conversation_id AND q.version = b.version;

-- name: record_enrichment_rejects
-- Conversations the refresh could not enrich, with the reason (client_code for
-- whoever looks), and their queue entries settled at the version tried. Called
-- after lock_enriched_entries, in its transaction.
WITH refused AS (
    SELECT DISTINCT ON (r.id) r.id, r.version, r.reason
    FROM unnest(%(ids)s::uuid[], %(versions)s::bigint[], %(reasons)s::text[])
         AS r(id, version, reason)
    ORDER BY r.id
),
saved AS (
    INSERT INTO enrichment_rejects AS e (conversation_id, client_code, reason)
    SELECT f.id, (SELECT c.client_code FROM conversations AS c WHERE c.id = f.id), f.reason
    FROM refused AS f
    ON CONFLICT (conversation_id) DO UPDATE
    SET client_code = EXCLUDED.client_code, reason = EXCLUDED.reason, last_seen_at = now()
)
DELETE FROM enrichment_queue AS q
USING refused AS f
WHERE q.conversation_id = f.id AND q.version = f.version;

-- name: window_conversation_ids
-- Every conversation filed under a partition now, or enriched under it before.
SELECT c.id FROM conversations AS c
WHERE c.created_at >= %(window_start)s AND c.created_at < %(window_end)s
UNION
SELECT e.id FROM enriched_conversations AS e
WHERE e.created_at >= %(window_start)s AND e.created_at < %(window_end)s;

-- name: enrich_conversations
-- The chosen conversations' enriched rows, in one statement: upserted when live
-- (rewritten only if something changed), deleted when gone or soft-deleted.
-- Returns the UTC days touched (before and after), for the metrics downstream.
WITH chosen AS (
    SELECT DISTINCT unnest(%(ids)s::uuid[]) AS id
),
live AS (
    -- Only what the row needs (not the vector, nor the whole transcript).
    SELECT c.id, c.client_code, c.crew_code, c.session_id, c.user_id, c.channel, c.status,
           c.summary, c.metadata, c.sentiment, c.language, c.message_count, c.created_at,
           c.last_message_at, right(c.full_conversation, %(excerpt_chars)s) AS latest_messages,
           c.embedding IS NOT NULL AS has_embedding
    FROM chosen AS k
    JOIN conversations AS c ON c.id = k.id
    WHERE c.deleted_at IS NULL
),
insights AS (
    SELECT DISTINCT ON (u.client_code, u.user_id::text)
           u.client_code::text AS client_code, u.user_id::text AS user_id,
           to_jsonb(u) - 'client_code' - 'user_id' AS insights
    FROM {user_insights} AS u
    WHERE (u.client_code::text, u.user_id::text) IN (SELECT client_code, user_id FROM live)
    ORDER BY u.client_code, u.user_id::text, u::text
),
tickets AS (
    -- Compared as text: a product may keep the id in a text column.
    SELECT DISTINCT ON (lower(t.conversation_id::text), t.client_code::text)
           lower(t.conversation_id::text) AS conversation_key, t.client_code::text AS client_code,
           t.identifier::text AS identifier, t.title::text AS title, t.state::text AS state,
           t.url::text AS url
    FROM {linked_tickets} AS t
    WHERE (lower(t.conversation_id::text), t.client_code::text)
          IN (SELECT id::text, client_code FROM live)
    ORDER BY lower(t.conversation_id::text), t.client_code::text, t::text
),
fresh AS (
    SELECT l.id, l.client_code, l.crew_code, l.session_id, l.user_id, l.channel, l.status,
           l.summary, l.metadata, l.sentiment, l.language, l.message_count,
           l.created_at AS first_message_at, l.last_message_at,
           extract(epoch FROM l.last_message_at - l.created_at)::double precision
               AS duration_seconds,
           l.latest_messages, l.has_embedding,
           i.insights AS user_insights,
           t.identifier AS ticket_identifier, t.title AS ticket_title,
           t.state AS ticket_state, t.url AS ticket_url,
           l.created_at
    FROM live AS l
    LEFT JOIN insights AS i ON i.client_code = l.client_code AND i.user_id = l.user_id
    LEFT JOIN tickets AS t ON t.conversation_key = l.id::text AND t.client_code = l.client_code
),
before AS (
    SELECT e.id, e.created_at FROM enriched_conversations AS e JOIN chosen AS k USING (id)
),
-- An earlier reject of a conversation enriched (or removed) now is void; the
-- EXISTS skips the join while there are none.
cleared AS (
    DELETE FROM enrichment_rejects AS r
    USING chosen AS k
    WHERE r.conversation_id = k.id AND EXISTS (SELECT 1 FROM enrichment_rejects)
),
removed AS (
    DELETE FROM enriched_conversations AS e
    USING chosen AS k
    WHERE e.id = k.id AND NOT EXISTS (SELECT 1 FROM live AS l WHERE l.id = k.id)
    RETURNING e.id, e.created_at
),
written AS (
    INSERT INTO enriched_conversations AS e (
        id, client_code, crew_code, session_id, user_id, channel, status, summary, metadata,
        sentiment, language, message_count, first_message_at, last_message_at,
        duration_seconds, latest_messages, has_embedding, user_insights, ticket_identifier,
        ticket_title, ticket_state, ticket_url, created_at)
    SELECT * FROM fresh
    ON CONFLICT (id) DO UPDATE
    SET client_code = EXCLUDED.client_code, crew_code = EXCLUDED.crew_code,
        session_id = EXCLUDED.session_id, user_id = EXCLUDED.user_id,
        channel = EXCLUDED.channel, status = EXCLUDED.status, summary = EXCLUDED.summary,
        metadata = EXCLUDED.metadata, sentiment = EXCLUDED.sentiment,
        language = EXCLUDED.language, message_count = EXCLUDED.message_count,
        first_message_at = EXCLUDED.first_message_at,
        last_message_at = EXCLUDED.last_message_at,
        duration_seconds = EXCLUDED.duration_seconds,
        latest_messages = EXCLUDED.latest_messages, has_embedding = EXCLUDED.has_embedding,
        user_insights = EXCLUDED.user_insights,
        ticket_identifier = EXCLUDED.ticket_identifier, ticket_title = EXCLUDED.ticket_title,
        ticket_state = EXCLUDED.ticket_state, ticket_url = EXCLUDED.ticket_url,
        created_at = EXCLUDED.created_at, enriched_at = now()
    WHERE (e.client_code, e.crew_code, e.session_id, e.user_id, e.channel, e.status,
           e.summary, e.metadata, e.sentiment, e.language, e.message_count,
           e.first_message_at, e.last_message_at, e.duration_seconds, e.latest_messages,
           e.has_embedding, e.user_insights, e.ticket_identifier, e.ticket_title,
           e.ticket_state, e.ticket_url, e.created_at)
          IS DISTINCT FROM
          (EXCLUDED.client_code, EXCLUDED.crew_code, EXCLUDED.session_id, EXCLUDED.user_id,
           EXCLUDED.channel, EXCLUDED.status, EXCLUDED.summary, EXCLUDED.metadata,
           EXCLUDED.sentiment, EXCLUDED.language, EXCLUDED.message_count,
           EXCLUDED.first_message_at, EXCLUDED.last_message_at, EXCLUDED.duration_seconds,
           EXCLUDED.latest_messages, EXCLUDED.has_embedding, EXCLUDED.user_insights,
           EXCLUDED.ticket_identifier, EXCLUDED.ticket_title, EXCLUDED.ticket_state,
           EXCLUDED.ticket_url, EXCLUDED.created_at)
    RETURNING e.id, e.created_at
),
touched AS (
    SELECT w.created_at FROM written AS w
    UNION ALL SELECT r.created_at FROM removed AS r
    UNION ALL SELECT b.created_at FROM before AS b WHERE b.id IN (SELECT id FROM written)
),
-- The days and hours whose metrics this changes, marked stale in this transaction.
marked AS (
    INSERT INTO metrics_dirty_periods AS m (kind, period_start)
    SELECT p.kind, p.period_start
    FROM (SELECT DISTINCT 'day' AS kind, date_trunc('day', t.created_at, 'UTC') AS period_start
          FROM touched AS t
          UNION
          SELECT DISTINCT 'hour', date_trunc('hour', t.created_at, 'UTC') FROM touched AS t) AS p
    ORDER BY 1, 2
    ON CONFLICT (kind, period_start)
    DO UPDATE SET version = m.version + 1, marked_at = now()
)
SELECT (SELECT count(*) FROM written) AS written,
       (SELECT count(*) FROM removed) AS removed,
       ARRAY(SELECT DISTINCT (t.created_at AT TIME ZONE 'UTC')::date FROM touched AS t
             ORDER BY 1) AS days;

-- name: clear_dirty_periods
-- First in a metrics refresh's transaction: a batch committing later marks the
-- period again (it waits for this lock, then inserts anew).
DELETE FROM metrics_dirty_periods
WHERE kind = %(kind)s AND period_start >= %(window_start)s AND period_start < %(window_end)s;

-- name: pending_dirty_periods
-- A mark is known by its version and when it was made: a refresh deletes marks, and
-- a period marked again afterwards starts over at version 1. Marks before the first
-- partition (older history: no refresh ever clears them) are left out, else they
-- would take the whole limit.
SELECT kind, period_start, version || '@' || extract(epoch FROM marked_at) AS version
FROM metrics_dirty_periods
WHERE period_start >= %(since)s AND period_start < %(before)s
ORDER BY kind, period_start
LIMIT %(limit)s;

-- name: delete_metrics_days
DELETE FROM conversation_metrics
WHERE day >= %(first_day)s::date AND day < %(end_day)s::date;

-- name: insert_metrics_days
-- The days' metrics from the enriched rows (one row per live conversation), day by
-- day. Within a day the plain figures are hash-aggregated and each group's p95 is
-- taken from its own durations (at most one day's conversations of one client,
-- channel and status). A day of 100k conversations: 62-66 ms, against 114-121 ms
-- when the whole day was sorted by group first (benchmarks/README.md). Day by day
-- because the planner, not knowing how few groups a day has, chose that sort.
INSERT INTO conversation_metrics (
    client_code, day, channel, status, conversations, messages, avg_duration_seconds,
    p95_duration_seconds, with_embeddings, handed_off, avg_sentiment)
SELECT g.client_code, (d.day_start AT TIME ZONE 'UTC')::date, g.channel, g.status,
       g.conversations, g.messages, g.avg_duration_seconds,
       (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY x.duration)
        FROM unnest(g.durations) AS x(duration)),
       g.with_embeddings, g.handed_off, g.avg_sentiment
FROM generate_series(%(window_start)s::timestamptz,
                     %(window_end)s::timestamptz - interval '1 day',
                     interval '1 day') AS d(day_start)
CROSS JOIN LATERAL (
    SELECT e.client_code, e.channel, e.status,
           count(*) AS conversations, sum(e.message_count) AS messages,
           avg(e.duration_seconds) AS avg_duration_seconds,
           array_agg(e.duration_seconds) FILTER (WHERE e.duration_seconds IS NOT NULL)
               AS durations,
           count(*) FILTER (WHERE e.has_embedding) AS with_embeddings,
           count(*) FILTER (WHERE e.status = 'handoff_complete') AS handed_off,
           avg(e.sentiment) AS avg_sentiment
    FROM enriched_conversations AS e
    WHERE e.created_at >= d.day_start AND e.created_at < d.day_start + interval '1 day'
    GROUP BY 1, 2, 3
) AS g;

-- name: metrics_vs_recount
-- Metrics rows of the chosen days against a recount from conversations.
WITH recount AS (
    SELECT c.client_code, (c.created_at AT TIME ZONE 'UTC')::date AS day, c.channel::text,
           c.status::text, count(*) AS conversations, sum(c.message_count) AS messages
    FROM conversations AS c
    WHERE c.deleted_at IS NULL
      AND c.created_at >= %(window_start)s AND c.created_at < %(window_end)s
    GROUP BY 1, 2, 3, 4
),
stored AS (
    SELECT m.client_code, m.day, m.channel::text, m.status::text, m.conversations::bigint,
           m.messages
    FROM conversation_metrics AS m
    WHERE m.day >= (%(window_start)s AT TIME ZONE 'UTC')::date
      AND m.day < (%(window_end)s AT TIME ZONE 'UTC')::date
),
diff AS (
    SELECT coalesce(r.client_code, s.client_code) AS client_code,
           coalesce(r.day, s.day) AS day, coalesce(r.channel, s.channel) AS channel,
           coalesce(r.status, s.status) AS status,
           s.conversations AS stored_conversations, r.conversations AS recounted_conversations,
           s.messages AS stored_messages, r.messages AS recounted_messages
    FROM recount AS r
    FULL JOIN stored AS s USING (client_code, day, channel, status)
    WHERE (r.conversations, r.messages) IS DISTINCT FROM (s.conversations, s.messages)
)
SELECT (SELECT count(*) FROM diff),
       (SELECT coalesce(sum(conversations), 0)::bigint FROM recount),
       (SELECT coalesce(jsonb_agg(to_jsonb(d)), '[]'::jsonb)
        FROM (SELECT * FROM diff ORDER BY day, client_code, channel, status LIMIT 10) AS d);

-- name: enriched_vs_conversations
-- Live conversations without an enriched row, enriched rows without a live
-- conversation, and how many of those are only waiting in the queue.
WITH missing AS (
    SELECT c.id FROM conversations AS c
    WHERE c.deleted_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM enriched_conversations AS e WHERE e.id = c.id)
),
orphaned AS (
    SELECT e.id FROM enriched_conversations AS e
    WHERE NOT EXISTS (SELECT 1 FROM conversations AS c
                      WHERE c.id = e.id AND c.deleted_at IS NULL)
)
SELECT (SELECT count(*) FROM missing AS m
        WHERE NOT EXISTS (SELECT 1 FROM enrichment_queue AS q WHERE q.conversation_id = m.id)),
       (SELECT count(*) FROM orphaned AS o
        WHERE NOT EXISTS (SELECT 1 FROM enrichment_queue AS q WHERE q.conversation_id = o.id)),
       (SELECT count(*) FROM enrichment_queue),
       ARRAY(SELECT m.id::text FROM missing AS m LIMIT 5),
       ARRAY(SELECT o.id::text FROM orphaned AS o LIMIT 5);

-- name: delete_performance_hours
DELETE FROM performance_stats WHERE hour >= %(window_start)s AND hour < %(window_end)s;

-- name: insert_performance_hours
-- Each hour of the window: conversations started (all clients, and per client)
-- and what the pipeline's runs that finished in it did.
WITH hours AS (
    SELECT generate_series(%(window_start)s::timestamptz,
                           %(window_end)s::timestamptz - interval '1 hour',
                           interval '1 hour') AS hour
),
started AS (
    SELECT date_trunc('hour', e.created_at, 'UTC') AS hour, e.client_code,
           count(*) AS conversations, sum(e.message_count) AS messages
    FROM enriched_conversations AS e
    WHERE e.created_at >= %(window_start)s AND e.created_at < %(window_end)s
    GROUP BY 1, 2
),
runs AS (
    SELECT date_trunc('hour', r.finished_at, 'UTC') AS hour,
           count(*) FILTER (WHERE r.asset = 'discovered_sessions') AS discovery_runs,
           avg(r.duration_ms) FILTER (WHERE r.asset = 'discovered_sessions') AS discovery_ms_avg,
           max(r.duration_ms) FILTER (WHERE r.asset = 'discovered_sessions') AS discovery_ms_max,
           coalesce(sum(r.rows_scanned) FILTER (WHERE r.asset = 'discovered_sessions'), 0)
               AS rows_scanned,
           coalesce(sum(r.items) FILTER (WHERE r.asset = 'conversations'), 0) AS built,
           coalesce(sum(r.batches) FILTER (WHERE r.asset = 'conversations'), 0) AS batches,
           coalesce(sum(r.items) FILTER (WHERE r.asset = 'conversation_embeddings'), 0)
               AS embedded,
           coalesce(sum(r.model_ms) FILTER (WHERE r.asset = 'conversation_embeddings'), 0)
               AS model_ms,
           coalesce(sum(r.items) FILTER (WHERE r.asset = 'enriched_conversations'), 0)
               AS enriched
    FROM performance_runs AS r
    WHERE r.finished_at >= %(window_start)s AND r.finished_at < %(window_end)s
    GROUP BY 1
)
INSERT INTO performance_stats (
    hour, conversations, conversations_by_client, messages, discovery_runs, discovery_ms_avg,
    discovery_ms_max, rows_scanned, conversations_built, build_batches, avg_batch_size,
    embedded, embedding_model_ms, enriched)
SELECT h.hour,
       coalesce((SELECT sum(s.conversations) FROM started AS s WHERE s.hour = h.hour), 0),
       coalesce((SELECT jsonb_object_agg(s.client_code, s.conversations ORDER BY s.client_code)
                 FROM started AS s WHERE s.hour = h.hour), jsonb_build_object()),
       coalesce((SELECT sum(s.messages) FROM started AS s WHERE s.hour = h.hour), 0),
       coalesce(r.discovery_runs, 0), r.discovery_ms_avg, r.discovery_ms_max,
       coalesce(r.rows_scanned, 0), coalesce(r.built, 0), coalesce(r.batches, 0),
       r.built::double precision / nullif(r.batches, 0),
       coalesce(r.embedded, 0), coalesce(r.model_ms, 0), coalesce(r.enriched, 0)
FROM hours AS h
LEFT JOIN runs AS r ON r.hour = h.hour;
