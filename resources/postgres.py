"""The PostgreSQL resource: one psycopg_pool per process, pgvector on every connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
import psycopg
from pgvector.psycopg import register_vector
from psycopg import IsolationLevel
from psycopg_pool import ConnectionPool
from pydantic import Field, PrivateAttr


def _configure(conn: psycopg.Connection) -> None:
    """Autocommit by default: every transaction in this project is an explicit block."""
    conn.autocommit = True
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        # The `vector` extension is created by the first migration; a connection
        # opened before it (the migration's own) works without the adapter.
        pass


class PostgresResource(dg.ConfigurableResource):
    """A pooled connection to the database that holds histories and outputs.

    Pool settings: a warm minimum, a bounded maximum, recycled
    connections, and server-side timeouts so that no query or forgotten
    transaction can hold the product's database hostage.
    """

    database_url: str = Field(description="libpq URL of the database (DATABASE_URL).")
    pool_min_size: int = Field(default=1, description="Connections kept open.")
    pool_max_size: int = Field(default=10, description="Most connections opened.")
    pool_max_lifetime_seconds: float = Field(default=3600.0, description="Recycle age.")
    statement_timeout_ms: int = Field(default=300_000, description="statement_timeout.")
    idle_in_transaction_timeout_ms: int = Field(
        default=60_000, description="idle_in_transaction_session_timeout."
    )
    application_name: str = Field(default="conversation-pipeline")

    _pool: ConnectionPool | None = PrivateAttr(default=None)

    def _open_pool(self) -> ConnectionPool:
        options = (
            f"-c statement_timeout={int(self.statement_timeout_ms)} "
            f"-c idle_in_transaction_session_timeout={int(self.idle_in_transaction_timeout_ms)}"
        )
        pool = ConnectionPool(
            self.database_url,
            min_size=self.pool_min_size,
            max_size=max(self.pool_max_size, self.pool_min_size),
            max_lifetime=self.pool_max_lifetime_seconds,
            kwargs={
                "application_name": self.application_name,
                "options": options,
                # Always plan with the actual parameters: the discovery statements
                # fold flags like all_sessions into their plan.
                "prepare_threshold": None,
            },
            configure=_configure,
            name=self.application_name,
            open=False,
        )
        pool.open(wait=True, timeout=30)
        return pool

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            self._pool = self._open_pool()
        return self._pool

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._pool = self._open_pool()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            yield conn

    def pool_stats(self) -> dict[str, Any]:
        """Pool figures (size, idle, waiting, errors) for run metadata and dashboards."""
        stats = self.pool.get_stats()
        return {key: stats[key] for key in sorted(stats)}


@contextmanager
def repeatable_read(conn: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """One snapshot for a whole block, so reads and the watermark they move agree."""
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            yield conn
    finally:
        conn.isolation_level = None
