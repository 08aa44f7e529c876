"""Per-client HNSW indexes: each large client's vectors in a graph of their own.

Searches always run within one client. Through the shared
``conversations_embedding_hnsw_idx`` a client holding 2% of the rows is found by
reading about fifty times k candidates and dropping the other clients'; at 1M
vectors that made the slowest searches (benchmarks/README.md). An index whose
predicate is ``client_code = '<client>' AND embedding IS NOT NULL AND deleted_at IS
NULL`` holds that client's live vectors only, and the planner uses it for that
client's searches without any change to the query.

``sync_search_indexes`` keeps one such index for each client with at least
``min_vectors`` live vectors (the largest ``max_indexes`` of them), builds them
CONCURRENTLY so writes go on, replaces a build left invalid by an interruption, and
drops the index of a client that fell under the threshold. The threshold,
``MIN_VECTORS``, is also where the read module switches to exact ranking
(``reads.EXACT_BELOW``): a client under it is ranked exactly by its search (whose
planner estimate says so), so an index of its own would only cost writes. A client
over it that has no index of its own yet searches the shared one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import psycopg
from psycopg import pq, sql

from conversation_assets import locks
from conversation_assets.queries import query

INDEX_PREFIX = "conversations_client_hnsw_"
# Only names this module gives are ever dropped, never an index made by hand.
INDEX_NAME_PATTERN = f"^{INDEX_PREFIX}[0-9a-f]{{16}}$"
# Below this many rows (the planner's estimate) a client's search is ranked exactly
# through conversations_client_vectors_idx (about 1.3 us a vector, index-only): its
# filtered HNSW scan would fetch about k / (its share of all rows) heap rows. At
# 100k vectors over 20 clients 10,000 gave the best p95 (benchmarks/README.md). At
# and over it, a client gets an HNSW index of its own.
MIN_VECTORS = 10_000
MAX_INDEXES = 100  # every index is one more the planner considers for each query
BUILD_MEMORY_MB = 1024
# pgvector builds the graph in maintenance_work_mem; one that outgrows it goes on on
# disk, several times slower (benchmarks/README.md: 27.7 min against 8.3 at 1M).
# Measured need: about the vector's bytes plus 2 KB of neighbour lists per element.
_GRAPH_BYTES_PER_ELEMENT = 2048


@dataclass
class SearchIndexReport:
    built: list[str] = field(default_factory=list)
    """Clients whose index was built by this sync."""
    dropped: list[str] = field(default_factory=list)
    """Index names dropped: clients that shrank away, and invalid leftovers."""
    failed: dict[str, str] = field(default_factory=dict)
    """Clients whose build failed, with PostgreSQL's error (the others went on)."""
    indexes: int = 0
    """Valid per-client indexes after the sync."""
    vectors_covered: int = 0
    """Live vectors that their client's own index serves."""
    vectors_total: int = 0
    index_bytes: int = 0
    """Size of the per-client indexes after the sync."""
    seconds: float = 0.0
    skipped_reason: str | None = None


class SearchIndexError(RuntimeError):
    """Some builds failed; ``report`` holds what the sync did and why each failed."""

    def __init__(self, report: SearchIndexReport) -> None:
        failures = "; ".join(f"{client!r}: {error}" for client, error in report.failed.items())
        super().__init__(f"{len(report.failed)} search index builds failed: {failures}")
        self.report = report


def index_name(client_code: str) -> str:
    """A stable name within PostgreSQL's 63 bytes whatever the client code holds."""
    digest = hashlib.md5(client_code.encode(), usedforsecurity=False).hexdigest()[:16]
    return f"{INDEX_PREFIX}{digest}"


