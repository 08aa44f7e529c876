-- Administration of the embedded server (conversation_assets/embedded.py).
-- {database}, {template} and {role} are psycopg.sql.Identifier, {password} a
-- psycopg.sql.Literal. set_superuser_password is run through `postgres --single`
-- (no connection yet, hence a literal password), where a line ends a command: it
-- stays one line, with no comment of its own.

-- name: set_superuser_password
SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD {password};

-- name: database_exists
SELECT 1 FROM pg_database WHERE datname = %(name)s;

-- name: create_database
-- {template} is template1 (what CREATE DATABASE copies by default) unless given.
CREATE DATABASE {database} TEMPLATE {template};

-- name: drop_database
DROP DATABASE IF EXISTS {database} WITH (FORCE);
