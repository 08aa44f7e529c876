-- Whether a conversation's source is gone: its discovered session marked deleted, or
-- its Messenger thread deleted at the platform. reads.restore checks it: a conversation
-- the product deleted, whose source went meanwhile, stays deleted (it comes back
-- when its source does). One index probe per source table.
CREATE FUNCTION conversation_source_gone(crew_code text, session_id text)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (SELECT 1 FROM discovered_sessions AS d
               WHERE d.crew_code = conversation_source_gone.crew_code
                 AND d.session_id = conversation_source_gone.session_id
                 AND d.deleted_at IS NOT NULL)
    OR (starts_with(conversation_source_gone.crew_code, 'messenger:')
        AND EXISTS (SELECT 1 FROM messenger_conversations AS m
                    WHERE m.page_id = substr(conversation_source_gone.crew_code, 11)
                      AND m.sender_id = conversation_source_gone.session_id
                      AND m.deleted_at IS NOT NULL));
