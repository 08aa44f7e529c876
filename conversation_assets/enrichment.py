"""Enriched conversations, daily metrics and hourly performance figures.

Every refresh is set-based SQL over only what changed, row by row, so readers never
wait and never see a half-built table (a materialized view refreshed whole rebuilds
everything under a lock, and at scale brings the database down):

- ``enrich``: conversations queued by the triggers on ``conversations`` (any
  writer), plus those whose user insights or ticket changed (found by comparing
  row hashes with the last refresh), are upserted into ``enriched_conversations``
  in batches; rows whose conversation is gone or soft-deleted are removed.
- ``refresh_metrics`` / ``refresh_performance``: one transaction replaces exactly
  the partition's days or hours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from conversation_assets import locks
from conversation_assets.queries import query, text

# The product's tables and the columns the refresh needs of each.
PRODUCT_TABLES = {
    "user_insights": ("client_code", "user_id"),
    "linked_tickets": ("conversation_id", "client_code", "identifier", "title", "state", "url"),
}
EXCERPT_CHARS = 600  # the end of the transcript kept as the latest messages
# A batch is split over several connections only when each part gets this many
# conversations: below that, a second transaction costs more than it saves.
MIN_IDS_PER_WORKER = 1_000
DIFF_WORK_MEM = "64MB"  # hash tables of the product-table diff and of a metrics day
# Errors that come from a row of the batch (a value PostgreSQL or psycopg refuses:
# an infinite timestamp, a stack too deep), not from the database being away: the
# batch is halved until the conversation is found, which is then rejected.
_ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.ProgramLimitExceeded)

Window = tuple[datetime, datetime]
# What a part of a batch did: written, removed, days touched, and the conversations
# it refused (id, queue version or None, reason).
_Result = tuple[int, int, list[date], list[tuple[Any, int | None, str]]]


@dataclass
class EnrichReport:
    mode: str
    queued_for_insights: int = 0
    queued_for_tickets: int = 0
    conversations: int = 0  # looked at
    written: int = 0  # inserted or changed
    removed: int = 0  # gone or soft-deleted
    batches: int = 0
    queue_left: int = 0
    missing_tables: list[str] = field(default_factory=list)
    # Conversations that could not be enriched (id, reason): in enrichment_rejects,
    # their queue entries settled; the rest of their batch was enriched.
    rejects: list[tuple[Any, str]] = field(default_factory=list)
    skipped_reason: str | None = None
    touched_days: set[date] = field(default_factory=set)
    seconds: float = 0.0


class ProductTableError(ValueError):
    """A product table the enrichment joins lacks a column it needs."""


def product_tables(conn: psycopg.Connection) -> tuple[dict[str, sql.Composable], list[str]]:
    """The product's tables to join, or empty relations of their shape (and which
    are missing). A table without a needed column is an error naming the columns."""
    parts: dict[str, sql.Composable] = {}
    missing: list[str] = []
    for name, needed in PRODUCT_TABLES.items():
        columns = {row[0] for row in conn.execute(query("product_table_columns"), {"table": name})}
        if not columns:
            parts[name] = sql.SQL(text(f"empty_{name}"))  # type: ignore[arg-type]
            missing.append(name)
            continue
        lacking = [column for column in needed if column not in columns]
        if lacking:
            raise ProductTableError(
                f"table {name} has no column {', '.join(lacking)}: enrichment needs "
                f"{', '.join(needed)} (see README, 'The product's tables it joins')"
            )
        parts[name] = sql.Identifier(name)
    return parts, missing


@dataclass
class _Batches:
    """How batches run: the run's own connection, plus (for a large batch) more from
    the pool, so that a batch can use more than one core."""

    conn: psycopg.Connection
    pool: ConnectionPool
    parts: dict[str, sql.Composable]
    excerpt_chars: int
    workers: int
    helpers: ThreadPoolExecutor | None = None

    def run(self, ids: list[Any], versions: list[int] | None, report: EnrichReport) -> None:
        """One batch: its ids split over up to ``workers`` connections, one transaction
        each. The parts never wait on each other's rows (their ids are disjoint); the
        stale-period marks they share are taken in one order, so at worst one waits
        for the other's commit. Dequeued (when ``versions`` is given) in the same
        transaction as the rows they were enriched into."""
        count = min(self.workers, max(1, len(ids) // MIN_IDS_PER_WORKER))
        size = -(-len(ids) // count)
        chunks = [
            (ids[start : start + size], versions[start : start + size] if versions else None)
            for start in range(0, len(ids), size)
        ]
        pending: list[Future[_Result]] = []
        if len(chunks) > 1:
            if self.helpers is None:
                self.helpers = ThreadPoolExecutor(
                    max_workers=self.workers - 1, thread_name_prefix="enrich"
                )
            pending = [self.helpers.submit(self._on_pooled, *chunk) for chunk in chunks[1:]]
        results = []
        failure: BaseException | None = None
        try:
            results.append(self._on_apart(self.conn, *chunks[0]))
        except BaseException as error:  # the other parts still finish (they may commit)
            failure = error
        for future in pending:
            try:
                results.append(future.result())
            except BaseException as error:
                failure = failure or error
        rejected: list[tuple[Any, int | None, str]] = []
        for written, removed, days, refused in results:
            report.written += written
            report.removed += removed
            report.touched_days.update(days)
            rejected.extend(refused)
        if rejected:
            self._reject(rejected)
            report.rejects.extend((key, reason) for key, _, reason in rejected)
        if failure is not None:
            raise failure
        report.conversations += len(ids)
        report.batches += 1

    def _on_pooled(self, ids: list[Any], versions: list[int] | None) -> _Result:
        with self.pool.connection() as conn:
            conn.autocommit = True
            return self._on_apart(conn, ids, versions)

    def _on_apart(
        self, conn: psycopg.Connection, ids: list[Any], versions: list[int] | None
    ) -> _Result:
        """_on, except that a row error is narrowed down by halving the ids: the
        conversation it comes from is returned as refused (id, version, reason) and
        the others are enriched. More statements only when a batch fails."""
        try:
            return (*self._on(conn, ids, versions), [])
        except _ROW_ERRORS as error:
            if len(ids) == 1:
                reason = f"{type(error).__name__}: {str(error).strip()}"
                return 0, 0, [], [(ids[0], versions[0] if versions else None, reason[:2000])]
        half = len(ids) // 2
        first = self._on_apart(conn, ids[:half], versions[:half] if versions else None)
        second = self._on_apart(conn, ids[half:], versions[half:] if versions else None)
        return (
            first[0] + second[0],
            first[1] + second[1],
            first[2] + second[2],
            first[3] + second[3],
        )

    def _reject(self, rejected: list[tuple[Any, int | None, str]]) -> None:
        """Record the refused conversations and settle their queue entries (at the
        version tried: a change since queues them again), in one transaction."""
        ids = [key for key, _, _ in rejected]
        with self.conn.transaction():
            self.conn.execute(query("lock_enriched_entries"), {"ids": ids})
            self.conn.execute(
                query("record_enrichment_rejects"),
                {
                    "ids": ids,
                    "versions": [version for _, version, _ in rejected],
                    "reasons": [reason for _, _, reason in rejected],
                },
            )

    def _on(
        self, conn: psycopg.Connection, ids: list[Any], versions: list[int] | None
    ) -> tuple[int, int, list[date]]:
        with conn.transaction():
            row = conn.execute(
                query("enrich_conversations", **self.parts),
                {"ids": ids, "excerpt_chars": self.excerpt_chars},
            ).fetchone()
            assert row is not None
            if versions is not None:
                conn.execute(query("lock_enriched_entries"), {"ids": ids})
                conn.execute(query("dequeue_enriched"), {"ids": ids, "versions": versions})
        return row[0], row[1], row[2]

    def close(self) -> None:
        if self.helpers is not None:
            self.helpers.shutdown(wait=True)


def enrich(
    pool: ConnectionPool,
    *,
    mode: Literal["incremental", "full"],
    window: Window | None = None,
    batch_size: int = 5_000,
    max_batches: int | None = None,
    excerpt_chars: int = EXCERPT_CHARS,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> EnrichReport:
    """Bring ``enriched_conversations`` up to date.

    incremental: every conversation queued before the run began, oldest first
    (what is queued later waits for the next run, so a run always ends); skipped
    when another refresh is under way (it takes the queue). full: every
    conversation filed under ``window`` now or before, compared row by row
    (unchanged rows are not rewritten); waits for a refresh under way.

    A batch of at least ``2 * MIN_IDS_PER_WORKER`` conversations is split over up
    to ``workers`` connections (the pool must be able to lend them), one
    transaction each.
    """
    if mode == "full" and window is None:
        raise ValueError("a full refresh needs the partition window")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    report = EnrichReport(mode=mode)
    with pool.connection() as conn:
        conn.autocommit = True
        # One refresh at a time: an incremental run skips while one is under way, a
        # backfill waits however long it takes.
        incremental = mode == "incremental"
        with locks.session_lock(conn, "enrichment", wait=not incremental, unbounded=True) as locked:
            if not locked:
                report.skipped_reason = "another enrichment refresh is under way"
                report.seconds = time.perf_counter() - started
                return report
            parts, report.missing_tables = product_tables(conn)
            with conn.transaction():
                conn.execute(query("enrichment_diff_settings"), {"work_mem": DIFF_WORK_MEM})
                report.queued_for_insights = _queue_changed_rows(
                    conn, parts, "user_insights", force=mode == "full"
                )
                report.queued_for_tickets = _queue_changed_rows(
                    conn, parts, "linked_tickets", force=mode == "full"
                )
            # A pool smaller than `workers` lends what it has.
            lendable = min(workers, pool.max_size)
            batches = _Batches(conn, pool, parts, excerpt_chars, lendable)
            try:
                if mode == "incremental":
                    _drain_queue(conn, batches, report, batch_size, max_batches, say)
                else:
                    assert window is not None
                    _rebuild_window(conn, batches, report, window, batch_size, say)
            finally:
                batches.close()
            left = conn.execute(query("enrichment_queue_left")).fetchone()
            report.queue_left = left[0] if left else 0
    report.seconds = time.perf_counter() - started
    return report


def _queue_changed_rows(
    conn: psycopg.Connection, parts: dict[str, sql.Composable], source: str, *, force: bool
) -> int:
    """Queue the conversations whose row in a product table changed; how many.

    The table is read whole only when its write counters (or its file) moved since
    the last look: PostgreSQL's statistics lag by up to a few seconds, so a change
    they do not show yet is found by a later refresh, never lost. With
    ``track_counts`` off, or in a full refresh, the table is always read.
    """
    row = conn.execute(query("product_table_fingerprint"), {"source": source}).fetchone()
    fingerprint, seen = (row[0], row[1]) if row else (None, None)
    if not force and fingerprint is not None and fingerprint == seen:
        return 0
    statement = query(
        "queue_changed_product_rows",
        rows=query(f"{source}_rows", **parts),
        conversations_of=query(f"{source}_conversations"),
    )
    found = conn.execute(statement, {"source": source}).fetchone()
    conn.execute(
        query("save_product_table_fingerprint"), {"source": source, "fingerprint": fingerprint}
    )
    return found[1] if found else 0


def _drain_queue(
    conn: psycopg.Connection,
    batches: _Batches,
    report: EnrichReport,
    batch_size: int,
    max_batches: int | None,
    say: Callable[[str], None],
) -> None:
    began = conn.execute(query("statement_start")).fetchone()
    assert began is not None
    cursor: tuple[datetime, Any] | None = None
    while max_batches is None or report.batches < max_batches:
        entries = conn.execute(
            query("peek_enrichment_queue"),
            {
                "until": began[0],
                "after": cursor[0] if cursor else None,
                "after_id": cursor[1] if cursor else None,
                "limit": batch_size,
            },
        ).fetchall()
        if not entries:
            return
        cursor = (entries[-1][2], entries[-1][0])
        batches.run([e[0] for e in entries], [e[1] for e in entries], report)
        say(
            f"batch {report.batches}: {len(entries):,} queued conversations, "
            f"{report.written:,} written and {report.removed:,} removed so far"
        )


def _rebuild_window(
    conn: psycopg.Connection,
    batches: _Batches,
    report: EnrichReport,
    window: Window,
    batch_size: int,
    say: Callable[[str], None],
) -> None:
    ids = [
        row[0]
        for row in conn.execute(
            query("window_conversation_ids"),
            {"window_start": window[0], "window_end": window[1]},
        )
    ]
    say(f"{len(ids):,} conversations filed under {window[0]:%Y-%m-%d}..{window[1]:%Y-%m-%d}")
    for start in range(0, len(ids), batch_size):
        batches.run(ids[start : start + batch_size], None, report)


@dataclass
class ReplaceReport:
    rows: int
    seconds: float


def check_window(window: Window, unit: Literal["day", "hour"]) -> None:
    """A window of whole UTC days or hours, start before end (else a refresh would
    replace a period with part of its figures)."""
    start, end = window
    for edge in (start, end):
        if edge.tzinfo is None or edge.utcoffset() != timedelta(0):
            raise ValueError(f"window edges must be UTC datetimes, got {edge!r}")
        if edge.minute or edge.second or edge.microsecond or (unit == "day" and edge.hour):
            raise ValueError(f"window edges must fall on a UTC {unit} boundary, got {edge}")
    if end <= start:
        raise ValueError(f"window end {end} is not after its start {start}")


def _replace(
    pool: ConnectionPool,
    kind: Literal["day", "hour"],
    delete: str,
    insert: str,
    params: dict[str, Any],
) -> ReplaceReport:
    """Clear the stale marks, delete then insert the window's rows, in one
    transaction: readers see the old rows until the commit, then the new ones. Two
    refreshes of the same kind take turns (the second would not see the first's
    rows to delete)."""
    started = time.perf_counter()
    with pool.connection() as conn, conn.transaction():
        locks.transaction_lock(conn, f"enrichment.{kind}")
        # A day's groups (and their durations, for the p95) hashed in memory, not on disk.
        conn.execute(query("set_local_work_mem"), {"work_mem": DIFF_WORK_MEM})
        conn.execute(query("clear_dirty_periods"), {**params, "kind": kind})
        conn.execute(query(delete), params)
        rows = conn.execute(query(insert), params).rowcount
    return ReplaceReport(rows=rows, seconds=time.perf_counter() - started)


def refresh_metrics(pool: ConnectionPool, window: Window) -> ReplaceReport:
    """Replace the window's days of ``conversation_metrics`` from the enriched rows."""
    check_window(window, "day")
    return _replace(
        pool,
        "day",
        "delete_metrics_days",
        "insert_metrics_days",
        {
            "window_start": window[0],
            "window_end": window[1],
            "first_day": window[0].date(),
            "end_day": window[1].date(),
        },
    )


