"""Writing conversations: COPY into a staging table, then one upsert per batch.

The pipeline's builder and any app that pushes conversations off its request
path go through `upsert_conversations`. A record
that cannot be stored is rejected with its reason into `conversation_rejects`;
the rest of the batch lands, all of it in one transaction. Python only stops
what COPY cannot carry (NUL bytes, values that are not text, metadata that is
not JSON); every other check runs in PostgreSQL (`conversation_reject_reason`)
over the whole batch at once.

The text fields are encoded unchecked first. A lone surrogate or a value that is
not text stops the encoding, and a NUL byte fails the COPY, which leaves nothing
behind; either way the batch is then checked record by record and written again.
Clean batches, nearly all of them, skip a scan of every text in Python. The
content hash (`content_hash`, what the embedding cache keys on) is computed here,
not by the upsert: Python's sha256 (OpenSSL) costs about 1.5 us a transcript, and
PostgreSQL's own, in a server built without OpenSSL such as the embedded one, was
the most expensive single step of the upsert (benchmarks/README.md).
"""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import json
import operator
import os
import socket
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.copy import Copy, FileWriter
from psycopg.types.string import BytesBinaryDumper
from psycopg_pool import ConnectionPool

from conversation_assets.queries import query

STATUSES = ("active", "closed", "handoff_complete", "archived")
_TEXT_FIELDS = (
    "client_code",
    "crew_code",
    "session_id",
    "user_id",
    "channel",
    "summary",
    "full_conversation",
    "language",
    "status",
)
_text_fields = operator.attrgetter(*_TEXT_FIELDS)  # one C call, not nine getattr
# Column types of the binary COPY into conversation_stage, in its column order.
_STAGE_TYPES = (
    *("text",) * 7,
    "bytea",  # the metadata, already in jsonb's binary form (_metadata_json)
    "text",
    "int4",
    "float4",
    "text",
    "bytea",
    *("timestamptz",) * 3,
)
_INT4 = range(-(2**31), 2**31)  # the binary COPY would wrap a larger message_count
_TIME_FIELDS = ("created_at", "last_message_at", "source_updated_at")
# Unicode's White_Space characters: a key made only of them is blank. The same list
# as the SQL text_is_blank (migration 0005), used by discovery, the write path and
# the inbox; not str.isspace(), which adds U+001C-U+001F.
BLANK_CHARACTERS = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_EXCERPT_CHARS = 500
# What a local connection's socket may hold unsent: most of a 5,000-row batch's COPY
# where the kernel allows it (Linux caps it at net.core.wmem_max, often 208 KB).
_COPY_SEND_BUFFER = 4 * 2**20
# One encoder for every record: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_sha256 = hashlib.sha256
# orjson leaves these to json (see _metadata_json), which writes them its own way.
_ORJSON_AS_JSON = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
# A binary COPY field for a jsonb column: the format version, then the JSON text.
_JSONB_VERSION = b"\x01"
_NUL_IN_METADATA = "metadata contains a NUL character (PostgreSQL's jsonb cannot hold it)"


def content_hash(text: str | None) -> bytes:
    """What the embedding cache and backlog key on: sha256 of the UTF-8 text ("" for None).

    `str.encode` raises TypeError, not AttributeError, for a value that is not text,
    so an unchecked batch holding one is checked and the record rejected.
    """
    return _sha256(str.encode("" if text is None else text)).digest()


def is_blank(text: str) -> bool:
    """Empty once every Unicode White_Space character is stripped: the rule the
    database applies to every key (text_is_blank)."""
    return not text.strip(BLANK_CHARACTERS)


def conversation_id(crew_code: str, session_id: str) -> uuid.UUID:
    """The id a session's conversation has in any database (the SQL conversation_id)."""
    digest = hashlib.md5(f"{crew_code}\x1f{session_id}".encode(), usedforsecurity=False)
    return uuid.UUID(digest.hexdigest())


