-- Realistic chat histories for the demo, the tests and the benchmarks
-- (conversation_assets/demo.py). Placeholders: {table} is a histories table
-- (psycopg.sql.Identifier); the generators' pieces ({u_*}: a hash as a fraction
-- in [0, 1), {h_*}: a hash) are filled by demo.py. demo_hash is a non-negative
-- bigint hash of {expression} under the caller's %(seed)s, one per {purpose};
-- demo_fraction a demo_hash as a fraction in [0, 1): its top 53 bits over 2^53.
-- Neither has a comment of its own: they are spliced many times per statement.
-- A generated row `m` has: session_id, kind (0 well-formed, 1 no "type", 2 a JSON
-- string, 3 well-formed with an empty session id), created_at, type and a hash h.

-- name: demo_create_histories_table
-- One of the real shapes: {session_type} is session_id's type, {created_at} the
-- created_at column definition (", created_at ...") or nothing.
CREATE TABLE IF NOT EXISTS {table} (
    id SERIAL PRIMARY KEY, session_id {session_type} NOT NULL, message JSONB NOT NULL
    {created_at})

-- name: demo_create_histories_index
CREATE INDEX IF NOT EXISTS {index} ON {table} ({column})

-- name: demo_hash
(hashint8extended(({expression})::bigint, %(seed)s::bigint * 16 + {purpose}) & %(mask)s::bigint)

-- name: demo_fraction
(({hash} >> 9)::float8 / 9007199254740992.0)

-- name: demo_langchain_session_id
-- A session id from the text key {key}: UUIDs for LangChain (and n8n's chat
-- trigger), as the column's own type or as text; n8n_created_at's are texts.
md5({key})::uuid

-- name: demo_n8n_session_id
md5({key})::uuid::text

-- name: demo_n8n_created_at_session_id
'sess_' || left(md5({key}), 20)

-- name: demo_message_content
-- The text of a generated message, from the phrase lists (parameters).
CASE m.type
    WHEN 'human' THEN (%(human)s::text[])[1 + m.h %% %(n_human)s]
        || CASE WHEN m.h %% 5 = 0
                THEN ' ' || (%(human)s::text[])[1 + (m.h >> 8) %% %(n_human)s]
                ELSE '' END
    WHEN 'ai' THEN (%(ai)s::text[])[1 + m.h %% %(n_ai)s]
        || CASE WHEN m.h %% 3 = 0
                THEN ' ' || (%(follow)s::text[])[1 + (m.h >> 8) %% %(n_follow)s]
                ELSE '' END
    WHEN 'tool' THEN (%(tool)s::text[])[1 + m.h %% %(n_tool)s]
    ELSE (%(system)s::text[])[1 + m.h %% %(n_system)s]
END

