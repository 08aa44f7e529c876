-- How many discovery runs in a row each crew failed: a crew failing its last N runs
-- (DISCOVERY_CREW_FAILURE_RUNS) fails the crews_discoverable check with ERROR
-- severity. Kept by a trigger on the status row, so every writer of the row (the
-- run's record_failure / record_success) counts the same way: an error adds one, a
-- success (last_error NULL) resets to zero.
ALTER TABLE crew_discovery_status ADD COLUMN consecutive_failures integer NOT NULL DEFAULT 0;
UPDATE crew_discovery_status SET consecutive_failures = 1 WHERE last_error IS NOT NULL;

CREATE FUNCTION count_crew_failures() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_error IS NULL THEN
        NEW.consecutive_failures := 0;
    ELSIF TG_OP = 'INSERT' THEN
        NEW.consecutive_failures := 1;
    ELSE
        NEW.consecutive_failures := OLD.consecutive_failures + 1;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER crew_discovery_status_failures
BEFORE INSERT OR UPDATE OF last_error, last_run_at ON crew_discovery_status
FOR EACH ROW EXECUTE FUNCTION count_crew_failures();
