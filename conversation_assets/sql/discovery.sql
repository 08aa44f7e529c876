-- Session discovery. Placeholders: {histories} is the crew's table
-- (psycopg.sql.Identifier), {created_at} is either h.created_at or NULL,
-- {source_row} is the source_row block below and {merge} the merge_sessions block.
-- The row rules are functions (migration 0011_row_rules): histories_row_problem
-- on a row as source_row reads it, session_time_problem on a time.

-- name: source_row
-- A histories row `h` as every statement reads it. {message} is h.message for a
-- jsonb column and j.message (json_message_join) for a json one;
-- {message_text} is the json's own text, kept for the reject's reason and
-- excerpt (NULL for jsonb: it holds nothing jsonb cannot).
h.id::bigint AS id, h.session_id::text AS session_id, {message} AS message,
{message_text} AS message_text, {created_at} AS created_at

-- name: json_message_join
-- Spliced as {message_join} after `{histories} AS h` for a json message column
-- only (nothing for jsonb): the message as jsonb, NULL where jsonb cannot hold it.
-- OFFSET 0 keeps it a subquery evaluated once a row; pulled up, the call would be
-- copied into every reference to the message (the reject reason, the counts).
CROSS JOIN LATERAL (SELECT discovery_json_message(h.message) AS message OFFSET 0) AS j

-- name: crews_with_state
SELECT c.crew_code, c.client_code, c.histories_table,
       coalesce(s.high_water_id, 0) AS high_water_id,
       coalesce(s.pending_ids, int8multirange())::text AS pending_ids,
       s.source_changes,
       s.source_filenode::bigint AS source_filenode,
       s.client_code AS state_client_code,
       s.reconciled_at,
       s.pending_xid::text AS pending_xid,
       s.pending_vxids
FROM crews AS c
LEFT JOIN crew_discovery_state AS s USING (crew_code)
WHERE c.enabled AND (%(crew_codes)s::text[] IS NULL OR c.crew_code = ANY(%(crew_codes)s::text[]))
ORDER BY c.crew_code;

-- name: histories_relid
-- The crew's table (a name already checked by histories_identifier), NULL when
-- it does not exist.
SELECT to_regclass(%(table_name)s)::oid AS relid;

-- name: source_columns
SELECT a.attname::text, t.typname::text
FROM pg_attribute AS a
JOIN pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = %(relid)s AND a.attnum > 0 AND NOT a.attisdropped;

-- name: source_features
-- Does an index lead with session_id (recomputes of chosen sessions use it), and
-- does the table carry the change-log triggers of `track-deletes`?
SELECT EXISTS (
           SELECT 1 FROM pg_index AS i
           JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
           WHERE i.indrelid = %(relid)s AND a.attname = 'session_id' AND i.indisvalid
       ) AS has_session_index,
       (SELECT count(*) FROM pg_trigger
        WHERE tgrelid = %(relid)s AND NOT tgisinternal AND tgenabled <> 'D'
          AND tgname IN ('discovery_track_deletes', 'discovery_track_updates')) = 2
           AS tracks_changes;

-- name: take_changed_sessions
-- The logged sessions visible in this snapshot; later ones stay for the next run.
WITH taken AS (
    DELETE FROM discovery_changed_sessions
    WHERE histories_relid = %(relid)s
    RETURNING session_id
)
SELECT coalesce(array_agg(DISTINCT session_id), ARRAY[]::text[]) AS session_ids FROM taken;

-- name: track_changes
-- Installed only when asked (`conversation-pipeline track-deletes --apply`).
CREATE OR REPLACE TRIGGER discovery_track_deletes
    AFTER DELETE ON {histories} REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discovery_log_changed_sessions();
CREATE OR REPLACE TRIGGER discovery_track_updates
    AFTER UPDATE ON {histories} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION discovery_log_changed_sessions();

-- name: track_changes_crew
-- Printed before a crew's triggers by `track-deletes`: the crew and its table as
-- SQL literals. Quoted, a code is data: a line break in it cannot end a comment
-- and start a statement of its own, as it could in a `-- crew ...` line.
SELECT {crew_code} AS crew_code, {histories_table} AS histories_table;

