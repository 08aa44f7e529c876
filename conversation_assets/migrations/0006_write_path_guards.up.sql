-- Write path guards: one whitespace rule (text_is_blank, 0005) for the keys of a
-- stored conversation, and the rejects of the enrichment refresh (a conversation
-- it cannot enrich is set aside with its reason instead of stopping the queue).

-- Same signature and reasons as in 0003_conversations, with the rule above for
-- every key (a session id of "\n" or "\t" was stored while "   " was refused).
CREATE OR REPLACE FUNCTION conversation_reject_reason(
    client_code text, crew_code text, session_id text, user_id text, channel text,
    status text, message_count integer, sentiment real, metadata jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN client_code IS NULL OR text_is_blank(client_code)
        THEN 'client_code is missing or empty'
    WHEN crew_code IS NULL OR text_is_blank(crew_code)
        THEN 'crew_code is missing or empty'
    WHEN session_id IS NULL OR text_is_blank(session_id)
        THEN 'session_id is missing or empty'
    WHEN length(session_id) > 255 THEN 'session_id is longer than 255 characters'
    WHEN user_id IS NULL OR text_is_blank(user_id) THEN 'user_id is missing or empty'
    WHEN length(channel) > 50 THEN 'channel is longer than 50 characters'
    WHEN status IS NULL OR status NOT IN ('active', 'closed', 'handoff_complete', 'archived')
        THEN 'status ' || coalesce(quote_literal(status), 'NULL')
             || ' is not one of active, closed, handoff_complete, archived'
    WHEN message_count IS NULL OR message_count < 0
        THEN 'message_count is missing or negative'
    WHEN sentiment < -1 OR sentiment > 1 THEN 'sentiment is outside [-1, 1]'
    WHEN jsonb_typeof(metadata) IS DISTINCT FROM 'object'
        THEN 'metadata is not a JSON object (' || coalesce(jsonb_typeof(metadata), 'null') || ')'
END;

-- Conversations the enrichment refresh could not enrich (a value its statement or
-- its client refuses), with the reason. Their queue entry is settled; a change to
-- the conversation queues it again, and enriching it then clears the row.
CREATE TABLE enrichment_rejects (
    conversation_id uuid PRIMARY KEY,
    client_code     text,
    reason          text NOT NULL,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now()
);