@dataclass
class ConversationRecord:
    """One conversation to store. `crew_code` and `session_id` identify it."""

    client_code: str
    crew_code: str
    session_id: str
    user_id: str
    full_conversation: str | None = None
    summary: str | None = None
    channel: str = "web"
    metadata: Any = field(default_factory=dict)
    status: str = "active"
    message_count: int = 0
    sentiment: float | None = None
    language: str | None = None
    created_at: datetime | None = None
    last_message_at: datetime | None = None
    # The discovered session's updated_at this record was built from (pipeline only).
    source_updated_at: datetime | None = None

    @property
    def id(self) -> uuid.UUID:
        return conversation_id(self.crew_code, self.session_id)

    @property
    def record_key(self) -> str:
        """The rejects table's key: the session when it is usable, else a hash."""
        crew, session = self.crew_code, self.session_id
        if type(crew) is str and type(session) is str and "\x00" not in crew + session:
            return f"{crew}/{session}"[:600]
        return "sha256:" + hashlib.sha256(repr(self).encode("utf-8", "replace")).hexdigest()


@dataclass
class Reject:
    record_key: str
    reason: str


@dataclass
class UpsertReport:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejects)

    def add(self, other: UpsertReport) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.rejects.extend(other.rejects)


def _copy_problem(record: ConversationRecord) -> str | None:
    """What would break the COPY itself; everything else is checked in SQL."""
    return _text_problem(record) or _number_problem(record) or _refused_value_problem(record)


def _text_problem(record: ConversationRecord) -> str | None:
    texts = _text_fields(record)
    try:
        joined = "".join([text for text in texts if text is not None])
    except TypeError:
        name, value = next(
            (n, v)
            for n, v in zip(_TEXT_FIELDS, texts, strict=True)
            if v is not None and not isinstance(v, str)
        )
        return f"{name} is not text ({type(value).__name__})"
    if "\x00" in joined:
        name = next(n for n in _TEXT_FIELDS if "\x00" in (getattr(record, n) or ""))
        return f"{name} contains a NUL byte"
    if not joined.isascii():
        try:
            joined.encode("utf-8")
        except UnicodeEncodeError:
            return "text is not valid UTF-8 (a lone surrogate)"
    return None


def _number_problem(record: ConversationRecord) -> str | None:
    """Checked on every record: the binary COPY would wrap or coerce these silently."""
    if type(record.message_count) is not int:
        return f"message_count is not an integer ({type(record.message_count).__name__})"
    if record.message_count not in _INT4:
        return f"message_count {record.message_count} is out of range for an integer column"
    if record.sentiment is not None and not isinstance(record.sentiment, int | float):
        return f"sentiment is not a number ({type(record.sentiment).__name__})"
    return None


def _refused_value_problem(record: ConversationRecord) -> str | None:
    """What the COPY's encoder refuses outright (a naive time next to aware ones, a
    date, a string or a number for a time; a sentiment too large for a float4): the
    refusal sends the batch here, and the record, not the batch, is rejected. Checked
    only then, so clean batches pay nothing for it."""
    sentiment = record.sentiment
    if sentiment is not None and not -1 <= sentiment <= 1:  # NaN too
        return "sentiment is outside [-1, 1]"
    return _time_fields_problem(record)


def _time_problem(name: str, at: Any) -> str | None:
    """Why a timestamp field cannot be stored: only timezone-aware datetimes can (a
    naive one would be read in the session's TimeZone, a date or a text guessed at)."""
    if not isinstance(at, datetime):
        return f"{name} is not a datetime ({type(at).__name__})"
    try:
        offset = at.utcoffset()
    except Exception as error:  # noqa: BLE001 - a tzinfo that fails is the record's problem
        return f"{name} has a time zone that fails ({type(error).__name__}: {error})"
    if offset is None:
        return f"{name} is a naive datetime (no time zone): {at.isoformat()}"
    return None


def _time_fields_problem(record: ConversationRecord) -> str | None:
    """The thorough timestamp check of a batch checked record by record (also a
    subclass of datetime, or a tzinfo whose utcoffset is None or fails)."""
    for name in _TIME_FIELDS:
        at = getattr(record, name)
        if at is not None:
            problem = _time_problem(name, at)
            if problem is not None:
                return problem
    return None