-- name: demo_message_kwargs
-- The user and channel ride on human messages (one user and channel a session,
-- from a client's pool of users); the AI's "transferring you" turn is a handoff.
CASE m.type
    WHEN 'human' THEN jsonb_build_object(
        'user_id', 'user_' || (abs(hashtext(m.session_id::text)) %% 97)::text,
        'channel', (ARRAY['web', 'telegram', 'whatsapp', 'messenger'])
                       [1 + (abs(hashtext(m.session_id::text)) >> 8) %% 4])
    WHEN 'ai' THEN CASE WHEN m.h %% %(n_ai)s = %(n_ai)s - 1
                        THEN '{{"handoff": true}}'::jsonb ELSE '{{}}'::jsonb END
    ELSE '{{}}'::jsonb END

-- name: demo_langchain_message
-- A well-formed LangChain message: {content} and {kwargs} are the blocks above.
jsonb_build_object('type', m.type, 'data',
       jsonb_build_object('content', {content}, 'type', m.type,
                          'additional_kwargs', {kwargs},
                          'response_metadata', '{{}}'::jsonb,
                          'name', NULL, 'id', NULL)
       || CASE m.type
            WHEN 'ai' THEN jsonb_build_object(
                'tool_calls', '[]'::jsonb, 'invalid_tool_calls', '[]'::jsonb,
                'usage_metadata', NULL, 'example', false)
            WHEN 'tool' THEN jsonb_build_object(
                'tool_call_id', 'call_' || left(md5(m.h::text), 24),
                'name', 'lookup_order', 'status', 'success', 'artifact', NULL)
            ELSE '{{}}'::jsonb END)

-- name: demo_langchain_message_no_type
jsonb_build_object('data', jsonb_build_object('content', {content}))

-- name: demo_n8n_message
-- A well-formed n8n message: {content} and {kwargs} are the blocks above.
jsonb_build_object('type', m.type, 'content', {content},
                   'additional_kwargs', {kwargs},
                   'response_metadata', '{{}}'::jsonb)
|| CASE WHEN m.type = 'ai' THEN jsonb_build_object(
       'tool_calls', '[]'::jsonb, 'invalid_tool_calls', '[]'::jsonb)
   ELSE '{{}}'::jsonb END

-- name: demo_n8n_message_no_type
jsonb_build_object('content', {content}, 'additional_kwargs', '{{}}'::jsonb)

-- name: demo_message
-- The JSONB message of a generated row `m`, by its kind.
CASE m.kind
    WHEN 1 THEN {no_type}
    WHEN 2 THEN to_jsonb({content})
    ELSE {well_formed} END

-- name: demo_generated_rows
-- %(sessions)s sessions of Pareto-distributed lengths (plus %(malformed)s bad rows),
-- starting over the %(days)s days before %(start)s, in time order. {pair} numbers
-- a message's turn (a LangChain turn's human and AI messages share one time).
SELECT g.s, g.k, g.kind, g.created_at, g.type, g.h
FROM (
    SELECT s.n::bigint AS s, k.k, 0 AS kind,
           %(start)s::timestamptz
             - make_interval(secs => greatest(s.span, s.back))
             + make_interval(secs => ({pair}) * s.step + {u_jitter} * 0.9 * s.step)
             AS created_at,
           CASE
               WHEN k.k = 0 AND s.system THEN 'system'
               WHEN (k.k - s.system::int) %% 2 = 0 THEN 'human'
               WHEN s.tools AND {h_tool} %% 5 = 0 THEN 'tool'
               ELSE 'ai' END AS type,
           {h_content} AS h
    FROM (
        SELECT l.n, l.len, l.step, l.len * l.step AS span,
               {u_back} * %(days)s * 86400.0 AS back,
               %(langchain)s AND {h_system} %% 4 = 0 AS system,
               %(langchain)s AND {h_tools} %% 3 = 0 AS tools
        FROM (
            SELECT n,
                   least(%(cap)s, floor(2.0 * power(1.0 - {u_len}, -1.0 / %(alpha)s)))::int
                       AS len,
                   15.0 + {u_step} * 150.0 AS step
            FROM generate_series(1, %(sessions)s) AS n
        ) AS l
    ) AS s
    CROSS JOIN LATERAL generate_series(0, s.len - 1) AS k(k)
    UNION ALL
    SELECT 1 + (i.i::bigint * 7919) %% greatest(%(sessions)s, 1), -i.i,
           1 + (i.i - 1) %% %(malformed_kinds)s,
           %(start)s::timestamptz - make_interval(secs => {u_bad} * %(days)s * 86400.0),
           CASE WHEN i.i %% 2 = 0 THEN 'human' ELSE 'ai' END,
           {h_bad}
    FROM generate_series(1, %(malformed)s) AS i(i)
) AS g
ORDER BY g.created_at, g.s, g.k

-- name: demo_fill_histories
-- {generated} is demo_generated_rows, {sid} the session id of its row `g`,
-- {insert_cols} and {select_cols} the shape's columns (the message: demo_message).
INSERT INTO {table} ({insert_cols})
SELECT {select_cols}
FROM (
    SELECT {sid} AS session_id,
           g.kind, g.created_at, g.type, g.h
    FROM ({generated}) AS g
) AS m

