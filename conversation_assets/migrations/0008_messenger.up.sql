-- Messaging-platform sync: the Messenger inbox of each registered Facebook page,
-- read through the Graph API into two tables of its own, and each thread also
-- into `conversations` (through a queue filled in the sync's own transactions).
--
-- Tokens are never stored here: they come from the environment or a mounted
-- secret (settings MESSENGER_PAGE_TOKENS / MESSENGER_PAGE_TOKENS_FILE).

-- The pages to sync. `page_id` goes into API paths: restricted to safe characters.
CREATE TABLE messenger_pages (
    page_id     text PRIMARY KEY
        CONSTRAINT messenger_pages_page_id_check CHECK (page_id ~ '^[0-9A-Za-z_.-]{1,64}$'),
    client_code text NOT NULL
        CONSTRAINT messenger_pages_client_code_check
        CHECK (length(client_code) BETWEEN 1 AND 100 AND btrim(client_code) <> ''),
    label       text,
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Serves: a client's pages (tenant-scoped reads).
CREATE INDEX messenger_pages_client_code_idx ON messenger_pages (client_code);

-- A page's sync state. `watermark`: every thread last updated before it (minus the
-- overlap) is stored as the platform had it; it moves only in the transaction that
-- writes the last rows an incremental or full pass covers. No paging cursor is
-- kept: cursors go stale when items are deleted.
CREATE TABLE messenger_sync_state (
    page_id           text PRIMARY KEY REFERENCES messenger_pages (page_id) ON DELETE CASCADE,
    watermark         timestamptz,
    last_sync_at      timestamptz,
    last_full_sync_at timestamptz,
    last_mode         text,
    -- Set when the platform asked for a pause longer than a run waits: the sync
    -- sensor does not request this page before then.
    throttled_until   timestamptz,
    last_error        text,
    last_error_at     timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- One row per (page, contact): Messenger has one thread per page and user.
CREATE TABLE messenger_conversations (
    page_id          text NOT NULL,
    sender_id        text NOT NULL,  -- the contact's page-scoped id (the participant)
    client_code      text NOT NULL,
    thread_id        text NOT NULL,
    participant_name text,           -- NULL when the platform gives none
    updated_time     timestamptz NOT NULL,
    message_count    integer,
    unread_count     integer,
    snippet          text,
    can_reply        boolean,
    first_message_at timestamptz,    -- of the stored, live messages
    last_message_at  timestamptz,
    synced_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,    -- gone at the source (found by a full sync)
    PRIMARY KEY (page_id, sender_id)
);
-- Serves: lookups of a thread by its id (verification of deletes).
CREATE INDEX messenger_conversations_thread_idx ON messenger_conversations (page_id, thread_id);
-- Serves: a client's threads, most recently updated first.
CREATE INDEX messenger_conversations_client_idx
    ON messenger_conversations (client_code, updated_time DESC) WHERE deleted_at IS NULL;

-- One row per message (the platform's message id is global and stable).
CREATE TABLE contact_interaction_events (
    message_id      text PRIMARY KEY,
    page_id         text NOT NULL,
    sender_id       text NOT NULL,   -- the thread's contact (messenger_conversations key)
    client_code     text NOT NULL,
    thread_id       text NOT NULL,
    direction       text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    from_id         text,            -- who sent this message (the contact or the page)
    from_name       text,
    created_time    timestamptz NOT NULL,
    text            text,            -- NULL for stickers, attachments, shares
    attachment_kind text,            -- image, video, audio, file, sticker, share, ...
    synced_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
-- Serves: a thread's messages in time order (transcripts, first/last message times).
CREATE INDEX contact_interaction_events_thread_idx
    ON contact_interaction_events (page_id, sender_id, created_time);

-- Items the sync could not store, with the reason; a later successful store of the
-- same item clears its row. item_key: the thread or message id, or a hash.
CREATE TABLE messenger_rejects (
    page_id       text NOT NULL,
    item_kind     text NOT NULL CHECK (item_kind IN ('thread', 'message', 'response')),
    item_key      text NOT NULL,
    reason        text NOT NULL,
    excerpt       text,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (page_id, item_kind, item_key)
);

-- Threads whose conversation must be (re)built, written in the same transaction as
-- the change; the builder removes an entry only at the version it built.
CREATE TABLE messenger_conversation_queue (
    page_id   text NOT NULL,
    sender_id text NOT NULL,
    version   bigint NOT NULL DEFAULT 1,
    queued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (page_id, sender_id)
) WITH (fillfactor = 70);

-- A page's threads are filed in `conversations` under crew_code 'messenger:<page id>'
-- (session_id: the contact): no crew may take such a code. NOT VALID: an existing
-- crew is left alone (none is expected); new ones are checked.
ALTER TABLE crews ADD CONSTRAINT crews_code_not_messenger
    CHECK (crew_code NOT LIKE 'messenger:%') NOT VALID;