def _metadata_json(
    record: ConversationRecord, check: bool = False
) -> tuple[bytes | None, str | None]:
    """The metadata as jsonb's binary COPY field (version 1, then the JSON), or why not.

    orjson writes it in about a tenth of json's time. Where the two could disagree,
    json decides: orjson refuses what it does not write the way json would (keys that
    are not text, subclasses of dict, list, str and int, dates, integers past 64
    bits, lone surrogates), and it writes NaN and infinities as null where json
    refuses them, so output holding a null is written again by json. orjson also
    writes three things json refuses: a UUID (its text), an Enum (its value) and an
    `orjson.Fragment` (as given). A Fragment that is not JSON fails the COPY, and in
    the batch then checked record by record (`check`), it is rejected here.
    """
    try:
        data = orjson.dumps(record.metadata, option=_ORJSON_AS_JSON)
    except TypeError:
        data = None
    if data is None or b"null" in data:
        return _metadata_json_slowly(record)
    if b"\\u0000" in data:
        return None, _NUL_IN_METADATA
    if check:
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError as error:
            return None, f"metadata is not JSON: {error}"
    return _JSONB_VERSION + data, None


def _metadata_json_slowly(record: ConversationRecord) -> tuple[bytes | None, str | None]:
    try:
        text = _JSON.encode(record.metadata)
    except (TypeError, ValueError, RecursionError) as error:
        return None, f"metadata is not JSON: {error}"
    if "\\u0000" in text:
        return None, _NUL_IN_METADATA
    try:
        return _JSONB_VERSION + text.encode("utf-8"), None
    except UnicodeEncodeError:
        return None, "metadata is not valid UTF-8 (a lone surrogate)"


def _excerpt(record: ConversationRecord) -> str:
    try:
        text = repr(record)
    except Exception:  # noqa: BLE001 - a record we cannot even print is still rejected
        text = "<unprintable record>"
    return text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")[:_EXCERPT_CHARS]


def _printable(value: Any) -> str | None:
    if value is None:
        return None
    try:
        text = str(value)
    except Exception:  # noqa: BLE001 - a value we cannot even print is still rejected
        text = f"<unprintable {type(value).__name__}>"
    return text.replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")[:600]


def record_python_rejects(
    conn: psycopg.Connection, rejected: Sequence[tuple[ConversationRecord, str]], source: str
) -> None:
    if not rejected:
        return
    # One row per key (the last record's): ON CONFLICT cannot touch a row twice.
    rejected = list({r.record_key: (r, reason) for r, reason in rejected}.values())
    conn.execute(
        query("record_conversation_rejects"),
        {
            "keys": [r.record_key for r, _ in rejected],
            "client_codes": [_printable(getattr(r, "client_code", None)) for r, _ in rejected],
            "crew_codes": [_printable(getattr(r, "crew_code", None)) for r, _ in rejected],
            "session_ids": [_printable(getattr(r, "session_id", None)) for r, _ in rejected],
            "sources": [source] * len(rejected),
            "reasons": [reason for _, reason in rejected],
            "excerpts": [_excerpt(r) for r, _ in rejected],
        },
    )


@dataclass(frozen=True)
class SessionReject:
    """A session the builder could not turn into a record (a message it cannot read)."""

    client_code: str | None  # None when even the discovered row could not be read
    crew_code: str
    session_id: str
    reason: str

    @property
    def record_key(self) -> str:
        """The key its record would have (a later successful write clears it)."""
        return f"{self.crew_code}/{self.session_id}"[:600]


def record_session_rejects(
    conn: psycopg.Connection, rejected: Sequence[SessionReject], source: str
) -> list[Reject]:
    """Store why sessions could not be built, in one statement; their Rejects."""
    if not rejected:
        return []
    # One row per key (the last): ON CONFLICT cannot touch a row twice.
    unique = list({r.record_key: r for r in rejected}.values())
    conn.execute(
        query("record_conversation_rejects"),
        {
            "keys": [r.record_key for r in unique],
            "client_codes": [_printable(r.client_code) for r in unique],
            "crew_codes": [_printable(r.crew_code) for r in unique],
            "session_ids": [_printable(r.session_id) for r in unique],
            "sources": [source] * len(unique),
            "reasons": [_printable(r.reason) for r in unique],
            "excerpts": [None] * len(unique),
        },
    )
    return [Reject(r.record_key, r.reason) for r in unique]


