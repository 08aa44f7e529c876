DROP FUNCTION IF EXISTS conversation_source_gone(text, text);