-- name: source_signature
-- Deleted or updated source rows since stats began (n_tup_del + n_tup_upd of
-- pg_stat_user_tables, read without the view), and the table's file: when
-- either moves, an incremental run recomputes the crew (inserts never need it).
SELECT pg_stat_get_tuples_deleted(%(relid)s::oid)
           + pg_stat_get_tuples_updated(%(relid)s::oid) AS changes,
       pg_relation_filenode(%(relid)s::oid::regclass)::bigint AS filenode;

-- name: ensure_state
INSERT INTO crew_discovery_state (crew_code) VALUES (%(crew_code)s)
ON CONFLICT (crew_code) DO NOTHING;

-- name: read_state
SELECT high_water_id, pending_ids::text, pending_xid::text, pending_vxids,
       source_changes, source_filenode::bigint AS source_filenode, client_code, reconciled_at
FROM crew_discovery_state WHERE crew_code = %(crew_code)s;

-- name: record_success
-- Under the crew's lock, after its last step.
WITH baseline AS (
    UPDATE crew_discovery_state
    SET source_changes = %(source_changes)s, source_filenode = %(source_filenode)s,
        client_code = %(client_code)s, reconciled_at = now()
    WHERE crew_code = %(crew_code)s AND %(settled)s
)
INSERT INTO crew_discovery_status AS s (crew_code, last_run_at, last_success_at, last_error)
VALUES (%(crew_code)s, now(), now(), NULL)
ON CONFLICT (crew_code) DO UPDATE
SET last_run_at = now(), last_success_at = now(), last_error = NULL;

-- name: record_failure
-- Possibly while another run holds the crew's lock: touches the status row only.
INSERT INTO crew_discovery_status (crew_code, last_run_at, last_error)
SELECT crew_code, now(), %(error)s FROM crews WHERE crew_code = %(crew_code)s
ON CONFLICT (crew_code) DO UPDATE
SET last_run_at = now(), last_error = EXCLUDED.last_error;

-- name: queue_sessions
-- Queue the sessions of CTE {sessions} (a session_id column) for the conversation
-- builder, in the transaction that changed them: a session already queued gets a
-- new version, so a build of the older one does not dequeue it. The one queue
-- write of merge_sessions ({queue_merged}) and recompute_sessions ({queue_gone}).
INSERT INTO conversation_queue AS q (crew_code, session_id)
SELECT %(crew_code)s, s.session_id FROM {sessions} AS s
ON CONFLICT (crew_code, session_id) DO UPDATE
SET version = q.version + 1

