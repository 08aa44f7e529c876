DROP FUNCTION IF EXISTS histories_row_problem(text, jsonb, text, timestamptz);
DROP FUNCTION IF EXISTS session_time_problem(timestamptz);
