DROP FUNCTION IF EXISTS discovery_reject_reason(text, jsonb);
DROP FUNCTION IF EXISTS discovery_pending_settled(xid8, text[]);
DROP FUNCTION IF EXISTS discovery_running_vxids();
DROP TABLE IF EXISTS discovery_rejects;
DROP TABLE IF EXISTS discovered_sessions;
DROP TABLE IF EXISTS crew_discovery_status;
DROP TABLE IF EXISTS crew_discovery_state;
DROP TABLE IF EXISTS crews;