-- name: demo_recent_sessions
-- The table's last id, and the sessions of its last %(recent_rows)s rows (a
-- backward primary-key scan, whatever the table's size).
SELECT (SELECT coalesce(max(id), 0) FROM {table}),
       (SELECT coalesce(array_agg(DISTINCT r.session_id::text), '{{}}')
        FROM (SELECT session_id FROM {table} ORDER BY id DESC LIMIT %(recent_rows)s) AS r
        WHERE btrim(r.session_id::text) <> '')

-- name: demo_add_messages
-- %(count)s messages stamped now(): the first %(to_new)s in new sessions ({new_sid}),
-- the others in one of %(existing)s picked by the hash {pick} ({cast} makes the
-- text id the column's type).
INSERT INTO {table} ({insert_cols})
SELECT {select_cols}
FROM (
    SELECT CASE WHEN g.i <= %(to_new)s THEN {new_sid}
                ELSE ((%(existing)s::text[])[1 + {pick} %% %(n_existing)s]){cast}
           END AS session_id,
           0 AS kind, now() AS created_at,
           CASE WHEN (CASE WHEN g.i <= %(to_new)s
                           THEN (g.i - 1) / %(new_sessions)s ELSE g.i END) %% 2 = 0
                THEN 'human' ELSE 'ai' END AS type,
           {content_hash} AS h
    FROM generate_series(1, %(count)s) AS g(i)
    ORDER BY g.i
) AS m

-- name: demo_create_product_tables
-- The product's own tables that enrichment joins (the pipeline never creates them).
CREATE TABLE IF NOT EXISTS user_insights (
    client_code    text NOT NULL,
    user_id        text NOT NULL,
    plan           text,
    lifetime_value numeric(12, 2),
    app_sessions   integer,
    country        text,
    PRIMARY KEY (client_code, user_id));
CREATE TABLE IF NOT EXISTS linked_tickets (
    conversation_id uuid PRIMARY KEY,
    client_code     text NOT NULL,
    identifier      text NOT NULL,
    title           text,
    state           text,
    url             text);

-- name: demo_fill_user_insights
-- Insights for most demo users (one in ten has none).
INSERT INTO user_insights AS u
SELECT c.client_code, 'user_' || n,
       (ARRAY['free', 'pro', 'team'])[1 + (abs(hashtext(c.client_code || n)) %% 3)],
       round((abs(hashtext(n || c.client_code)) %% 500000) / 100.0, 2),
       abs(hashtext(c.client_code || n || 's')) %% 400,
       (ARRAY['US', 'FR', 'DE', 'BR', 'IN'])[1 + (abs(hashtext(n::text)) %% 5)]
FROM (SELECT DISTINCT client_code FROM crews) AS c,
     generate_series(0, %(users)s - 1) AS n
WHERE abs(hashtext(c.client_code || n || 'has')) %% 10 <> 0
ON CONFLICT DO NOTHING

-- name: demo_fill_linked_tickets
-- A ticket for about one conversation in twelve of the crew's table {table}.
INSERT INTO linked_tickets AS t
SELECT conversation_id(%(crew)s, s.session_id), %(client)s,
       'SUP-' || (abs(hashtext(s.session_id)) %% 90000 + 10000),
       'Follow-up for ' || %(crew)s,
       (ARRAY['Todo', 'In Progress', 'Done'])
           [1 + (abs(hashtext(s.session_id || 'st')) %% 3)],
       'https://tracker.example/SUP-'
           || (abs(hashtext(s.session_id)) %% 90000 + 10000)
FROM (SELECT DISTINCT session_id::text AS session_id FROM {table}) AS s
WHERE abs(hashtext(s.session_id || 'ticket')) %% 12 = 0
ON CONFLICT DO NOTHING

-- name: demo_crews_exist
SELECT EXISTS (SELECT 1 FROM crews);

-- name: demo_create_schema
CREATE SCHEMA IF NOT EXISTS demo;

-- name: demo_register_crew
INSERT INTO crews (crew_code, client_code, histories_table)
VALUES (%(crew_code)s, %(client_code)s, %(histories_table)s);