-- name: merge_sessions
-- Expects a CTE `src` (the columns of source_row); {queue_merged} is queue_sessions
-- on `merged`. Classifies rows by
-- histories_row_problem (migration 0011_row_rules), records rejects, aggregates
-- per session and upserts: added to the stored aggregates when %(replace)s is
-- false (incremental), replacing them when true (exact recompute). Unchanged rows
-- are not rewritten.
checked AS NOT MATERIALIZED (
    SELECT src.id, src.session_id, src.message, src.message_text, src.created_at,
           histories_row_problem(src.session_id, src.message, src.message_text,
                                 src.created_at) AS reject_reason
    FROM src
),
rejected AS (
    INSERT INTO discovery_rejects AS r (crew_code, message_id, session_id, reason, message_excerpt)
    SELECT %(crew_code)s, c.id, left(c.session_id, 300), c.reject_reason,
           left(coalesce(c.message::text, c.message_text), 500)
    FROM checked AS c
    WHERE c.reject_reason IS NOT NULL
    ON CONFLICT (crew_code, message_id) DO UPDATE
    SET session_id = EXCLUDED.session_id, reason = EXCLUDED.reason,
        message_excerpt = EXCLUDED.message_excerpt, last_seen_at = now()
    RETURNING r.message_id
),
batch AS (
    SELECT c.session_id,
           count(*)::int AS message_count,
           (count(*) FILTER (WHERE c.message ->> 'type' = 'human'))::int AS human_count,
           (count(*) FILTER (WHERE c.message ->> 'type' = 'ai'))::int AS ai_count,
           min(c.id) AS first_id,
           max(c.id) AS last_id,
           coalesce(min(c.created_at), now()) AS first_at,
           coalesce(max(c.created_at), now()) AS last_at,
           bit_xor(hashtextextended(c.id::text || ':' || c.message::text, 0)) AS checksum
    FROM checked AS c
    WHERE c.reject_reason IS NULL
    GROUP BY c.session_id
),
final AS (
    SELECT b.session_id,
           d.session_id IS NULL AS is_new,
           d.started_at AS previous_started_at,
           CASE WHEN k.merge THEN d.message_count + b.message_count ELSE b.message_count END
               AS message_count,
           CASE WHEN k.merge THEN d.human_message_count + b.human_count ELSE b.human_count END
               AS human_count,
           CASE WHEN k.merge THEN d.ai_message_count + b.ai_count ELSE b.ai_count END
               AS ai_count,
           CASE WHEN k.merge THEN least(d.first_message_id, b.first_id) ELSE b.first_id END
               AS first_id,
           CASE WHEN k.merge THEN greatest(d.last_message_id, b.last_id) ELSE b.last_id END
               AS last_id,
           CASE WHEN %(time_source)s = 'discovery'
                    THEN CASE WHEN k.live THEN d.started_at ELSE now() END
                WHEN k.merge THEN least(d.started_at, b.first_at)
                ELSE b.first_at END AS started_at,
           CASE WHEN %(time_source)s = 'discovery'
                    THEN CASE WHEN k.live AND %(replace)s THEN d.ended_at ELSE now() END
                WHEN k.merge THEN greatest(d.ended_at, b.last_at)
                ELSE b.last_at END AS ended_at,
           CASE WHEN k.merge THEN d.content_checksum # b.checksum ELSE b.checksum END
               AS checksum
    FROM batch AS b
    LEFT JOIN discovered_sessions AS d
           ON d.crew_code = %(crew_code)s AND d.session_id = b.session_id
    CROSS JOIN LATERAL (
        SELECT d.session_id IS NOT NULL AND d.deleted_at IS NULL AS live,
               d.session_id IS NOT NULL AND d.deleted_at IS NULL AND NOT %(replace)s AS merge
    ) AS k
),
merged AS (
    INSERT INTO discovered_sessions AS d (
        crew_code, session_id, client_code, message_count, human_message_count,
        ai_message_count, first_message_id, last_message_id, started_at, ended_at, time_source,
        content_checksum)
    SELECT %(crew_code)s, f.session_id, %(client_code)s, f.message_count, f.human_count,
           f.ai_count, f.first_id, f.last_id, f.started_at, f.ended_at, %(time_source)s,
           f.checksum
    FROM final AS f
    ON CONFLICT (crew_code, session_id) DO UPDATE
    SET client_code = EXCLUDED.client_code,
        message_count = EXCLUDED.message_count,
        human_message_count = EXCLUDED.human_message_count,
        ai_message_count = EXCLUDED.ai_message_count,
        first_message_id = EXCLUDED.first_message_id,
        last_message_id = EXCLUDED.last_message_id,
        started_at = EXCLUDED.started_at,
        ended_at = EXCLUDED.ended_at,
        time_source = EXCLUDED.time_source,
        content_checksum = EXCLUDED.content_checksum,
        deleted_at = NULL,
        updated_at = now()
    WHERE d.deleted_at IS NOT NULL
       OR (d.client_code, d.message_count, d.human_message_count, d.ai_message_count,
           d.first_message_id, d.last_message_id, d.started_at, d.ended_at, d.time_source,
           d.content_checksum)
          IS DISTINCT FROM
          (EXCLUDED.client_code, EXCLUDED.message_count, EXCLUDED.human_message_count,
           EXCLUDED.ai_message_count, EXCLUDED.first_message_id, EXCLUDED.last_message_id,
           EXCLUDED.started_at, EXCLUDED.ended_at, EXCLUDED.time_source,
           EXCLUDED.content_checksum)
    RETURNING d.session_id, d.started_at
),
-- The conversation builder's to-do list, written in this same transaction.
queued AS (
    {queue_merged}
),
changed AS (
    SELECT m.session_id, f.is_new, m.started_at, f.previous_started_at
    FROM merged AS m JOIN final AS f USING (session_id)
)

