-- CASCADE: the triggers that track-deletes installed on histories tables go too.
DROP FUNCTION IF EXISTS discovery_log_changed_sessions() CASCADE;
DROP TABLE IF EXISTS discovery_changed_sessions;
