-- The migrations' own bookkeeping (conversation_assets/migrate.py). The table is
-- created by the runner before the first migration, so these work on an empty
-- database.

-- name: create_schema_migrations
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());

-- name: schema_migrations_exists
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: applied_migration_versions
SELECT version FROM schema_migrations ORDER BY 1;

-- name: set_embedding_dimension
-- Read by the migration that creates the vector(N) column, in its transaction.
SELECT set_config('conversation_pipeline.embedding_dimension', %(dimension)s, true);

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: forget_migration
DELETE FROM schema_migrations WHERE version = %(version)s;
