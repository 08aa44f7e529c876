-- Messenger sync: the pages, their state, the bulk writes of each API page of
-- threads (one transaction each), and the builder that turns threads into
-- conversations. Values are always parameters.

-- name: messenger_pages_with_state
-- A watermark ahead of the clock (saved before watermarks were capped) reads as now.
SELECT p.page_id, p.client_code, p.label, p.enabled,
       CASE WHEN s.watermark > now() THEN now() ELSE s.watermark END,
       s.last_sync_at, s.last_full_sync_at, s.throttled_until
FROM messenger_pages AS p
LEFT JOIN messenger_sync_state AS s USING (page_id)
WHERE %(page_ids)s::text[] IS NULL OR p.page_id = ANY(%(page_ids)s::text[])
ORDER BY p.page_id;

-- name: stored_threads
-- What the incremental sync compares a listed thread with.
SELECT m.sender_id, m.thread_id, m.updated_time, m.last_message_at, m.deleted_at IS NOT NULL,
       m.message_count
FROM messenger_conversations AS m
WHERE m.page_id = %(page_id)s AND m.sender_id = ANY(%(sender_ids)s::text[]);

-- name: stored_thread_times
-- The sensor's probe: stored updated_time and message count of the listed thread ids.
SELECT m.thread_id, m.updated_time, m.message_count
FROM messenger_conversations AS m
WHERE m.page_id = %(page_id)s AND m.thread_id = ANY(%(thread_ids)s::text[])
  AND m.deleted_at IS NULL;

-- name: create_thread_stage
-- Per connection, emptied at each commit. first/last_message_at: given for threads
-- whose every message was read (NULL: look them up).
CREATE TEMP TABLE IF NOT EXISTS messenger_thread_stage (
    page_id text, sender_id text, client_code text, thread_id text, participant_name text,
    updated_time timestamptz, message_count integer, unread_count integer, snippet text,
    can_reply boolean, first_message_at timestamptz, last_message_at timestamptz
) ON COMMIT DELETE ROWS;

-- name: copy_thread_stage
COPY messenger_thread_stage (page_id, sender_id, client_code, thread_id, participant_name,
    updated_time, message_count, unread_count, snippet, can_reply, first_message_at,
    last_message_at) FROM STDIN WITH (FORMAT BINARY);

-- name: create_event_stage
CREATE TEMP TABLE IF NOT EXISTS messenger_event_stage (
    message_id text, page_id text, sender_id text, client_code text, thread_id text,
    direction text, from_id text, from_name text, created_time timestamptz, text text,
    attachment_kind text
) ON COMMIT DELETE ROWS;

-- name: copy_event_stage
COPY messenger_event_stage (message_id, page_id, sender_id, client_code, thread_id,
    direction, from_id, from_name, created_time, text, attachment_kind)
FROM STDIN WITH (FORMAT BINARY);

-- name: upsert_staged_threads
-- One statement per API page of threads. A row is rewritten only when a field
-- changed, and never by an older view of the thread; a thread seen again after
-- it was marked deleted is live again. A thread stored under another client is left
-- alone (the sync checks that first, see page_sync_start): a write never moves a
-- conversation across tenants. Answers the threads written.
INSERT INTO messenger_conversations AS m (
    page_id, sender_id, client_code, thread_id, participant_name, updated_time,
    message_count, unread_count, snippet, can_reply, first_message_at, last_message_at)
SELECT page_id, sender_id, client_code, thread_id, participant_name, updated_time,
       message_count, unread_count, snippet, can_reply, first_message_at, last_message_at
FROM messenger_thread_stage
ON CONFLICT (page_id, sender_id) DO UPDATE
SET client_code = EXCLUDED.client_code,
    thread_id = EXCLUDED.thread_id,
    participant_name = EXCLUDED.participant_name,
    updated_time = EXCLUDED.updated_time,
    message_count = EXCLUDED.message_count,
    unread_count = EXCLUDED.unread_count,
    snippet = EXCLUDED.snippet,
    can_reply = EXCLUDED.can_reply,
    first_message_at = coalesce(EXCLUDED.first_message_at, m.first_message_at),
    last_message_at = coalesce(EXCLUDED.last_message_at, m.last_message_at),
    synced_at = now(),
    deleted_at = NULL
