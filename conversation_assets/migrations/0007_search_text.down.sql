DROP INDEX IF EXISTS conversations_search_trgm_idx;
DROP FUNCTION IF EXISTS conversation_search_text(text, text, text);