def refresh_performance(pool: ConnectionPool, window: Window) -> ReplaceReport:
    """Replace the window's hours of ``performance_stats``."""
    check_window(window, "hour")
    return _replace(
        pool,
        "hour",
        "delete_performance_hours",
        "insert_performance_hours",
        {"window_start": window[0], "window_end": window[1]},
    )


@dataclass
class RecountReport:
    mismatches: int
    conversations: int
    examples: list[dict[str, Any]]


def metrics_vs_recount(conn: psycopg.Connection, window: Window) -> RecountReport:
    row = conn.execute(
        query("metrics_vs_recount"), {"window_start": window[0], "window_end": window[1]}
    ).fetchone()
    assert row is not None
    return RecountReport(mismatches=row[0], conversations=row[1], examples=row[2])


def pending_dirty_periods(
    conn: psycopg.Connection, since: datetime, before: datetime, limit: int = 500
) -> list[tuple[str, datetime, str]]:
    """Days and hours (starting from ``since``, before ``before``) whose metrics are
    stale, with what identifies their mark (its version and when it was made: a period
    marked again after a refresh cleared it must not look like the mark that refresh
    took)."""
    params = {"since": since, "before": before, "limit": limit}
    rows = conn.execute(query("pending_dirty_periods"), params)
    return [(row[0], row[1], row[2]) for row in rows]
