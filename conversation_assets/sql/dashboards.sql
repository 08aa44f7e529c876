-- Reads the product's dashboards make, each within one client and served by an index.

-- name: dashboard_daily_series
-- Served by conversation_metrics' primary key (client_code, day, ...).
SELECT m.day, sum(m.conversations)::bigint, sum(m.messages)::bigint,
       sum(m.with_embeddings)::bigint, sum(m.handed_off)::bigint,
       sum(m.avg_sentiment * m.conversations) FILTER (WHERE m.avg_sentiment IS NOT NULL)
           / nullif(sum(m.conversations) FILTER (WHERE m.avg_sentiment IS NOT NULL), 0),
       sum(m.avg_duration_seconds * m.conversations)
           FILTER (WHERE m.avg_duration_seconds IS NOT NULL)
           / nullif(sum(m.conversations) FILTER (WHERE m.avg_duration_seconds IS NOT NULL), 0)
FROM conversation_metrics AS m
WHERE m.client_code = %(client_code)s AND m.day >= %(first_day)s AND m.day <= %(last_day)s
GROUP BY m.day
ORDER BY m.day;

-- name: dashboard_top_channels
-- Served by conversation_metrics' primary key (client_code, day, ...).
SELECT m.channel, sum(m.conversations)::bigint AS conversations, sum(m.messages)::bigint
FROM conversation_metrics AS m
WHERE m.client_code = %(client_code)s AND m.day >= %(first_day)s AND m.day <= %(last_day)s
GROUP BY m.channel
ORDER BY conversations DESC, m.channel
LIMIT %(limit)s;

-- name: dashboard_last_24_hours
-- Conversations started in each of the last 24 hours (zeros included). A past hour
-- whose figures are current comes from performance_stats (one primary-key row, the
-- client's count in it), so a big client costs the same as a small one; the
-- current hour, and any hour marked stale, is counted live through
-- conversations_client_created_idx (an index-only range scan of that hour).
WITH hours AS (
    SELECT generate_series(date_trunc('hour', %(now)s::timestamptz, 'UTC') - interval '23 hours',
                           date_trunc('hour', %(now)s::timestamptz, 'UTC'),
                           interval '1 hour') AS hour
),
rolled_up AS (
    SELECT p.hour, coalesce((p.conversations_by_client ->> %(client_code)s)::bigint, 0) AS n
    FROM performance_stats AS p
    WHERE p.hour >= date_trunc('hour', %(now)s::timestamptz, 'UTC') - interval '23 hours'
      AND p.hour < date_trunc('hour', %(now)s::timestamptz, 'UTC')
      AND NOT EXISTS (SELECT 1 FROM metrics_dirty_periods AS d
                      WHERE d.kind = 'hour' AND d.period_start = p.hour)
)
SELECT h.hour,
       coalesce(r.n, (SELECT count(*) FROM conversations AS c
                      WHERE c.client_code = %(client_code)s AND c.deleted_at IS NULL
                        AND c.created_at >= h.hour AND c.created_at < h.hour + interval '1 hour'
                        AND c.created_at <= %(now)s::timestamptz))
FROM hours AS h
LEFT JOIN rolled_up AS r ON r.hour = h.hour
ORDER BY h.hour;
