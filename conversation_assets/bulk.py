"""The bulk loader: many conversations through the write path, batch after batch.

For applications loading more than one batch's worth at once. Each batch goes
through the write path of `store.py` (`prepare`, then `write_prepared`), exactly as
`upsert_conversations` sends it; given a pool, the loader writes on two connections
(lanes) at once, each lane's next batch checked and encoded by the caller's thread
while the lanes write, so that a second backend can use a second core.
Nothing process-wide is touched (no garbage-collector or socket switches): every
speed-up here is the loader's own (benchmarks/README.md, "The write path without
process-wide switches", says what each is worth over TCP).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import psycopg
from psycopg_pool import ConnectionPool

from conversation_assets.store import (
    ConversationRecord,
    Encoder,
    UpsertReport,
    prepare,
    write_prepared,
)


class BulkUpsertError(RuntimeError):
    """A batch of a parallel bulk load failed. `report` counts what the batches that
    committed wrote; the cause is chained."""

    def __init__(self, cause: BaseException, report: UpsertReport) -> None:
        super().__init__(f"a batch of the bulk load failed: {cause}")
        self.report = report


def upsert_conversations_in_batches(
    target: psycopg.Connection | ConnectionPool,
    records: Iterable[ConversationRecord],
    *,
    batch_size: int = 5_000,
    workers: int = 2,
    source: str = "api",
) -> UpsertReport:
    """A bulk load: one transaction per batch of at most `batch_size` records.

    Given a connection, batches are written one after another. Given a pool,
    `workers` connections write at once (a second backend is what lets a bulk load
    use a second core). Records are routed
    by session, so every record of one session goes through the same connection in
    input order: the last one wins, as on one connection, and no two transactions
    ever wait on the same row. Batches commit independently. If one fails, nothing
    more is sent and, once the batches being written have finished,
    `BulkUpsertError` is raised with the report of those that committed. The pool
    must be able to lend `workers` connections at once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if isinstance(target, psycopg.Connection):
        return _upsert_serial(target, records, batch_size, source)
    return _upsert_parallel(target, records, batch_size, workers, source)


def _upsert_serial(
    conn: psycopg.Connection, records: Iterable[ConversationRecord], batch_size: int, source: str
) -> UpsertReport:
    """One connection: batches checked, encoded and written one after another. Encoding
    the next batch in a thread meanwhile did not pay over TCP (benchmarks/README.md)."""
    report = UpsertReport()
    encoder = Encoder(conn)
    remaining = iter(records)
    for chunk in iter(lambda: list(itertools.islice(remaining, batch_size)), []):
        report.add(write_prepared(conn, prepare(encoder, chunk), source))
    return report


def _route(record: ConversationRecord, workers: int) -> int:
    """The lane that owns a record's session (bad keys all go to the first)."""
    try:
        return hash((record.crew_code, record.session_id)) % workers
    except TypeError:
        return 0


def _upsert_parallel(
    pool: ConnectionPool,
    records: Iterable[ConversationRecord],
    batch_size: int,
    workers: int,
    source: str,
) -> UpsertReport:
    """`workers` lanes, each a connection and a thread writing its batches in order;
    the caller's thread routes records and encodes every lane's batches."""
    report = UpsertReport()
    lanes: list[list[ConversationRecord]] = [[] for _ in range(workers)]
    executors = [
        ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"upsert-{n}") for n in range(workers)
    ]
    in_flight: list[deque[Future[UpsertReport]]] = [deque() for _ in range(workers)]
    connections = ExitStack()

    def send(lane: int) -> None:
        # Checked and encoded here, while the lanes' connections wait on the database.
        batch = prepare(encoders[lane], lanes[lane])
        lanes[lane] = []
        # At most two batches per lane in memory: one writing, one waiting.
        while len(in_flight[lane]) >= 2:
            report.add(in_flight[lane].popleft().result())
        in_flight[lane].append(
            executors[lane].submit(write_prepared, lane_connections[lane], batch, source)
        )

    try:
        lane_connections = [connections.enter_context(pool.connection()) for _ in range(workers)]
        # Each lane's first batch is encoded before anything is sent on its connection.
        encoders = [Encoder(conn) for conn in lane_connections]
        for record in records:
            lane = _route(record, workers)
            lanes[lane].append(record)
            if len(lanes[lane]) >= batch_size:
                send(lane)
        for lane in range(workers):
            if lanes[lane]:
                send(lane)
        for futures in in_flight:
            while futures:
                report.add(futures.popleft().result())
    except Exception as error:
        # Nothing more is sent; batches not started are dropped, those writing finish.
        for futures in in_flight:
            for future in futures:
                future.cancel()
        for futures in in_flight:
            for future in futures:
                if not future.cancelled() and future.exception() is None:
                    report.add(future.result())
        raise BulkUpsertError(error, report) from error
    finally:
        for executor in executors:
            executor.shutdown(wait=True, cancel_futures=True)
        connections.close()
    return report
