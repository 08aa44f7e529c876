DROP FUNCTION IF EXISTS discovery_reject_reason(text, jsonb);
DROP TABLE IF EXISTS discovery_rejects;
DROP TABLE IF EXISTS discovered_sessions;
DROP TABLE IF EXISTS crew_discovery_state;
DROP TABLE IF EXISTS crews;