WHERE EXCLUDED.updated_time >= m.updated_time
  AND m.client_code = EXCLUDED.client_code
  AND (m.client_code, m.thread_id, m.participant_name, m.updated_time, m.message_count,
       m.unread_count, m.snippet, m.can_reply, m.deleted_at IS NULL, m.first_message_at,
       m.last_message_at)
      IS DISTINCT FROM
      (EXCLUDED.client_code, EXCLUDED.thread_id, EXCLUDED.participant_name,
       EXCLUDED.updated_time, EXCLUDED.message_count, EXCLUDED.unread_count,
       EXCLUDED.snippet, EXCLUDED.can_reply, true,
       coalesce(EXCLUDED.first_message_at, m.first_message_at),
       coalesce(EXCLUDED.last_message_at, m.last_message_at))
RETURNING m.sender_id, (m.xmax = 0) AS inserted;

-- name: upsert_staged_events
-- One statement for every message of an API page of threads; idempotent on the
-- message id. A message id already stored under another page is left alone
-- (events_of_other_pages rejects it): a write never moves a row across tenants.
-- Answers per thread: messages inserted, and written in all.
WITH written AS (
INSERT INTO contact_interaction_events AS e (
    message_id, page_id, sender_id, client_code, thread_id, direction, from_id, from_name,
    created_time, text, attachment_kind)
SELECT message_id, page_id, sender_id, client_code, thread_id, direction, from_id,
       from_name, created_time, text, attachment_kind
FROM messenger_event_stage
ON CONFLICT (message_id) DO UPDATE
SET sender_id = EXCLUDED.sender_id,
    client_code = EXCLUDED.client_code,
    thread_id = EXCLUDED.thread_id,
    direction = EXCLUDED.direction,
    from_id = EXCLUDED.from_id,
    from_name = EXCLUDED.from_name,
    created_time = EXCLUDED.created_time,
    text = EXCLUDED.text,
    attachment_kind = EXCLUDED.attachment_kind,
    synced_at = now(),
    deleted_at = NULL
WHERE e.page_id = EXCLUDED.page_id
  AND e.client_code = EXCLUDED.client_code
  AND (e.sender_id, e.client_code, e.thread_id, e.direction, e.from_id, e.from_name,
       e.created_time, e.text, e.attachment_kind, e.deleted_at IS NULL)
      IS DISTINCT FROM
      (EXCLUDED.sender_id, EXCLUDED.client_code, EXCLUDED.thread_id, EXCLUDED.direction,
       EXCLUDED.from_id, EXCLUDED.from_name, EXCLUDED.created_time, EXCLUDED.text,
       EXCLUDED.attachment_kind, true)
RETURNING e.sender_id, (e.xmax = 0) AS inserted
)
SELECT sender_id, (count(*) FILTER (WHERE inserted))::int, count(*)::int
FROM written GROUP BY sender_id;

-- name: events_of_other_pages
SELECT s.message_id, e.page_id
FROM messenger_event_stage AS s
JOIN contact_interaction_events AS e USING (message_id)
WHERE e.page_id <> s.page_id;

-- name: delete_missing_messages
-- A full sync read every message of these threads: those it did not see are gone
-- at the source, marked deleted (kept). EXCEPT hashes both sides: linear.
UPDATE contact_interaction_events AS e
SET deleted_at = now()
FROM (
    SELECT x.message_id FROM contact_interaction_events AS x
    WHERE x.page_id = %(page_id)s AND x.sender_id = ANY(%(sender_ids)s::text[])
      AND x.deleted_at IS NULL
    EXCEPT
    SELECT s.message_id FROM messenger_event_stage AS s
) AS gone
WHERE e.message_id = gone.message_id
RETURNING e.sender_id;

