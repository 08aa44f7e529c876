"""Advisory locks: every lock the pipeline takes, by name, under one key scheme.

A lock is named ("conversation_builder", "discovery:<crew>", "migrations", ...);
its bigint key is the first 8 bytes of sha256 of "conversation_pipeline:<name>",
computed here so that every caller (and a test, or an operator reading pg_locks,
where the key shows as classid and objid, its high and low 32 bits) derives the
same key from the same name, before or after any migration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from conversation_assets.queries import query

PREFIX = "conversation_pipeline:"


def key(name: str) -> int:
    """The advisory-lock key of `name` (a signed bigint, as PostgreSQL takes it)."""
    digest = hashlib.sha256((PREFIX + name).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def session_lock(
    conn: psycopg.Connection, name: str, *, wait: bool = True, unbounded: bool = False
) -> Iterator[bool]:
    """Hold `name` for the block: a session lock, kept across transactions and
    released at the end of the block or when the connection ends (a killed run
    never leaves it behind).

    ``wait=False`` yields False at once when another session holds it (the caller
    skips); ``unbounded`` waits without the pool's statement_timeout (a backfill
    waits however long the run under way takes).
    """
    params = {"key": key(name)}
    if not wait:
        row = conn.execute(query("lock_try"), params).fetchone()
        acquired = bool(row and row[0])
    elif unbounded:
        conn.execute(query("statement_timeout_off"))
        try:
            conn.execute(query("lock_wait"), params)
        finally:
            conn.execute(query("statement_timeout_reset"))
        acquired = True
    else:
        conn.execute(query("lock_wait"), params)
        acquired = True
    try:
        yield acquired
    finally:
        if acquired:
            try:
                conn.execute(query("lock_release"), params)
            except psycopg.Error:
                pass  # the connection is gone, and the lock with it


def transaction_lock(conn: psycopg.Connection, name: str) -> None:
    """Hold `name` until the current transaction ends (the caller must be in one)."""
    conn.execute(query("lock_transaction"), {"key": key(name)})
