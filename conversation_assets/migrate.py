"""Versioned schema migrations: ``migrations/NNNN_name.up.sql`` and ``.down.sql``.

Applied in order, each in its own transaction with its version recorded, under an
advisory lock so that concurrent starters never apply one twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from conversation_assets import locks
from conversation_assets.queries import query

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_FILE = re.compile(r"^(\d{4})_(\w+)\.up\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    up_sql: str
    down_sql: str


def load_migrations() -> list[Migration]:
    migrations = []
    for path in sorted(MIGRATIONS_DIR.glob("*.up.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file {path.name} is not NNNN_name.up.sql")
        down = path.with_name(path.name.replace(".up.sql", ".down.sql"))
        if not down.exists():
            raise ValueError(f"migration {path.name} has no {down.name}")
        migrations.append(
            Migration(int(match[1]), match[2], path.read_text("utf-8"), down.read_text("utf-8"))
        )
    return migrations


def _ensure_table(conn: psycopg.Connection) -> None:
    conn.execute(query("create_schema_migrations"))


def applied_versions(conn: psycopg.Connection) -> list[int]:
    exists = conn.execute(query("schema_migrations_exists")).fetchone()
    if not exists or not exists[0]:
        return []
    return [row[0] for row in conn.execute(query("applied_migration_versions"))]


def upgrade(
    conn: psycopg.Connection,
    target: int | None = None,
    embedding_dimension: int | Callable[[], int] | None = None,
) -> list[Migration]:
    """Apply every migration up to ``target`` (all by default); return those applied.

    ``embedding_dimension`` sizes the ``vector(N)`` column when the migration that
    creates it runs (256, the bundled local model, when None). A callable is only
    called then, so an HTTP model is not probed when the schema is up to date.
    """
    applied: list[Migration] = []
    with conn.transaction():
        locks.transaction_lock(conn, "migrations")
        _ensure_table(conn)
        done = set(applied_versions(conn))
        for migration in load_migrations():
            if migration.version in done or (target is not None and migration.version > target):
                continue
            sized = "conversation_pipeline.embedding_dimension" in migration.up_sql
            if sized and embedding_dimension is not None:
                dimension = (
                    embedding_dimension() if callable(embedding_dimension) else embedding_dimension
                )
                conn.execute(query("set_embedding_dimension"), {"dimension": str(int(dimension))})
            with conn.transaction():
                conn.execute(sql.SQL(migration.up_sql))  # type: ignore[arg-type]
                conn.execute(
                    query("record_migration"),
                    {"version": migration.version, "name": migration.name},
                )
            applied.append(migration)
    return applied


def downgrade(conn: psycopg.Connection, target: int) -> list[Migration]:
    """Reverse every applied migration newer than ``target``, newest first."""
    reverted: list[Migration] = []
    with conn.transaction():
        locks.transaction_lock(conn, "migrations")
        done = set(applied_versions(conn))
        for migration in reversed(load_migrations()):
            if migration.version not in done or migration.version <= target:
                continue
            with conn.transaction():
                conn.execute(sql.SQL(migration.down_sql))  # type: ignore[arg-type]
                conn.execute(query("forget_migration"), {"version": migration.version})
            reverted.append(migration)
    return reverted
