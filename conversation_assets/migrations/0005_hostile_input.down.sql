ALTER TABLE crews DROP CONSTRAINT IF EXISTS crews_crew_code_printable;
ALTER TABLE crews DROP CONSTRAINT IF EXISTS crews_client_code_printable;
DROP FUNCTION IF EXISTS crew_code_is_printable(text);
DROP FUNCTION IF EXISTS discovery_reject_reason(text, jsonb, text);
DROP FUNCTION IF EXISTS discovery_json_message(json);
-- The first migration's definition again, before the function it now calls goes.
CREATE OR REPLACE FUNCTION discovery_reject_reason(session_id text, message jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN session_id IS NULL THEN 'session_id is null'
    WHEN btrim(session_id) = '' THEN 'session_id is empty'
    WHEN length(session_id) > 255 THEN 'session_id is longer than 255 characters'
    WHEN message IS NULL THEN 'message is null'
    WHEN jsonb_typeof(message) <> 'object' THEN 'message is not a JSON object'
    WHEN jsonb_typeof(message -> 'type') IS DISTINCT FROM 'string' THEN 'message has no "type"'
END;
DROP FUNCTION IF EXISTS discovery_session_id_problem(text);
DROP FUNCTION IF EXISTS text_is_blank(text);
