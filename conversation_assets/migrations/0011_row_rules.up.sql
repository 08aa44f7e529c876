-- The rules for a histories row as functions, so that every statement applies one
-- definition (discovery's merge, its probe of new work, the conversations builder's
-- reads) and each rule can be run and EXPLAINed alone. Both are LANGUAGE sql with a
-- single RETURN expression and no subquery, and STABLE (a timestamptz's text
-- depends on TimeZone and DateStyle): the planner inlines them, so a statement
-- that calls them plans as if the expression were written in it, with no function
-- call per row.

-- Why a row's time (as source_row reads it: a timestamptz, a naive column read as
-- UTC) cannot be a session's time, NULL when it can. Such a row is rejected naming
-- the row, like a bad message, and its session is made of its other rows: a user
-- sees the row and why in discovery_rejects, and a fix to it (an UPDATE) brings it
-- back. Not "time unknown" instead: a session whose only times are unknown would
-- start at now() on every recompute, so it would change at each one and never match
-- its recount. Every reader of a session holds its times: PostgreSQL subtracts them
-- (duration_seconds: infinity minus infinity, or a year-294276 end, is no interval)
-- and Python loads them (years 1 to 9999 only). A day is kept clear of either end so
-- that the time still fits in any session TimeZone. A NULL time (a nullable column)
-- is no problem: the session's times come from its other rows, else from discovery.
-- Also applied to stored session starts (touched_starts, new_work_starts): a start
-- stored before this rule (infinity) names no day.
CREATE FUNCTION session_time_problem(created_at timestamptz)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN NOT (created_at >= '0001-01-02 00:00:00+00'::timestamptz
                      AND created_at < '9999-12-31 00:00:00+00'::timestamptz)
    THEN 'created_at ' || created_at::text
         || ' is no session time (it must lie between 0001-01-02 and 9999-12-31 UTC)'
END;

-- Why a histories row is left out of its session, NULL when it is used: the one
-- rule discovery (merge_sessions) and the conversations builder (the
-- session_messages blocks) apply, so they count and read the same rows. The
-- arguments are the row as source_row reads it: the session id as text, the
-- message as jsonb (NULL where a json column holds what jsonb cannot), the json's
-- own text (NULL for a jsonb column) and the row's time.
CREATE FUNCTION histories_row_problem(
    session_id text, message jsonb, message_text text, created_at timestamptz)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(discovery_reject_reason(session_id, message, message_text),
                session_time_problem(created_at));
