DROP TABLE IF EXISTS enrichment_rejects;
-- 0003_conversations' definition again, before the function it now calls goes.
CREATE OR REPLACE FUNCTION conversation_reject_reason(
    client_code text, crew_code text, session_id text, user_id text, channel text,
    status text, message_count integer, sentiment real, metadata jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN client_code IS NULL OR btrim(client_code) = '' THEN 'client_code is missing or empty'
    WHEN crew_code IS NULL OR btrim(crew_code) = '' THEN 'crew_code is missing or empty'
    WHEN session_id IS NULL OR btrim(session_id) = '' THEN 'session_id is missing or empty'
    WHEN length(session_id) > 255 THEN 'session_id is longer than 255 characters'
    WHEN user_id IS NULL OR btrim(user_id) = '' THEN 'user_id is missing or empty'
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