-- name: refresh_thread_times
-- First and last live message of threads whose messages changed (two index probes
-- each, through contact_interaction_events_thread_idx).
UPDATE messenger_conversations AS m
SET first_message_at = t.first_at, last_message_at = t.last_at
FROM (
    SELECT k.sender_id,
           (SELECT min(e.created_time) FROM contact_interaction_events AS e
            WHERE e.page_id = %(page_id)s AND e.sender_id = k.sender_id
              AND e.deleted_at IS NULL) AS first_at,
           (SELECT max(e.created_time) FROM contact_interaction_events AS e
            WHERE e.page_id = %(page_id)s AND e.sender_id = k.sender_id
              AND e.deleted_at IS NULL) AS last_at
    FROM unnest(%(sender_ids)s::text[]) AS k(sender_id)
) AS t
WHERE m.page_id = %(page_id)s AND m.sender_id = t.sender_id
  AND (m.first_message_at, m.last_message_at) IS DISTINCT FROM (t.first_at, t.last_at);

-- name: queue_messenger_threads
-- Threads whose conversation must be rebuilt, in the transaction of the change.
INSERT INTO messenger_conversation_queue AS q (page_id, sender_id)
SELECT %(page_id)s, k.sender_id FROM unnest(%(sender_ids)s::text[]) AS k(sender_id)
ON CONFLICT (page_id, sender_id) DO UPDATE SET version = q.version + 1;

-- name: threads_not_seen
-- After a full listing: live threads it did not list (deleted, or moved past the
-- cursor while the listing ran; each is checked by id before being marked).
SELECT m.sender_id, m.thread_id
FROM messenger_conversations AS m
WHERE m.page_id = %(page_id)s AND m.deleted_at IS NULL
  AND NOT (m.sender_id = ANY(%(seen)s::text[]))
ORDER BY m.sender_id;

-- name: delete_threads
-- Threads gone at the source, and their messages: marked deleted, kept.
WITH gone AS (
    UPDATE messenger_conversations
    SET deleted_at = now()
    WHERE page_id = %(page_id)s AND sender_id = ANY(%(sender_ids)s::text[])
      AND deleted_at IS NULL
    RETURNING sender_id
), messages AS (
    UPDATE contact_interaction_events AS e
    SET deleted_at = now()
    FROM gone
    WHERE e.page_id = %(page_id)s AND e.sender_id = gone.sender_id AND e.deleted_at IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone)::int, (SELECT count(*) FROM messages)::int;

-- name: save_sync_state
-- In the transaction that writes the last rows a pass covers. An incremental pass
-- never moves the watermark back; a full one (which saw every thread) sets it.
INSERT INTO messenger_sync_state AS s (
    page_id, watermark, last_sync_at, last_full_sync_at, last_mode, updated_at)
VALUES (%(page_id)s, %(watermark)s, now(), CASE WHEN %(full)s THEN now() END, %(mode)s, now())
ON CONFLICT (page_id) DO UPDATE
SET watermark = CASE WHEN %(full)s THEN EXCLUDED.watermark
                     ELSE greatest(s.watermark, EXCLUDED.watermark) END,
    last_sync_at = now(),
    last_full_sync_at = coalesce(EXCLUDED.last_full_sync_at, s.last_full_sync_at),
    last_mode = EXCLUDED.last_mode,
    throttled_until = NULL,
    last_error = NULL,
    last_error_at = NULL,
    updated_at = now()
RETURNING watermark;

-- name: record_sync_error
INSERT INTO messenger_sync_state AS s (
    page_id, last_error, last_error_at, throttled_until, updated_at)
VALUES (%(page_id)s, %(error)s, now(), %(throttled_until)s, now())
ON CONFLICT (page_id) DO UPDATE
SET last_error = EXCLUDED.last_error, last_error_at = now(),
    throttled_until = EXCLUDED.throttled_until, updated_at = now();

