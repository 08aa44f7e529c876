-- The product's reads and small writes (conversation_assets/reads.py). Every
-- statement is keyed by client_code: no statement here can see another client's
-- rows. Optional filters are written `(%(x)s IS NULL OR ...)`: reads.py runs
-- these statements unprepared (prepare=False), so each is planned with its actual
-- parameters whatever the caller's connection does, the planner folds the unused
-- filters away and still picks conversations_user_created_idx /
-- conversations_client_created_idx. A generic plan of a prepared statement would
-- not (measured: a 10 ms search became 170 ms once psycopg prepared it).
-- (tests/test_reads.py checks the plans).

-- name: reads_columns
-- What a ConversationSummary holds, in reads.py's _COLUMNS order; the
-- transcript only when asked, the tags sorted.
c.id, c.client_code, c.crew_code, c.session_id::text, c.user_id, c.channel::text,
c.status::text, c.summary, c.message_count, c.sentiment, c.language, c.metadata,
c.created_at, c.updated_at, c.last_message_at, c.deleted_at,
CASE WHEN %(with_transcript)s::boolean THEN c.full_conversation END,
ARRAY(SELECT t.tag FROM conversation_tags AS t WHERE t.conversation_id = c.id ORDER BY t.tag)

-- name: reads_list_conversations
-- One page of a client's conversations, newest first, and the count of all
-- matches, in one statement: the matches' keys are kept once, counted, and the
-- page's rows (with their tags) fetched by id. A page past the last still
-- returns the total (one row of NULLs besides it).
WITH matched AS MATERIALIZED (
    SELECT c.id, c.created_at
    FROM conversations AS c
    WHERE c.client_code = %(client_code)s
      AND c.deleted_at IS NULL
      AND (%(user_id)s::text IS NULL OR c.user_id = %(user_id)s::text)
      AND (%(channel)s::text IS NULL OR c.channel = %(channel)s::text)
      AND (%(status)s::text IS NULL OR c.status = %(status)s::text)
      AND (%(start)s::timestamptz IS NULL OR c.created_at >= %(start)s::timestamptz)
      AND (%(end)s::timestamptz IS NULL OR c.created_at < %(end)s::timestamptz)
      -- One expression for the three parts, so that the trigram index README
      -- offers (conversations_search_trgm_idx) can serve it when it exists.
      AND (%(pattern)s::text IS NULL
           OR conversation_search_text(c.summary, c.full_conversation, c.user_id)
              ILIKE %(pattern)s::text ESCAPE '\')
      AND (cardinality(%(include_tags)s::text[]) = 0
           OR EXISTS (SELECT 1 FROM conversation_tags AS t
                      WHERE t.conversation_id = c.id AND t.tag = ANY(%(include_tags)s::text[])))
      AND (cardinality(%(exclude_tags)s::text[]) = 0
           OR NOT EXISTS (SELECT 1 FROM conversation_tags AS t
                          WHERE t.conversation_id = c.id
                            AND t.tag = ANY(%(exclude_tags)s::text[])))
),
page AS (
    SELECT m.id, m.created_at
    FROM matched AS m
    ORDER BY m.created_at DESC, m.id
    LIMIT %(limit)s OFFSET %(offset)s
)
SELECT (SELECT count(*) FROM matched) AS total, {columns}
FROM (SELECT 1) AS one
LEFT JOIN (page AS p JOIN conversations AS c ON c.id = p.id) ON true
ORDER BY p.created_at DESC, p.id;

-- name: reads_get_conversation
SELECT {columns}
FROM conversations AS c
WHERE c.id = %(id)s
  AND c.client_code = %(client_code)s
  AND (%(include_deleted)s::boolean OR c.deleted_at IS NULL);

-- name: reads_search_settings
-- The HNSW scan's settings for this transaction only, and the column's
-- dimension (pgvector keeps vector(N)'s N as the type modifier). Iterative scan
-- keeps reading the graph until k rows pass the client filter (or
-- max_scan_tuples are read); relaxed_order lets it return them slightly out of
-- order, which reads_nearest re-sorts.
-- Also the planner's own estimate of the client's rows (its most-common-values
-- statistics; a client not among them is small): a filter that leaves few rows
-- makes the HNSW scan read far past k, so those are ranked exactly instead.
SELECT set_config('hnsw.ef_search', %(ef_search)s::text, true),
       set_config('hnsw.iterative_scan', 'relaxed_order', true),
       set_config('hnsw.max_scan_tuples', %(max_scan_tuples)s::text, true),
       coalesce((SELECT f.freq
                 FROM pg_stats AS s
                 CROSS JOIN LATERAL unnest(s.most_common_vals::text::text[],
                                           s.most_common_freqs) AS f(val, freq)
                 WHERE s.schemaname = (SELECT relnamespace::regnamespace::text FROM pg_class
                                       WHERE oid = 'conversations'::regclass)
                   AND s.tablename = 'conversations' AND s.attname = 'client_code'
                   AND f.val = %(client_code)s), 0)
           * greatest((SELECT reltuples FROM pg_class
                       WHERE oid = 'conversations'::regclass), 0) AS client_rows,
       (SELECT a.atttypmod FROM pg_attribute AS a
        WHERE a.attrelid = 'conversations'::regclass AND a.attname = 'embedding') AS dimension;

-- name: reads_exact_settings
-- No index at all for this transaction: the nearest rows are then computed
-- over every candidate row (Seq Scan and a sort), the ground truth for recall.
-- Seq scans and sorts are switched on in case the session had them off.
SELECT set_config('enable_indexscan', 'off', true),
       set_config('enable_bitmapscan', 'off', true),
       set_config('enable_indexonlyscan', 'off', true),
       set_config('enable_seqscan', 'on', true),
       set_config('enable_sort', 'on', true),
       NULL::float8 AS client_rows,
       (SELECT a.atttypmod FROM pg_attribute AS a
        WHERE a.attrelid = 'conversations'::regclass AND a.attname = 'embedding') AS dimension;

-- name: reads_nearest
-- pgvector's pattern for relaxed order: the top k by cosine distance in a
-- MATERIALIZED CTE (served by the client's own HNSW index, whose predicate
-- `client_code = <client> AND embedding IS NOT NULL` the planner proves from this
-- WHERE clause, else by conversations_embedding_hnsw_idx, whose predicate
-- `embedding IS NOT NULL` must appear here too), re-sorted outside: by `distance + 0`,
-- since PostgreSQL 17+ otherwise takes the CTE's ORDER BY as already done and
-- would keep the index's relaxed order. {order} is `distance` (HNSW), or
-- the distance plus 0 to rank the filtered rows exactly (no index can order by it)
-- when the filters leave few of them (a small client through
-- conversations_client_vectors_idx, one user through conversations_user_created_idx).
WITH nearest AS MATERIALIZED (
    SELECT c.id, c.embedding <=> %(query)s::vector AS distance
    FROM conversations AS c
    WHERE c.client_code = %(client_code)s
      AND c.embedding IS NOT NULL
      AND c.deleted_at IS NULL
      AND (%(user_id)s::text IS NULL OR c.user_id = %(user_id)s::text)
      AND (%(channel)s::text IS NULL OR c.channel = %(channel)s::text)
    ORDER BY {order}
    LIMIT %(k)s
)
SELECT n.distance, {columns}
FROM nearest AS n
JOIN conversations AS c ON c.id = n.id
ORDER BY n.distance + 0, c.id;

-- name: reads_soft_delete
UPDATE conversations AS c
SET deleted_at = now(), deleted_by = 'product'
WHERE c.id = %(id)s AND c.client_code = %(client_code)s AND c.deleted_at IS NULL
RETURNING c.id;

-- name: reads_restore
-- Only the product's deletions, and not while the source is gone: a conversation
-- whose source rows are gone comes back when they do (the upsert undoes
-- deleted_by = 'source'), also one the product deleted first.
UPDATE conversations AS c
SET deleted_at = NULL, deleted_by = NULL
WHERE c.id = %(id)s AND c.client_code = %(client_code)s AND c.deleted_by = 'product'
  AND NOT conversation_source_gone(c.crew_code, c.session_id)
RETURNING c.id;

-- name: reads_set_status
UPDATE conversations AS c
SET status = %(status)s
WHERE c.id = %(id)s AND c.client_code = %(client_code)s AND c.deleted_at IS NULL
RETURNING c.id;

-- name: reads_add_tags
-- Tags land only on a live conversation of this client; existing tags stay.
INSERT INTO conversation_tags (conversation_id, tag, client_code)
SELECT c.id, t.tag, c.client_code
FROM conversations AS c
CROSS JOIN unnest(%(tags)s::text[]) AS t(tag)
WHERE c.id = %(id)s AND c.client_code = %(client_code)s AND c.deleted_at IS NULL
ON CONFLICT (conversation_id, tag) DO NOTHING
RETURNING tag;

-- name: reads_remove_tags
DELETE FROM conversation_tags AS t
USING conversations AS c
WHERE t.conversation_id = c.id
  AND c.id = %(id)s
  AND c.client_code = %(client_code)s
  AND t.tag = ANY(%(tags)s::text[])
RETURNING t.tag;

-- name: reads_conversation_stats
SELECT s.total_conversations, s.active_conversations, s.with_embeddings, s.handoff_complete,
       s.avg_per_day
FROM get_conversation_stats(%(client_code)s, %(user_id)s, %(days)s) AS s;

-- name: reads_search_text_index
-- Offered, not created by a migration (README, "Searching text"): a trigram index
-- over what the list's `search` matches, so a substring search reads the matching
-- rows instead of every row of the client. Needs the pg_trgm extension; run it
-- CONCURRENTLY outside a transaction on a live database.
CREATE INDEX {concurrently} IF NOT EXISTS conversations_search_trgm_idx ON conversations
USING gin (conversation_search_text(summary, full_conversation, user_id) gin_trgm_ops)
WHERE deleted_at IS NULL;
