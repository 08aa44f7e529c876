ALTER TABLE crews DROP CONSTRAINT IF EXISTS crews_code_not_reserved;

-- The function as 0009_inbox created it.
CREATE OR REPLACE FUNCTION queue_conversation_storage(
    user_id         text,
    channel         text,
    transcript      text,
    summary         text DEFAULT NULL,
    metadata        jsonb DEFAULT '{}'::jsonb,
    client_code     text DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    client_latency_ms real DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    v_channel  text := coalesce(queue_conversation_storage.channel, 'web');
    v_metadata jsonb := coalesce(queue_conversation_storage.metadata, '{}'::jsonb);
    v_session  text;
    v_id       uuid;
    v_state    inbox_state;
    v_pending  bigint;
    v_problem  text;
    v_field    text;
BEGIN
    SELECT f, p INTO v_field, v_problem FROM (VALUES
        (1, 'client_code', CASE
            WHEN queue_conversation_storage.client_code IS NULL
              OR text_is_blank(queue_conversation_storage.client_code)
                THEN 'client_code is missing or empty'
            WHEN NOT crew_code_is_printable(queue_conversation_storage.client_code)
                THEN 'client_code must be 1 to 100 characters without control, '
                     'whitespace or invisible characters' END),
        (2, 'user_id', CASE
            WHEN queue_conversation_storage.user_id IS NULL
              OR text_is_blank(queue_conversation_storage.user_id)
                THEN 'user_id is missing or empty'
            WHEN length(queue_conversation_storage.user_id) > 255
                THEN 'user_id is longer than 255 characters' END),
        (3, 'channel', CASE
            WHEN text_is_blank(v_channel) THEN 'channel is empty'
            WHEN length(v_channel) > 50 THEN 'channel is longer than 50 characters' END),
        (4, 'transcript', CASE
            WHEN queue_conversation_storage.transcript IS NULL
              OR text_is_blank(queue_conversation_storage.transcript)
                THEN 'transcript is empty'
            WHEN length(queue_conversation_storage.transcript) > 1000000
                THEN 'transcript is longer than 1,000,000 characters ('
                     || length(queue_conversation_storage.transcript) || ')' END),
        (5, 'summary', CASE
            WHEN length(queue_conversation_storage.summary) > 10000
                THEN 'summary is longer than 10,000 characters' END),
        (6, 'metadata', CASE
            WHEN jsonb_typeof(v_metadata) <> 'object'
                THEN 'metadata is not a JSON object (' || jsonb_typeof(v_metadata) || ')'
            WHEN octet_length(v_metadata::text) > 65536
                THEN 'metadata is larger than 64 KB as JSON' END),
        (7, 'idempotency_key', CASE
            WHEN text_is_blank(queue_conversation_storage.idempotency_key)
                THEN 'idempotency_key is empty (pass NULL for none)'
            WHEN length(queue_conversation_storage.idempotency_key) > 255
                THEN 'idempotency_key is longer than 255 characters' END)
    ) AS checks (n, f, p)
    WHERE p IS NOT NULL
    ORDER BY n
    LIMIT 1;
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'queue_conversation_storage: %', v_problem
            USING ERRCODE = 'invalid_parameter_value', COLUMN = v_field;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM crews AS c
                   WHERE c.client_code = queue_conversation_storage.client_code)
       AND NOT EXISTS (SELECT 1 FROM inbox_clients AS k
                       WHERE k.client_code = queue_conversation_storage.client_code) THEN
        RAISE EXCEPTION 'queue_conversation_storage: client_code % is not a known client',
                quote_literal(queue_conversation_storage.client_code)
            USING ERRCODE = 'invalid_parameter_value', COLUMN = 'client_code',
                  HINT = 'register it: INSERT INTO inbox_clients (client_code) VALUES (...), '
                         'or give it a crew in crews';
    END IF;

    v_session := coalesce(queue_conversation_storage.idempotency_key, gen_random_uuid()::text);
    v_id := conversation_id('inbox:' || queue_conversation_storage.client_code, v_session);
    IF queue_conversation_storage.idempotency_key IS NOT NULL
       AND (EXISTS (SELECT 1 FROM conversation_inbox AS i WHERE i.id = v_id)
            OR EXISTS (SELECT 1 FROM conversations AS c WHERE c.id = v_id)) THEN
        RETURN v_id;  -- handed off before: stored once
    END IF;

    SELECT * INTO v_state FROM inbox_state WHERE singleton;
    v_pending := v_state.pending_base + conversation_inbox_last_seq() - v_state.seq_base;
    IF v_pending >= v_state.max_pending THEN
        PERFORM nextval('conversation_inbox_refused_seq');
        RAISE EXCEPTION 'queue_conversation_storage: the inbox holds about % conversations, '
                        'its bound is % (INBOX_MAX_PENDING): try again later', v_pending,
                        v_state.max_pending
            USING ERRCODE = 'CPQ01',
                  HINT = 'the drain (inbox_drain_job) is behind or stopped';
    END IF;

    INSERT INTO conversation_inbox AS i (
        id, client_code, session_id, user_id, channel, full_conversation, summary, metadata,
        client_latency_ms)
    VALUES (v_id, queue_conversation_storage.client_code, v_session,
            queue_conversation_storage.user_id, v_channel, queue_conversation_storage.transcript,
            queue_conversation_storage.summary, v_metadata,
            queue_conversation_storage.client_latency_ms)
    ON CONFLICT (id) DO NOTHING;  -- the same key at the same instant: stored once
    RETURN v_id;
END
$$;
