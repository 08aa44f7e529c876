-- `page_id` goes into API paths as a segment: "." and ".." would be read as dot
-- segments (the current or the parent path), and every call of the page would go to
-- another node. NOT VALID: a row already there is left to its owner.
ALTER TABLE messenger_pages ADD CONSTRAINT messenger_pages_page_id_not_dot_segment
    CHECK (page_id !~ '^\.\.?$') NOT VALID;
