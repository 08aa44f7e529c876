ALTER TABLE crews DROP CONSTRAINT IF EXISTS crews_code_not_messenger;
DROP TABLE IF EXISTS messenger_conversation_queue;
DROP TABLE IF EXISTS messenger_rejects;
DROP TABLE IF EXISTS contact_interaction_events;
DROP TABLE IF EXISTS messenger_conversations;
DROP TABLE IF EXISTS messenger_sync_state;
DROP TABLE IF EXISTS messenger_pages;