def graph_memory_mb(vectors: int, dimension: int) -> int:
    """maintenance_work_mem that holds an HNSW build's whole graph (about 3 KB a
    256-d vector), for these builds and for a CREATE INDEX after a bulk load."""
    return -(-vectors * (max(dimension, 0) * 4 + _GRAPH_BYTES_PER_ELEMENT) // 2**20)


def _build_memory_mb(vectors: int, dimension: int, cap_mb: int, session_bytes: int) -> int:
    """Room for the whole graph, at most cap_mb, never less than the session had."""
    return max(min(graph_memory_mb(vectors, dimension), cap_mb), -(-session_bytes // 2**20))


def sync_search_indexes(
    conn: psycopg.Connection,
    *,
    min_vectors: int = MIN_VECTORS,
    max_indexes: int = MAX_INDEXES,
    build_memory_mb: int = BUILD_MEMORY_MB,
    progress: Callable[[str], None] | None = None,
) -> SearchIndexReport:
    """Build, replace and drop per-client HNSW indexes to match the clients' sizes.

    ``conn`` must be in autocommit mode with no transaction open (CREATE INDEX
    CONCURRENTLY runs outside one). A sync already under way elsewhere makes this one
    return at once with ``skipped_reason``. A build that fails does not stop the
    others: ``SearchIndexError`` is raised at the end, with the report. Interrupted
    (Ctrl-C, a stopped run), the build is cancelled and the connection closed; the
    invalid index it leaves is replaced by the next sync.
    """
    if min_vectors < 1:
        raise ValueError(f"min_vectors must be at least 1, got {min_vectors}")
    if max_indexes < 0:
        raise ValueError(f"max_indexes must be 0 or more, got {max_indexes}")
    if build_memory_mb < 64:
        raise ValueError(f"build_memory_mb must be at least 64, got {build_memory_mb}")
    if not conn.autocommit or conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError(
            "sync_search_indexes needs an autocommit connection with no transaction open"
        )
    log = progress or (lambda _message: None)
    started = time.perf_counter()
    report = SearchIndexReport()
    # One sync at a time: a second one (an overlapping run) skips instead of building
    # the same index twice.
    with locks.session_lock(conn, "search_indexes", wait=False) as locked:
        if not locked:
            report.skipped_reason = "another search index sync is under way"
            return report
        session = conn.execute(query("search_index_session_settings")).fetchone()
        assert session is not None, "the settings statement returns one row"
        try:
            _sync(conn, report, min_vectors, max_indexes, build_memory_mb, session, log)
        finally:
            if not conn.closed:  # else the session, its settings and its lock are gone
                conn.execute(
                    query("search_index_set_session"),
                    {"maintenance_work_mem": session[0], "statement_timeout": session[1]},
                )
    report.seconds = time.perf_counter() - started
    if report.failed:
        raise SearchIndexError(report)
    return report


def _existing(conn: psycopg.Connection) -> dict[str, tuple[bool, int]]:
    rows = conn.execute(query("search_index_existing"), {"pattern": INDEX_NAME_PATTERN}).fetchall()
    return {name: (valid, size) for name, valid, size in rows}


def _sync(
    conn: psycopg.Connection,
    report: SearchIndexReport,
    min_vectors: int,
    max_indexes: int,
    build_memory_mb: int,
    session: tuple[str, str, int],
    log: Callable[[str], None],
) -> None:
    session_bytes = session[2]
    # Drops wait for older transactions and builds take minutes: past the pool's
    # statement_timeout, which is made for queries.
    conn.execute(
        query("search_index_set_session"),
        {"maintenance_work_mem": session[0], "statement_timeout": "0"},
    )
    counts: list[tuple[str, int]] = conn.execute(query("search_index_clients")).fetchall()
    report.vectors_total = sum(vectors for _, vectors in counts)
    wanted = {
        index_name(client): (client, vectors)
        for client, vectors in counts[:max_indexes]
        if vectors >= min_vectors
    }
    existing = _existing(conn)
    for name, (is_valid, _) in existing.items():
        if name not in wanted or not is_valid:
            log(f"dropping {name} ({'no longer wanted' if is_valid else 'invalid, rebuilt'})")
            conn.execute(query("search_index_drop", index=sql.Identifier(name)))
            report.dropped.append(name)

    valid = {name for name, (is_valid, _) in existing.items() if is_valid}
    row = conn.execute(query("embedding_column_dimension")).fetchone()
    dimension = row[0] if row else None
    for name, (client, vectors) in wanted.items():
        if name in valid:
            continue
        memory_mb = _build_memory_mb(vectors, dimension or 0, build_memory_mb, session_bytes)
        conn.execute(
            query("search_index_set_session"),
            {"maintenance_work_mem": f"{memory_mb}MB", "statement_timeout": "0"},
        )
        log(f"building {name} for client {client!r}: {vectors:,} vectors, {memory_mb:,} MB")
        began = time.perf_counter()
        try:
            conn.execute(
                query(
                    "search_index_create",
                    index=sql.Identifier(name),
                    client_code=sql.Literal(client),
                )
            )
        except psycopg.Error as error:
            # CONCURRENTLY leaves an invalid index behind (the next sync drops it too).
            log(f"building {name} for client {client!r} failed: {error}")
            report.failed[client] = str(error).strip()
            with suppress(psycopg.Error):
                conn.execute(query("search_index_drop", index=sql.Identifier(name)))
            continue
        except BaseException:
            # Interrupted (a stopped run, Ctrl-C): stop the server's build too, and end
            # the session, which releases its lock and settings.
            if conn.info.transaction_status == pq.TransactionStatus.ACTIVE:
                with suppress(Exception):
                    conn.cancel_safe()
            conn.close()
            raise
        log(f"built {name} in {time.perf_counter() - began:.1f} s")
        report.built.append(client)

    final = _existing(conn)
    report.indexes = sum(1 for is_valid, _ in final.values() if is_valid)
    report.index_bytes = sum(size for _, size in final.values())
    report.vectors_covered = sum(
        vectors for name, (_, vectors) in wanted.items() if final.get(name, (False, 0))[0]
    )
