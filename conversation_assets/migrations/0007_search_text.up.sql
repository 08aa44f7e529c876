-- The text the list read's `search` matches: summary, transcript and user id as one
-- value, so that one trigram index (offered, not created: see README, "Searching
-- text") can serve the whole search. The parts are joined by U+001F, a character
-- reads.py refuses in a search, so a match never spans two parts and the result is
-- the same as matching each part on its own.
CREATE FUNCTION conversation_search_text(summary text, transcript text, user_id text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN coalesce(summary, '') || chr(31) || coalesce(transcript, '') || chr(31)
       || coalesce(user_id, '');
