-- Per-client HNSW indexes (conversation_assets/search_indexes.py).
--
-- The migration's conversations_embedding_hnsw_idx holds every client's vectors,
-- so a search within one client walks a graph shared with all the others and
-- filters: a client holding a small share of the rows reads far past k before
-- k of its own come up. An index whose predicate names the client holds only its
-- vectors; the planner picks it by itself for `client_code = <that client>` (the
-- reads are planned with their parameters), as pgvector's README advises for
-- filters on a few distinct values.

-- name: search_index_session_settings
-- What the session had, to give it back after the builds (a pooled connection
-- returns to the pool with them).
SELECT current_setting('maintenance_work_mem') AS maintenance_work_mem,
       current_setting('statement_timeout') AS statement_timeout,
       pg_size_bytes(current_setting('maintenance_work_mem')) AS maintenance_work_mem_bytes;

-- name: search_index_set_session
-- pgvector builds the graph in maintenance_work_mem; statement_timeout 0 while
-- the sync drops and builds, then both as they were.
SELECT set_config('maintenance_work_mem', %(maintenance_work_mem)s, false),
       set_config('statement_timeout', %(statement_timeout)s, false);

-- name: search_index_clients
-- Each client's live vectors, counted (an index-only scan of
-- conversations_client_vectors_idx, whose predicate is this WHERE clause and the
-- per-client indexes' too), largest first.
SELECT client_code, count(*) AS vectors
FROM conversations
WHERE embedding IS NOT NULL AND deleted_at IS NULL
GROUP BY client_code
ORDER BY vectors DESC, client_code;

-- name: search_index_existing
-- The per-client indexes there are (by the names this module gives), with
-- whether each is valid: an interrupted CREATE INDEX CONCURRENTLY leaves an
-- invalid one behind, which writes still maintain but no query uses.
SELECT c.relname AS index_name, i.indisvalid AS valid, pg_relation_size(c.oid) AS bytes
FROM pg_index AS i
JOIN pg_class AS c ON c.oid = i.indexrelid
WHERE i.indrelid = 'conversations'::regclass
  AND c.relname ~ %(pattern)s
ORDER BY c.relname;

-- name: search_index_create
-- The same definition as conversations_embedding_hnsw_idx, for one client's live
-- rows (the reads ask for deleted_at IS NULL, so the planner proves the predicate).
-- CONCURRENTLY: writes to conversations go on during the build. The index name is
-- an Identifier and the client code a Literal: a predicate takes no parameter.
CREATE INDEX CONCURRENTLY {index} ON conversations
    USING hnsw (embedding vector_cosine_ops)
    WHERE client_code = {client_code} AND embedding IS NOT NULL AND deleted_at IS NULL;

-- name: search_index_drop
DROP INDEX CONCURRENTLY IF EXISTS {index};
