-- The metrics server's reads, one snapshot per scrape. Every figure comes from the
-- database, so it is the same whichever process did the work, and survives restarts.

-- name: monitoring_inbox
-- Depth, the oldest item's age and the counters, in one snapshot: a drain's commit
-- moves items from the depth to stored or rejected at once, so enqueued (their sum)
-- never goes back.
SELECT (SELECT count(*) FROM conversation_inbox) AS depth,
       (SELECT extract(epoch FROM now() - i.enqueued_at)::double precision
        FROM conversation_inbox AS i ORDER BY i.seq LIMIT 1) AS oldest_age_seconds,
       s.stored_total, s.rejected_total, s.max_pending,
       (SELECT CASE WHEN r.is_called THEN r.last_value ELSE 0 END
        FROM conversation_inbox_refused_seq AS r) AS refused_total
FROM inbox_state AS s
WHERE s.singleton;

-- name: monitoring_backlogs
-- Items waiting in each queue the pipeline keeps (exact counts: each is small when
-- the pipeline keeps up, and an index-only count when it is not).
SELECT 'inbox' AS queue, (SELECT count(*) FROM conversation_inbox) AS items
UNION ALL
SELECT 'conversation_queue', (SELECT count(*) FROM conversation_queue)
UNION ALL
SELECT 'embedding_backlog', (SELECT count(*) FROM conversations AS c
                             WHERE c.embedding_hash IS DISTINCT FROM c.content_hash
                               AND c.deleted_at IS NULL)
UNION ALL
SELECT 'enrichment_queue', (SELECT count(*) FROM enrichment_queue)
UNION ALL
SELECT 'metrics_dirty_periods', (SELECT count(*) FROM metrics_dirty_periods)
UNION ALL
SELECT 'messenger_queue', (SELECT count(*) FROM messenger_conversation_queue);

-- name: monitoring_latency
-- Each operation's histogram: bucket upper bounds (seconds; the last, NULL, is
-- +Inf) with the samples in each, and the sum.
SELECT o.operation, o.bucket, (operation_latency_bounds())[o.bucket] AS le, o.samples, o.seconds
FROM operation_latency AS o
ORDER BY o.operation, o.bucket;

-- name: monitoring_bounds
SELECT operation_latency_bounds();

-- name: monitoring_last_success
SELECT s.asset, extract(epoch FROM s.finished_at)::double precision
FROM asset_last_success AS s
ORDER BY s.asset;

-- name: monitoring_connections
-- The pipeline's connections to the database, whichever process holds them (its
-- pools identify themselves by application_name), by state; and the server's limit.
SELECT coalesce(a.state, 'unknown') AS state, count(*) AS connections
FROM pg_stat_activity AS a
WHERE a.application_name = %(application_name)s AND a.datname = current_database()
GROUP BY 1
UNION ALL
SELECT 'max_connections', current_setting('max_connections')::bigint;

-- name: monitoring_throughput
-- Conversations the drains stored in the last `seconds` (their run records).
SELECT coalesce(sum(r.items), 0)
FROM pipeline_runs AS r
WHERE r.asset = 'pushed_conversations' AND r.finished_at >= now() - make_interval(secs => %(seconds)s);
