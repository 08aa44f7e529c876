DROP TRIGGER crew_discovery_status_failures ON crew_discovery_status;
DROP FUNCTION count_crew_failures();
ALTER TABLE crew_discovery_status DROP COLUMN consecutive_failures;
