-- Cheap questions the sensors and the schedule ask before launching a run, and the
-- per-partition figures of a run that covers several days (see automation.py).

-- name: conversation_queue_waiting
SELECT EXISTS (SELECT 1 FROM conversation_queue);

-- name: enrichment_queue_waiting
-- One index probe: is any conversation write (the builder, a vector, the product's
-- own UPDATE) waiting for enriched_conversations?
SELECT EXISTS (SELECT 1 FROM enrichment_queue);

-- name: crew_failure_streaks
-- Enabled crews whose last discovery run failed: how many runs in a row, and why.
SELECT c.crew_code, s.consecutive_failures, s.last_error
FROM crews AS c JOIN crew_discovery_status AS s USING (crew_code)
WHERE c.enabled AND s.last_error IS NOT NULL
ORDER BY c.crew_code;

-- name: discovered_sessions_by_day
-- Each day of a run's window: its sessions as they stand, and what the run changed
-- (rows written since %(since)s, the database's clock when the run began).
SELECT (d.started_at AT TIME ZONE 'UTC')::date AS day,
       count(*) FILTER (WHERE d.deleted_at IS NULL) AS live_sessions,
       coalesce(sum(d.message_count) FILTER (WHERE d.deleted_at IS NULL), 0) AS messages,
       count(*) FILTER (WHERE d.discovered_at >= %(since)s) AS sessions_new,
       count(*) FILTER (WHERE d.updated_at >= %(since)s AND d.discovered_at < %(since)s
                          AND (d.deleted_at IS NULL OR d.deleted_at < %(since)s))
           AS sessions_updated,
       count(*) FILTER (WHERE d.deleted_at >= %(since)s) AS sessions_deleted
FROM discovered_sessions AS d
WHERE d.started_at >= %(start)s AND d.started_at < %(end)s
GROUP BY 1;

-- name: conversations_by_day
SELECT (c.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) FILTER (WHERE c.deleted_at IS NULL) AS live_conversations,
       count(*) FILTER (WHERE c.updated_at >= %(since)s) AS written
FROM conversations AS c
WHERE c.created_at >= %(start)s AND c.created_at < %(end)s
GROUP BY 1;

-- name: enriched_by_day
SELECT (e.created_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS enriched_rows,
       count(*) FILTER (WHERE e.enriched_at >= %(since)s) AS written
FROM enriched_conversations AS e
WHERE e.created_at >= %(start)s AND e.created_at < %(end)s
GROUP BY 1;

-- name: metrics_by_day
SELECT m.day, count(*) AS rows, coalesce(sum(m.conversations), 0) AS conversations
FROM conversation_metrics AS m
WHERE m.day >= %(start)s::date AND m.day < %(end)s::date
GROUP BY 1;

-- name: performance_by_hour
-- Each hour's own figures (a refresh rewrites every hour of its window).
SELECT p.hour, p.conversations, p.messages, p.discovery_runs, p.rows_scanned,
       p.conversations_built, p.embedded, p.enriched
FROM performance_stats AS p
WHERE p.hour >= %(start)s AND p.hour < %(end)s;

-- name: metrics_day_is_current
-- The schedules' cheap check. A day's metrics are current when no mark says
-- otherwise: every change to its enriched rows marks it, in the same transaction,
-- and only a refresh of the day clears the mark.
SELECT NOT EXISTS (SELECT 1 FROM metrics_dirty_periods AS d
                   WHERE d.kind = 'day' AND d.period_start = %(start)s);

-- name: performance_hour_is_current
-- An hour's performance_stats are current when no mark says otherwise and no run of
-- the assets it counts finished in it after its row was written (no row: none at
-- all). Its own runs do not count: they would call for one more refresh each hour.
SELECT NOT EXISTS (SELECT 1 FROM metrics_dirty_periods AS d
                   WHERE d.kind = 'hour' AND d.period_start = %(start)s)
   AND NOT EXISTS (
       SELECT 1 FROM performance_runs AS r
       WHERE r.finished_at >= %(start)s AND r.finished_at < %(start)s + interval '1 hour'
         AND r.finished_at > coalesce((SELECT p.refreshed_at FROM performance_stats AS p
                                       WHERE p.hour = %(start)s), '-infinity'));
