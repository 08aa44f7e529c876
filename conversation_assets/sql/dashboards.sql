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
-- Conversations started in each of the last 24 hours (zeros included). Served by
-- conversations_client_created_idx: an index-only range scan of one client's day.
WITH hours AS (
    SELECT generate_series(date_trunc('hour', %(now)s::timestamptz, 'UTC') - interval '23 hours',
                           date_trunc('hour', %(now)s::timestamptz, 'UTC'),
                           interval '1 hour') AS hour
),
started AS (
    SELECT date_trunc('hour', c.created_at, 'UTC') AS hour, count(*) AS conversations
    FROM conversations AS c
    WHERE c.client_code = %(client_code)s AND c.deleted_at IS NULL
      AND c.created_at >= date_trunc('hour', %(now)s::timestamptz, 'UTC') - interval '23 hours'
      AND c.created_at <= %(now)s::timestamptz
    GROUP BY 1
)
SELECT h.hour, coalesce(s.conversations, 0)
FROM hours AS h LEFT JOIN started AS s USING (hour)
ORDER BY h.hour;
