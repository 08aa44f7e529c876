"""The write path into `conversations`: records, their checks, rejects, the upsert.

The pipeline's builder and any app that pushes conversations off its request path
go through `upsert_conversations`: COPY into a staging table, then one upsert per
batch, in one transaction. A record that cannot be stored is rejected with its
reason into `conversation_rejects`; the rest of the batch lands. Python only stops
what COPY cannot carry (NUL bytes, values that are not text, metadata that is not
JSON); every other check runs in PostgreSQL (`conversation_reject_reason`) over the
whole batch at once. Bulk loads over several connections are `bulk.py`'s.

A batch is first encoded unchecked, rows streamed into the COPY data as they are
made. A lone surrogate, a value that is not text or metadata that is not JSON stops
the encoding, and a NUL byte fails the COPY, which leaves nothing behind; either
way the batch is then checked record by record and written again. Clean batches,
nearly all of them, skip a scan of every text in Python. Everything is done with
psycopg's own adapters, set on the encoder's cursor only: no process-wide switch
(garbage collector, socket options, global adapters) is touched. The content hash
(`content_hash`, what the embedding cache keys on) is computed here, not by the
upsert: Python's sha256 (OpenSSL) costs about 1.5 us a transcript, and
PostgreSQL's own, in a server built without OpenSSL such as the embedded one, was
the most expensive single step of the upsert (benchmarks/README.md).
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import math
import operator
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.copy import Copy, FileWriter
from psycopg.types.json import Json, Jsonb, set_json_dumps
from psycopg.types.string import BytesBinaryDumper

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
    "jsonb",  # the metadata, through the cursor's jsonb dumper (metadata_json)
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
# One encoder for every record: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_sha256 = hashlib.sha256
# orjson leaves these to json (see metadata_json), which writes them its own way.
_ORJSON_AS_JSON = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
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


class MetadataRefused(ValueError):
    """Metadata the write path cannot store; the message is the reject's reason."""


def metadata_json(metadata: Any) -> bytes:
    """The metadata as JSON: what `json.dumps(ensure_ascii=False, allow_nan=False)`
    writes, or MetadataRefused with the reason. The jsonb dumps of the write path's
    COPY (set on its cursor only, `Encoder`).

    orjson writes it in about a tenth of json's time. It refuses what it does not
    write the way json would (keys that are not text, subclasses of dict, list, str
    and int, dates, integers past 64 bits, lone surrogates): json writes those. The
    one value orjson writes where json refuses is a NaN or an infinity (as null), so
    output holding a null is searched for one, and json refuses it with its own
    reason; a null that is None, the usual case, keeps orjson's output. orjson also
    writes three things json refuses: a UUID (its text), an Enum (its value) and an
    `orjson.Fragment` (as given; one that is not JSON fails the COPY, and then the
    record, checked alone, is rejected by `_metadata_problem`).
    """
    try:
        data = orjson.dumps(metadata, option=_ORJSON_AS_JSON)
    except TypeError:  # orjson.JSONEncodeError included
        return _metadata_json_slowly(metadata)
    if b"null" in data and _holds_non_finite(metadata):
        return _metadata_json_slowly(metadata)  # refused, as json refuses it
    if b"\\u0000" in data:
        raise MetadataRefused(_NUL_IN_METADATA)
    return data


def _holds_non_finite(metadata: Any) -> bool:
    """A NaN or an infinity somewhere in what orjson wrote (it writes them as null).

    Only the types orjson writes natively can hold one here (exactly float, dict,
    list and tuple, and an Enum's value): it refuses their subclasses, and json then
    writes the whole. A loop over a stack, not recursion: this runs for every record
    whose metadata holds a None, so it is kept to a fraction of json's time.
    """
    pending = [metadata]
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                return True
        elif kind is dict:
            pending.extend(value.values())
        elif kind is list or kind is tuple:
            pending.extend(value)
        elif isinstance(value, enum.Enum):
            pending.append(value.value)
    return False


def _metadata_json_slowly(metadata: Any) -> bytes:
    try:
        text = _JSON.encode(metadata)
    except (TypeError, ValueError, RecursionError) as error:
        raise MetadataRefused(f"metadata is not JSON: {error}") from error
    if "\\u0000" in text:
        raise MetadataRefused(_NUL_IN_METADATA)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise MetadataRefused("metadata is not valid UTF-8 (a lone surrogate)") from error


def _metadata_problem(record: ConversationRecord) -> str | None:
    """Why the metadata cannot be stored, in a batch checked record by record: what
    `metadata_json` refuses, or JSON text it passed unread (an `orjson.Fragment`)."""
    metadata, dumps = record.metadata, metadata_json
    if metadata is None:
        return None  # SQL NULL: conversation_reject_reason names it
    if isinstance(metadata, Json | Jsonb):  # psycopg's dumper unwraps these too
        metadata, dumps = metadata.obj, metadata.dumps or metadata_json
    try:
        data = dumps(metadata)
    except MetadataRefused as refused:
        return str(refused)
    if isinstance(data, str):
        data = data.encode()
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as error:
        return f"metadata is not JSON: {error}"
    return None


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
class PreparedBatch:
    """A batch encoded for COPY, and what Python had to reject first (`prepare`)."""

    copy_data: bytes  # the whole binary COPY stream, header to trailer
    row_count: int
    python_rejects: list[tuple[ConversationRecord, str]]
    records: list[ConversationRecord]
    texts_checked: bool