-- name: incremental_step
-- Reads the rows past the watermark (at most %(batch_rows)s) plus the pending
-- ids that have become visible, merges them, and moves the watermark in the
-- same statement. Ids skipped between the old and the new high water become
-- pending, stamped with this transaction's id: once the oldest running
-- transaction is newer than that, nothing can still commit into them.
WITH fresh AS (
    SELECT {source_row}
    FROM {histories} AS h {message_join}
    WHERE h.id > %(high_water)s
    ORDER BY h.id
    LIMIT %(batch_rows)s
),
late AS (
    SELECT {source_row}
    FROM unnest(%(pending)s::int8multirange) AS p(ids)
    JOIN {histories} AS h ON h.id >= lower(p.ids) AND h.id < upper(p.ids) {message_join}
),
src AS (
    SELECT * FROM fresh
    UNION ALL
    SELECT * FROM late
),
{merge},
fresh_gaps AS (
    SELECT range_agg(int8range(g.prev_id + 1, g.id)) AS ids
    FROM (
        SELECT f.id, coalesce(lag(f.id) OVER (ORDER BY f.id), %(high_water)s) AS prev_id
        FROM fresh AS f
    ) AS g
    WHERE g.id > g.prev_id + 1
),
still_pending AS (
    SELECT CASE
        WHEN discovery_pending_settled(%(pending_xid)s::xid8, %(pending_vxids)s::text[])
            THEN int8multirange()
        ELSE %(pending)s::int8multirange
             - coalesce((SELECT range_agg(int8range(l.id, l.id, '[]')) FROM late AS l),
                        int8multirange())
    END AS ids
),
state AS (
    UPDATE crew_discovery_state AS s
    SET high_water_id = coalesce((SELECT max(f.id) FROM fresh AS f), s.high_water_id),
        pending_ids = sp.ids + coalesce(fg.ids, int8multirange()),
        pending_xid = CASE
            WHEN isempty(sp.ids + coalesce(fg.ids, int8multirange())) THEN NULL
            WHEN fg.ids IS NULL THEN s.pending_xid
            ELSE pg_current_xact_id() END,
        pending_vxids = CASE
            WHEN isempty(sp.ids + coalesce(fg.ids, int8multirange())) THEN NULL
            WHEN fg.ids IS NULL THEN s.pending_vxids
            -- Everything running now, which includes whatever of the older list
            -- still runs.
            ELSE discovery_running_vxids() END,
        updated_at = now()
    FROM still_pending AS sp, fresh_gaps AS fg
    WHERE s.crew_code = %(crew_code)s
    RETURNING s.high_water_id, s.pending_ids::text AS pending_ids
)
SELECT (SELECT count(*) FROM fresh) AS fresh_rows,
       (SELECT count(*) FROM late) AS late_rows,
       (SELECT count(*) FROM rejected) AS rejected_rows,
       (SELECT count(*) FROM changed WHERE is_new) AS sessions_new,
       (SELECT count(*) FROM changed WHERE NOT is_new) AS sessions_updated,
       0::bigint AS sessions_deleted,
       (SELECT array_agg(DISTINCT t.at) FROM (
            SELECT started_at FROM changed
            UNION ALL SELECT previous_started_at FROM changed) AS t(at)
        -- A start stored before the time rule (infinity) names no day, and would
        -- not load into Python.
        WHERE t.at IS NOT NULL AND session_time_problem(t.at) IS NULL) AS touched_starts,
       state.high_water_id,
       state.pending_ids
FROM state;

-- name: recompute_sessions
-- Exact recompute of a set of sessions (all of them, those starting in a time
-- window, or a list) from the rows the watermark covers, in the same snapshot
-- as the watermark. Sessions with no rows left are soft-deleted. {source_filter}
-- and {stored_filter} are TRUE for all sessions, else a semi-join to candidates
-- (spliced, not an OR on a parameter: an IN under an OR cannot become a join, and
-- the session_id indexes would go unused). The source side compares in the
-- column's own type where its text form reads back exactly (see
-- Source.recompute_filters), else as text: any type that casts to text works.
WITH candidates AS (
    SELECT d.session_id::text AS session_id
    FROM discovered_sessions AS d
    WHERE d.crew_code = %(crew_code)s
      AND (d.session_id = ANY(%(session_ids)s::text[])
           OR (d.started_at >= %(window_start)s AND d.started_at < %(window_end)s))
    UNION
    SELECT h.session_id::text
    FROM {histories} AS h
    WHERE {created_at} >= %(window_start)s AND {created_at} < %(window_end)s
),
src AS (
    SELECT {source_row}
    FROM {histories} AS h {message_join}
    WHERE h.id <= %(high_water)s
      AND NOT (h.id::bigint <@ %(pending)s::int8multirange)
      AND {source_filter}
),
{merge},
gone AS (
    UPDATE discovered_sessions AS d
    SET deleted_at = now(), updated_at = now()
    WHERE d.crew_code = %(crew_code)s
      AND d.deleted_at IS NULL
      AND {stored_filter}
      AND NOT EXISTS (SELECT 1 FROM batch AS b WHERE b.session_id = d.session_id)
    RETURNING d.session_id, d.started_at
),
gone_queued AS (
    {queue_gone}
)
SELECT (SELECT coalesce(sum(message_count), 0) FROM batch) + (SELECT count(*) FROM rejected)
           AS fresh_rows,
       0::bigint AS late_rows,
       (SELECT count(*) FROM rejected) AS rejected_rows,
       (SELECT count(*) FROM changed WHERE is_new) AS sessions_new,
       (SELECT count(*) FROM changed WHERE NOT is_new) AS sessions_updated,
       (SELECT count(*) FROM gone) AS sessions_deleted,
       (SELECT array_agg(DISTINCT t.at) FROM (
            SELECT started_at FROM changed
            UNION ALL SELECT previous_started_at FROM changed
            UNION ALL SELECT started_at FROM gone) AS t(at)
        -- A start stored before the time rule (infinity) names no day, and would
        -- not load into Python.
        WHERE t.at IS NOT NULL AND session_time_problem(t.at) IS NULL) AS touched_starts,
       (SELECT array_agg(session_id ORDER BY session_id)
          FROM (SELECT session_id FROM changed UNION ALL SELECT session_id FROM gone) AS x)
           AS changed_sessions;