@dataclass
class _Prepared:
    """A batch encoded for COPY, and what Python had to reject first."""

    copy_data: bytes  # the whole binary COPY stream, header to trailer
    row_count: int
    python_rejects: list[tuple[ConversationRecord, str]]
    records: list[ConversationRecord]
    texts_checked: bool


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is encoded.

    The loop allocates a few tracked objects per record, so the collector runs every
    few hundred records, and its full passes walk every object the caller holds (a
    bulk load's whole input): measured at 100,000 records, 14.1-17.5 us a record with
    it, 11.4 without. The loop makes no cycles; the collector catches up afterwards.
    The switch is process-wide. Left off if something else had switched it off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Collections during a bulk load look only at objects made since it started.

    Pausing the collector while each batch is encoded was not enough: a load still
    spent about a tenth of its time in collections between batches, one full pass
    over the 200,000 records the caller held taking 335-433 ms (benchmarks/README.md).
    `gc.freeze` puts every object that exists now out of the collector's reach until
    `gc.unfreeze`, so cycles made during the load are still freed. Process-wide: left
    alone when something else has frozen objects (a server that freezes before it
    forks), and a concurrent load that ends first unfreezes early (only speed lost).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Encoder:
    """Formats batches for one connection's COPY, possibly in another thread.

    Make it, and encode its first batch, while the connection is idle: the type
    adapters are set up then, reading the client encoding from libpq, and reused for
    every later batch, which can then be encoded while the connection is writing
    without touching its session. One thread at a time per encoder.
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self._cursor = conn.cursor()
        # bytea fields (the metadata, the content hash) through psycopg's C bytes
        # dumper: the one registered last for bytea, which set_types would pick,
        # is the DB-API Binary wrapper's, a Python call per field.
        self._cursor.adapters.register_dumper(bytes, BytesBinaryDumper)
        _widen_send_buffer(conn)

    def encode(self, rows: list[tuple[Any, ...]]) -> bytes:
        buffer = io.BytesIO()
        with Copy(self._cursor, binary=True, writer=FileWriter(buffer)) as copy:
            copy.set_types(_STAGE_TYPES)
            for row in rows:
                copy.write_row(row)
        return buffer.getvalue()


def _widen_send_buffer(conn: psycopg.Connection) -> None:
    """Let a Unix socket take a batch's COPY in a few writes instead of dozens.

    A Unix socket holds about 200 KB unsent by default, so a 5 MB COPY went out in
    some 25 pieces, each sent by a thread that had to take the GIL back from the one
    encoding the next batch first; the backend waited meanwhile. With 4 MB the COPY
    phase of a batch took half as long (benchmarks/README.md). The kernel caps the
    size at net.core.wmem_max. TCP sockets are left alone: their buffer grows by
    itself, and setting one would stop that.
    """
    duplicate = os.dup(conn.fileno())
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:  # not a socket Python can look at
        os.close(duplicate)
        return
    with sock:  # closes the duplicate only
        if sock.family != getattr(socket, "AF_UNIX", None):
            return
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _COPY_SEND_BUFFER:
            with suppress(OSError):  # a kernel that refuses the size: keep the default
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _COPY_SEND_BUFFER)


def _prepare(
    encoder: _Encoder, records: Iterable[ConversationRecord], *, check_texts: bool = False
) -> _Prepared:
    """Check and encode a batch before its connection is needed.

    Rows are formatted here, not inside the COPY, so that the writing backend never
    waits on Python between rows: measured on 2 cores, a COPY fed row by row spent
    about a fifth of each batch's time waiting for the client.
    """
    with _collector_paused():
        records = list(records)
        try:
            rows, kept, python_rejects = _rows(records, check_texts)
            if check_texts:
                data = _encode_checked(encoder, rows, kept, python_rejects)
            else:
                data = encoder.encode(rows) if rows else b""
        except Exception:
            # A lone surrogate, a value that is not text (a key included), a time the
            # dumper refuses: the checks find it and reject it with its field.
            if check_texts:
                raise
            return _prepare(encoder, records, check_texts=True)
        row_count = len(rows)
        # Freed before the collector is back: else its first pass walks every row.
        del rows, kept
    return _Prepared(data, row_count, python_rejects, records, check_texts)


def _rows(
    records: list[ConversationRecord], check_texts: bool
) -> tuple[list[tuple[Any, ...]], list[ConversationRecord], list[tuple[ConversationRecord, str]]]:
    rows: list[tuple[Any, ...]] = []
    python_rejects: list[tuple[ConversationRecord, str]] = []
    check = _copy_problem if check_texts else _number_problem
    kept: list[ConversationRecord] = []
    for record in _last_per_session(records):
        problem = check(record)
        metadata = None
        if problem is None:
            metadata, problem = _metadata_json(record, check_texts)
        if problem is not None:
            python_rejects.append((record, problem))
            continue
        if check_texts:
            kept.append(record)
        rows.append(
            (
                record.client_code,
                record.crew_code,
                record.session_id,
                record.user_id,
                record.channel,
                record.summary,
                record.full_conversation,
                metadata,
                record.status,
                record.message_count,
                record.sentiment,
                record.language,
                content_hash(record.full_conversation),
                record.source_updated_at,
                record.created_at,
                record.last_message_at,
            )
        )
    return rows, kept, python_rejects


def _encode_checked(
    encoder: _Encoder,
    rows: list[tuple[Any, ...]],
    kept: list[ConversationRecord],
    python_rejects: list[tuple[ConversationRecord, str]],
) -> bytes:
    """A checked batch's COPY data. Whatever the checks missed and the encoding still
    refuses is the record's fault, never the batch's: when the whole fails, each row
    is encoded alone to find the ones to reject, with the encoder's error."""
    try:
        return encoder.encode(rows) if rows else b""
    except Exception:  # noqa: BLE001 - found row by row below
        pass
    good_rows: list[tuple[Any, ...]] = []
    for row, record in zip(rows, kept, strict=True):
        try:
            encoder.encode([row])
        except Exception as error:  # noqa: BLE001 - any refusal rejects this record only
            python_rejects.append((record, f"cannot be encoded: {type(error).__name__}: {error}"))
            continue
        good_rows.append(row)
    rows[:] = good_rows
    return encoder.encode(rows) if rows else b""


def _last_per_session(records: list[ConversationRecord]) -> Iterable[ConversationRecord]:
    """Two records for one session: only the last counts, whether stored or rejected."""
    latest: dict[Any, ConversationRecord] = {}
    for record in records:
        try:
            latest[(record.crew_code, record.session_id)] = record
        except TypeError:  # a key that is not text: rejected by the checks
            latest[id(record)] = record
    return latest.values()


class _TextsRefused(Exception):
    """The COPY of a batch whose texts were not checked failed on one of them."""


def _write(conn: psycopg.Connection, batch: _Prepared, source: str) -> UpsertReport:
    try:
        return _write_batch(conn, batch, source)
    except _TextsRefused:
        # Rolled back whole; now every record is checked and the bad ones rejected.
        # In the connection's own thread: a new encoder is safe here.
        return _write_batch(conn, _prepare(_Encoder(conn), batch.records, check_texts=True), source)


def _write_batch(conn: psycopg.Connection, batch: _Prepared, source: str) -> UpsertReport:
    report = UpsertReport(rejects=[Reject(r.record_key, why) for r, why in batch.python_rejects])
    # Inside a caller's transaction no commit empties the stage between calls.
    nested = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        record_python_rejects(conn, batch.python_rejects, source)
        if not batch.row_count:
            return report
        conn.execute(query("create_conversation_stage"))
        with conn.cursor() as cur:
            try:
                with cur.copy(query("copy_conversation_stage")) as copy:
                    copy.write(batch.copy_data)
            except psycopg.DataError as error:
                # A NUL byte in a text, refused by the server.
                if batch.texts_checked:
                    raise
                raise _TextsRefused from error
            sql_rejects = cur.execute(
                query("reject_staged_conversations"), {"source": source}
            ).fetchall()
            inserted, written = cur.execute(query("upsert_staged_conversations")).fetchone()
            if written < batch.row_count - len(sql_rejects):
                # Rows left unwritten: unchanged, or another client's conversation that
                # the upsert's guard kept. A statement of its own, so that its snapshot
                # sees a row another writer committed while the upsert waited on it.
                sql_rejects += cur.execute(
                    query("reject_staged_of_other_clients"), {"source": source}
                ).fetchall()
        if nested:
            conn.execute("TRUNCATE conversation_stage")
    report.inserted = inserted
    report.updated = written - inserted
    report.unchanged = batch.row_count - len(sql_rejects) - written
    report.rejects.extend(Reject(key, reason) for key, reason in sql_rejects)
    return report


def upsert_conversations(
    conn: psycopg.Connection, records: Iterable[ConversationRecord], *, source: str = "api"
) -> UpsertReport:
    """Store a batch in one transaction (a savepoint if one is open): COPY, one upsert.

    Records that cannot be stored go to `conversation_rejects` with their reason
    (and are listed in the report); a record stored now clears its earlier
    reject. Two records for the same session: the last one wins.
    """
    return _write(conn, _prepare(_Encoder(conn), records), source)


def upsert_conversations_in_batches(
    target: psycopg.Connection | ConnectionPool,
    records: Iterable[ConversationRecord],
    *,
    batch_size: int = 5_000,
    workers: int = 2,
    source: str = "api",
) -> UpsertReport:
    """A bulk load: one transaction per batch of at most `batch_size` records.

    Given a connection, batches are written one after another while a thread checks
    and encodes the next one. Given a pool, `workers` connections write at once (a
    second backend is what lets a bulk load use a second core). Records are routed
    by session, so every record of one session goes through the same connection in
    input order: the last one wins, as on one connection, and no two transactions
    ever wait on the same row. Batches commit independently. If one fails, nothing
    more is sent and, once the batches being written have finished,
    `BulkUpsertError` is raised with the report of those that committed. The pool
    must be able to lend `workers` connections at once. The objects that exist when
    the load starts are frozen until it ends (`_older_objects_frozen` says why).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    with _older_objects_frozen():
        if isinstance(target, psycopg.Connection):
            return _upsert_serial(target, records, batch_size, source)
        return _upsert_parallel(target, records, batch_size, workers, source)


def _upsert_serial(
    conn: psycopg.Connection, records: Iterable[ConversationRecord], batch_size: int, source: str
) -> UpsertReport:
    report = UpsertReport()
    remaining = iter(records)
    chunks = iter(lambda: list(itertools.islice(remaining, batch_size)), [])
    encoder = _Encoder(conn)  # its first batch is encoded before the first write
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="upsert-prepare") as worker:
        pending = None
        first = next(chunks, None)
        if first is not None:
            pending = worker.submit(_prepare, encoder, first)
        while pending is not None:
            batch = pending.result()
            following = next(chunks, None)
            pending = worker.submit(_prepare, encoder, following) if following is not None else None
            report.add(_write(conn, batch, source))
    return report


class BulkUpsertError(RuntimeError):
    """A batch of a parallel bulk load failed. `report` counts what the batches that
    committed wrote; the cause is chained."""

    def __init__(self, cause: BaseException, report: UpsertReport) -> None:
        super().__init__(f"a batch of the bulk load failed: {cause}")
        self.report = report


def _route(record: ConversationRecord, workers: int) -> int:
    """The worker that owns a record's session (bad keys all go to the first)."""
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
    report = UpsertReport()
    lanes: list[list[ConversationRecord]] = [[] for _ in range(workers)]
    executors = [
        ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"upsert-{n}") for n in range(workers)
    ]
    in_flight: list[deque[Future[UpsertReport]]] = [deque() for _ in range(workers)]
    connections = ExitStack()

    def send(lane: int) -> None:
        # Checked and encoded here, while the lanes' connections wait on the database.
        batch = _prepare(encoders[lane], lanes[lane])
        lanes[lane] = []
        # At most two batches per lane in memory: one writing, one waiting.
        while len(in_flight[lane]) >= 2:
            report.add(in_flight[lane].popleft().result())
        in_flight[lane].append(
            executors[lane].submit(_write, lane_connections[lane], batch, source)
        )

    try:
        lane_connections = [connections.enter_context(pool.connection()) for _ in range(workers)]
        # Each lane's first batch is encoded before anything is sent on its connection.
        encoders = [_Encoder(conn) for conn in lane_connections]
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


def soft_delete_gone(
    conn: psycopg.Connection, gone: Sequence[tuple[str, str, datetime | None]]
) -> int:
    """Mark conversations of sessions whose rows are gone as deleted (kept, not erased).

    `gone` holds (crew_code, session_id, the discovered row's updated_at).
    """
    if not gone:
        return 0
    rows = conn.execute(
        query("soft_delete_gone_sessions"),
        {
            "crew_codes": [g[0] for g in gone],
            "session_ids": [g[1] for g in gone],
            "source_updated_at": [g[2] for g in gone],
        },
    ).fetchall()
    return len(rows)