class Encoder:
    """Formats batches for one connection's COPY, possibly in another thread.

    Make it, and encode its first batch, while the connection is idle: the type
    adapters are set up then, reading the client encoding from libpq, and reused for
    every later batch, which can then be encoded while the connection is writing
    without touching its session. One thread at a time per encoder. Its adapters are
    its own cursor's: the connection's, and the application's, are left as they are.
    """

    def __init__(self, conn: psycopg.Connection) -> None:
        self._cursor = conn.cursor()
        # The metadata goes through psycopg's jsonb dumper, writing with
        # metadata_json (orjson, json where they could differ) instead of json.dumps.
        set_json_dumps(metadata_json, context=self._cursor)
        # bytea fields (the content hash) through psycopg's C bytes dumper: the one
        # registered last for bytea, which set_types would pick, is the DB-API
        # Binary wrapper's, a Python call per field.
        self._cursor.adapters.register_dumper(bytes, BytesBinaryDumper)

    def encode(self, rows: Iterable[tuple[Any, ...]]) -> tuple[bytes, int]:
        """The COPY data of `rows`, and how many there were."""
        buffer = io.BytesIO()
        count = 0
        with Copy(self._cursor, binary=True, writer=FileWriter(buffer)) as copy:
            copy.set_types(_STAGE_TYPES)
            for row in rows:
                copy.write_row(row)
                count += 1
        return buffer.getvalue(), count


def prepare(
    encoder: Encoder, records: Iterable[ConversationRecord], *, check_texts: bool = False
) -> PreparedBatch:
    """Check and encode a batch before its connection is needed (`write_prepared`
    writes it).

    Rows are formatted here, not inside the COPY, so that the writing backend never
    waits on Python between rows: measured on 2 cores, a COPY fed row by row spent
    about a fifth of each batch's time waiting for the client. Unchecked, each row is
    made, encoded and dropped in turn: a batch holds no list of rows, so the cyclic
    garbage collector has nothing of the batch's to walk again and again.
    """
    records = list(records)
    if check_texts:
        return _prepare_checked(encoder, records)
    python_rejects: list[tuple[ConversationRecord, str]] = []
    try:
        data, row_count = encoder.encode(_unchecked_rows(records, python_rejects))
    except Exception:  # noqa: BLE001 - the checks find it and reject it with its field
        # A lone surrogate, a value that is not text (a key included), metadata that
        # is not JSON, a time the dumper refuses.
        return _prepare_checked(encoder, records)
    return PreparedBatch(data if row_count else b"", row_count, python_rejects, records, False)


def _unchecked_rows(
    records: list[ConversationRecord], python_rejects: list[tuple[ConversationRecord, str]]
) -> Iterator[tuple[Any, ...]]:
    """The rows of a batch, only the checks the binary COPY needs on every record
    (it would wrap or coerce numbers silently) done first."""
    for record in _last_per_session(records):
        problem = _number_problem(record)
        if problem is not None:
            python_rejects.append((record, problem))
            continue
        yield _row(record)


def _row(record: ConversationRecord) -> tuple[Any, ...]:
    """A record as a conversation_stage row, in its column order (_STAGE_TYPES)."""
    return (
        record.client_code,
        record.crew_code,
        record.session_id,
        record.user_id,
        record.channel,
        record.summary,
        record.full_conversation,
        record.metadata,
        record.status,
        record.message_count,
        record.sentiment,
        record.language,
        content_hash(record.full_conversation),
        record.source_updated_at,
        record.created_at,
        record.last_message_at,
    )


def _prepare_checked(encoder: Encoder, records: list[ConversationRecord]) -> PreparedBatch:
    """A batch checked record by record. Whatever the checks missed and the encoding
    still refuses is the record's fault, never the batch's: when the whole fails,
    each row is encoded alone to find the ones to reject, with the encoder's error."""
    python_rejects: list[tuple[ConversationRecord, str]] = []
    rows: list[tuple[Any, ...]] = []
    kept: list[ConversationRecord] = []
    for record in _last_per_session(records):
        problem = _copy_problem(record) or _metadata_problem(record)
        if problem is not None:
            python_rejects.append((record, problem))
            continue
        rows.append(_row(record))
        kept.append(record)
    try:
        data, row_count = encoder.encode(rows)
    except Exception:  # noqa: BLE001 - found row by row below
        good_rows: list[tuple[Any, ...]] = []
        for row, record in zip(rows, kept, strict=True):
            try:
                encoder.encode([row])
            except Exception as error:  # noqa: BLE001 - any refusal rejects this record only
                reason = f"cannot be encoded: {type(error).__name__}: {error}"
                python_rejects.append((record, reason))
                continue
            good_rows.append(row)
        data, row_count = encoder.encode(good_rows)
    return PreparedBatch(data if row_count else b"", row_count, python_rejects, records, True)


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


def write_prepared(conn: psycopg.Connection, batch: PreparedBatch, source: str) -> UpsertReport:
    """Write a batch `prepare` made: one transaction (a savepoint if one is open).

    If the server refuses an unchecked batch's COPY (a NUL byte in a text), the
    batch is rolled back, checked record by record and written again.
    """
    try:
        return _write_batch(conn, batch, source)
    except _TextsRefused:
        # In the connection's own thread: a new encoder is safe here.
        return _write_batch(conn, prepare(Encoder(conn), batch.records, check_texts=True), source)


def _write_batch(conn: psycopg.Connection, batch: PreparedBatch, source: str) -> UpsertReport:
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
                # A NUL byte in a text, or a metadata Fragment that is not JSON.
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
            conn.execute(query("empty_conversation_stage"))
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
    reject. Two records for the same session: the last one wins. For a bulk load
    over several connections, see `bulk.upsert_conversations_in_batches`.
    """
    return write_prepared(conn, prepare(Encoder(conn), records), source)


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