-- name: probe_crew
-- Is there anything for a run to do? One backward scan of the primary key, the
-- pending ids looked up by primary key, the table's delete/update counter, and
-- whether the pending ids can be let go.
SELECT (SELECT max(h.id)::bigint FROM {histories} AS h) AS max_id,
       (SELECT count(*) FROM unnest(%(pending)s::int8multirange) AS p(ids)
        JOIN {histories} AS h ON h.id >= lower(p.ids) AND h.id < upper(p.ids)) AS late_rows,
       pg_stat_get_tuples_deleted(%(table_name)s::regclass)
           + pg_stat_get_tuples_updated(%(table_name)s::regclass) AS source_changes,
       pg_relation_filenode(%(table_name)s::regclass)::bigint AS source_filenode,
       discovery_pending_settled(%(pending_xid)s::xid8, %(pending_vxids)s::text[])
           AS pending_expired,
       EXISTS (SELECT 1 FROM discovery_changed_sessions
               WHERE histories_relid = %(table_name)s::regclass) AS logged_changes;

-- name: new_work_starts
-- Start times of the sessions that rows past %(from_id)s (or pending ids now
-- visible) belong to, after merging: which daily partitions the next
-- incremental run will touch.
WITH new_rows AS (
    SELECT h.session_id::text AS session_id, {created_at} AS created_at
    FROM {histories} AS h WHERE h.id > %(from_id)s
    UNION ALL
    SELECT h.session_id::text, {created_at}
    FROM unnest(%(pending)s::int8multirange) AS p(ids)
    JOIN {histories} AS h ON h.id >= lower(p.ids) AND h.id < upper(p.ids)
),
sessions AS (
    SELECT n.session_id, coalesce(min(n.created_at), now()) AS first_at
    FROM new_rows AS n
    -- The rejects' rules on the id and the time (a time that is none would not
    -- even load into Python's date).
    WHERE discovery_session_id_problem(n.session_id) IS NULL
      AND session_time_problem(n.created_at) IS NULL
    GROUP BY n.session_id
)
SELECT DISTINCT t.at
FROM sessions AS s
LEFT JOIN discovered_sessions AS d ON d.crew_code = %(crew_code)s AND d.session_id = s.session_id
CROSS JOIN LATERAL (SELECT CASE
    WHEN d.session_id IS NULL OR d.deleted_at IS NOT NULL THEN s.first_at
    WHEN %(time_source)s = 'discovery' THEN d.started_at
    ELSE least(d.started_at, s.first_at) END) AS t(at)
-- As in touched_starts: a start stored before the time rule names no day.
WHERE session_time_problem(t.at) IS NULL;

-- name: sample_sessions
SELECT session_id FROM discovered_sessions
WHERE crew_code = %(crew_code)s AND deleted_at IS NULL
ORDER BY random()
LIMIT %(sample_size)s;

-- name: crew_errors
SELECT c.crew_code, s.last_error
FROM crews AS c JOIN crew_discovery_status AS s USING (crew_code)
WHERE c.enabled AND s.last_error IS NOT NULL
ORDER BY c.crew_code;