-- name: record_messenger_rejects
INSERT INTO messenger_rejects AS r (page_id, item_kind, item_key, reason, excerpt)
SELECT %(page_id)s, k.kind, k.key, k.reason, k.excerpt
FROM unnest(%(kinds)s::text[], %(keys)s::text[], %(reasons)s::text[], %(excerpts)s::text[])
     AS k(kind, key, reason, excerpt)
ON CONFLICT (page_id, item_kind, item_key) DO UPDATE
SET reason = EXCLUDED.reason, excerpt = EXCLUDED.excerpt, last_seen_at = now();

-- name: clear_messenger_rejects
-- Items stored now lose their earlier reject (run only while the page has some).
DELETE FROM messenger_rejects AS r
USING unnest(%(kinds)s::text[], %(keys)s::text[]) AS k(kind, key)
WHERE r.page_id = %(page_id)s AND r.item_kind = k.kind AND r.item_key = k.key;

-- name: page_sync_start
-- What a page's sync reads before its first call, in one round trip: another client
-- holding its threads (the page was registered again under another one: the sync
-- stops rather than move them), whether it has rejects to clear, and the clock no
-- watermark may pass.
SELECT (SELECT m.client_code
        FROM messenger_conversations AS m
        WHERE m.page_id = %(page_id)s AND m.client_code <> %(client_code)s
        LIMIT 1),
       EXISTS (SELECT 1 FROM messenger_rejects AS r WHERE r.page_id = %(page_id)s),
       now();

-- name: peek_messenger_queue
SELECT q.page_id, q.sender_id, q.version
FROM messenger_conversation_queue AS q
WHERE q.page_id = ANY(%(page_ids)s::text[])
ORDER BY q.queued_at, q.page_id, q.sender_id
LIMIT %(limit)s;

-- name: page_thread_keys
SELECT m.page_id, m.sender_id FROM messenger_conversations AS m
WHERE m.page_id = ANY(%(page_ids)s::text[])
ORDER BY m.page_id, m.sender_id;

-- name: threads_to_build
SELECT m.page_id, m.sender_id, m.client_code, m.thread_id, m.participant_name,
       m.updated_time, m.first_message_at, m.last_message_at, m.deleted_at,
       m.unread_count, m.can_reply
FROM unnest(%(page_ids)s::text[], %(sender_ids)s::text[]) AS k(page_id, sender_id)
JOIN messenger_conversations AS m USING (page_id, sender_id);

-- name: thread_events
-- The live messages of chosen threads in time order (the thread index serves).
SELECT k.page_id, k.sender_id, e.message_id, e.direction, e.created_time, e.text,
       e.attachment_kind
FROM unnest(%(page_ids)s::text[], %(sender_ids)s::text[]) AS k(page_id, sender_id)
CROSS JOIN LATERAL (
    SELECT e.message_id, e.direction, e.created_time, e.text, e.attachment_kind
    FROM contact_interaction_events AS e
    WHERE e.page_id = k.page_id AND e.sender_id = k.sender_id AND e.deleted_at IS NULL
    ORDER BY e.created_time, e.message_id
) AS e;

-- name: dequeue_messenger_built
DELETE FROM messenger_conversation_queue AS q
USING unnest(%(page_ids)s::text[], %(sender_ids)s::text[], %(versions)s::bigint[])
      AS b(page_id, sender_id, version)
WHERE q.page_id = b.page_id AND q.sender_id = b.sender_id AND q.version = b.version;

-- name: messenger_queue_left
SELECT count(*) FROM messenger_conversation_queue WHERE page_id = ANY(%(page_ids)s::text[]);

-- name: registered_messenger_pages
-- The partitions' order: pages in the order they were registered.
SELECT page_id FROM messenger_pages ORDER BY created_at, page_id;

-- name: register_demo_pages
-- The local Graph API's demo pages (graph_sim.DEMO_PAGES); idempotent. Returns the
-- pages that were new.
INSERT INTO messenger_pages (page_id, client_code, label)
SELECT * FROM unnest(%(page_ids)s::text[], %(client_codes)s::text[], %(labels)s::text[])
ON CONFLICT (page_id) DO NOTHING
RETURNING page_id;
