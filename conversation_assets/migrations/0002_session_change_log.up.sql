-- Opt-in change log for histories tables: `conversation-pipeline track-deletes`
-- puts two statement triggers on a crew's table that record the session ids whose
-- rows were deleted (n8n's clear()) or updated. The next discovery run then
-- recomputes just those sessions instead of rescanning the table. The log row
-- commits in the same transaction as the delete, so nothing is missed.
CREATE TABLE discovery_changed_sessions (
    histories_relid oid NOT NULL,
    session_id      text NOT NULL,
    logged_at       timestamptz NOT NULL DEFAULT now()
);
-- Serves: "this table's logged sessions" (probe and take).
CREATE INDEX discovery_changed_sessions_relid_idx ON discovery_changed_sessions (histories_relid);

-- SECURITY DEFINER: the product's role only needs DELETE on its own table. The
-- search_path is the one of this migration, so the log table is always found.
CREATE FUNCTION discovery_log_changed_sessions()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT
AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO discovery_changed_sessions (histories_relid, session_id)
        SELECT DISTINCT TG_RELID, changed.session_id::text
        FROM (SELECT session_id FROM old_rows UNION SELECT session_id FROM new_rows) AS changed
        WHERE changed.session_id IS NOT NULL;
    ELSE
        INSERT INTO discovery_changed_sessions (histories_relid, session_id)
        SELECT DISTINCT TG_RELID, old_rows.session_id::text
        FROM old_rows
        WHERE old_rows.session_id IS NOT NULL;
    END IF;
    RETURN NULL;
END
$$;
