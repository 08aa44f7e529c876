-- Hostile input: one rule for blank session ids, json messages that jsonb cannot
-- hold, and crew and client codes that are safe to print into SQL and logs.

-- The one rule for a blank key (a session id, a client or crew code, a user id),
-- for every statement that checks one: discovery's rejects, the sensor's probe,
-- the write path and the inbox. A value is blank when nothing is left once every
-- Unicode White_Space character is trimmed from both ends, i.e. it is empty or
-- made only of U+0009-U+000D, U+0020, U+0085, U+00A0, U+1680, U+2000-U+200A,
-- U+2028, U+2029, U+202F, U+205F, U+3000. An explicit list, not [[:space:]]: that
-- class follows the database's locale, and a rule that changes with the locale
-- cannot be IMMUTABLE. Python's str.isspace() is not the same set (it adds
-- U+001C-U+001F): Python code uses store.is_blank, which a test keeps equal.
CREATE FUNCTION text_is_blank(value text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN btrim(value, E'\t\n\u000b\f\r \u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000') = '';

-- Why a session id cannot be used (NULL when it can): rejects and the sensor's
-- probe of new work apply the same rule. 'session_id is empty' keeps the first
-- migration's wording (readers match on it) and now covers whitespace-only ids.
CREATE FUNCTION discovery_session_id_problem(session_id text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN session_id IS NULL THEN 'session_id is null'
    WHEN text_is_blank(session_id) THEN 'session_id is empty'
    WHEN length(session_id) > 255 THEN 'session_id is longer than 255 characters'
END;

-- Same signature and meaning as in the first migration, with the session id rule
-- above (the conversations builder calls it too).
CREATE OR REPLACE FUNCTION discovery_reject_reason(session_id text, message jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(discovery_session_id_problem(session_id), CASE
    WHEN message IS NULL THEN 'message is null'
    WHEN jsonb_typeof(message) <> 'object' THEN 'message is not a JSON object'
    WHEN jsonb_typeof(message -> 'type') IS DISTINCT FROM 'string' THEN 'message has no "type"'
END);

-- A `json` message as jsonb, or NULL when jsonb cannot hold it: json keeps its
-- text as written, so \u0000, an unpaired surrogate escape or a number beyond
-- numeric's range are stored, and a plain cast would fail the whole statement.
-- Only spliced in for json columns (two parses a row); a jsonb column is read as is.
CREATE FUNCTION discovery_json_message(message json)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN pg_input_is_valid(message::text, 'jsonb') THEN message::jsonb END;

-- discovery_reject_reason for a row whose message came through
-- discovery_json_message: `message_text` is the json's text (NULL for a jsonb
-- column), so a message that is NULL only because jsonb could not hold it is
-- rejected with PostgreSQL's own reason, not as a null message. No subquery in
-- the body: the planner inlines the function only without one.
CREATE FUNCTION discovery_reject_reason(session_id text, message jsonb, message_text text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE
    WHEN message IS NULL AND message_text IS NOT NULL
         AND discovery_session_id_problem(session_id) IS NULL
        THEN 'message cannot be stored as jsonb: '
             || (pg_input_error_info(message_text, 'jsonb')).message
             || coalesce(' (' || (pg_input_error_info(message_text, 'jsonb')).detail || ')', '')
    ELSE discovery_reject_reason(session_id, message)
END;

-- Crew and client codes end up in printed SQL (track-deletes), log lines and
-- advisory lock keys: 1 to 100 characters, none of them a control character
-- (U+0000-U+001F, U+007F-U+009F), whitespace (the list of text_is_blank)
-- or an invisible formatting character (U+200B-U+200F, U+202A-U+202E,
-- U+2060-U+2064, U+2066-U+2069, U+FEFF). Letters of any script, digits,
-- punctuation and symbols are all allowed.
CREATE FUNCTION crew_code_is_printable(code text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN length(code) BETWEEN 1 AND 100
   AND code !~ '[\u0001-\u0020\u007f-\u00a0\u1680\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u2069\u3000\ufeff]';

-- NOT VALID first: a database holding an older code that breaks the rule still
-- migrates (the code keeps working; new and updated rows must follow the rule).
ALTER TABLE crews
    ADD CONSTRAINT crews_crew_code_printable CHECK (crew_code_is_printable(crew_code)) NOT VALID,
    ADD CONSTRAINT crews_client_code_printable
        CHECK (crew_code_is_printable(client_code)) NOT VALID;
-- Each validated on its own: one bad column leaves the other's rule validated.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['crews_crew_code_printable', 'crews_client_code_printable'] LOOP
        BEGIN
            EXECUTE format('ALTER TABLE crews VALIDATE CONSTRAINT %I', name);
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING 'crews holds a code that % refuses (control, whitespace or invisible characters, or not 1 to 100 characters); it keeps working, but fix it, then run ALTER TABLE crews VALIDATE CONSTRAINT %', name, name;
        END;
    END LOOP;
END
$$;
