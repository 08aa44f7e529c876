"""Push ingestion: apps hand a finished conversation off in one durable INSERT, and
the drain stores it later through the same write path as every other conversation.

This replaces an in-memory queue (batches every few seconds, an LRU embedding cache,
a maximum queue size, a flush on SIGTERM) that a crash or a deploy emptied, and
that, like most tools of its kind, dropped items silently once full. Here:

- `queue_conversation_storage` is one call of the SQL function of the same name
  (migration 0009_inbox): its checks, then one INSERT into `conversation_inbox`.
  Apps in any language call the function directly. A bad field is refused at once
  (`InboxInputError`, naming it); a full inbox refuses the call
  (`InboxFullError`), never an item silently.
- `drain` takes the oldest items with ``FOR UPDATE SKIP LOCKED`` (drains never take
  the same item), embeds them through the embedding resource and the persistent
  cache, stores them with `store.upsert_conversations` and removes them, all in
  one transaction: a drain killed at any instant leaves its batch in the inbox.
  An item that fails alone `max_attempts` times is moved to
  `conversation_inbox_rejects` with its error; so is one the write path refuses.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import psycopg
from pgvector import Vector
from psycopg_pool import ConnectionPool

from conversation_assets.embedding import column_dimension, embedding_model_key
from conversation_assets.queries import query
from conversation_assets.store import ConversationRecord, content_hash, upsert_conversations
from conversation_assets.transcripts import extractive_summary, guess_language, sentiment
from resources.embeddings import EmbeddingResource, check_dimension, embed_each

ProgressLog = Callable[[str], None]

CREW_PREFIX = "inbox:"  # a pushed conversation's crew code: "inbox:" + its client
SOURCE = "inbox"  # the write path's `source` (conversation_rejects.source)
INBOX_FULL = "CPQ01"  # SQLSTATE of a call refused because the inbox is full


# Errors that come from one item (a value the write path or a product trigger
# refuses), not from the database or the model being away: the batch is halved
# until the item is found, which then counts an attempt.
class ItemUnreadable(ValueError):
    """A stored item no reader can load (its metadata): that item's failure."""


_ITEM_ERRORS = (
    ItemUnreadable,
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.InternalError,
    psycopg.errors.ProgramLimitExceeded,
    psycopg.errors.RaiseException,  # a product's trigger refusing the row
    psycopg.errors.AssertFailure,
)
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_TEXT_FIELDS = ("client_code", "user_id", "channel", "transcript", "summary", "idempotency_key")
# "Speaker: text" lines of a transcript (the builder's labels, and the usual others).
_LINE = re.compile(
    r"^\s*(user|human|customer|assistant|ai|bot|agent|system|tool)\s*:\s*(.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_USER_LABELS = frozenset({"user", "human", "customer"})
_AI_LABELS = frozenset({"assistant", "ai", "bot", "agent"})
# The previous call's round trip, per thread: sent with the next call, it becomes the
# enqueue histogram's sample without a write of its own.
_carried = threading.local()


class InboxInputError(ValueError):
    """A field of the conversation handed off cannot be stored; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


class InboxFullError(RuntimeError):
    """The inbox holds more than INBOX_MAX_PENDING conversations: try again later.

    Nothing was stored; the app decides what to do (retry, slow down, fail)."""


def _check_text(name: str, value: Any, required: bool) -> None:
    """What cannot even reach PostgreSQL as a text parameter: a value that is not
    text, a NUL byte, a lone surrogate. Everything else is checked by the function."""
    if value is None:
        if required:
            raise InboxInputError(name, f"{name} is missing")
        return
    if not isinstance(value, str):
        raise InboxInputError(name, f"{name} is not text ({type(value).__name__})")
    if "\x00" in value:
        raise InboxInputError(name, f"{name} contains a NUL byte")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InboxInputError(name, f"{name} is not valid UTF-8 (a lone surrogate)") from None


def _metadata_json(metadata: Any) -> str:
    if metadata is None:
        return "{}"
    if not isinstance(metadata, Mapping):
        raise InboxInputError(
            "metadata", f"metadata is not a JSON object ({type(metadata).__name__})"
        )
    try:
        text = _JSON.encode(dict(metadata))
    except (TypeError, ValueError, RecursionError) as error:
        raise InboxInputError("metadata", f"metadata is not JSON: {error}") from None
    if "\\u0000" in text:
        raise InboxInputError("metadata", "metadata contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InboxInputError(
            "metadata", "metadata is not valid UTF-8 (a lone surrogate)"
        ) from None
    return text


def queue_conversation_storage(
    target: psycopg.Connection | ConnectionPool,
    user_id: str,
    channel: str,
    transcript: str,
    summary: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    client_code: str,
    idempotency_key: str | None = None,
) -> uuid.UUID:
    """Hand a finished conversation off; its id in `conversations` once stored.

    One round trip, one INSERT, durable when it returns (on a connection inside a
    transaction: when that transaction commits). The same `idempotency_key` (per
    client) returns the same id and stores the conversation once.
    Raises `InboxInputError` (bad field, named) or `InboxFullError` (backpressure).
    """
    started = time.perf_counter()
    texts = (client_code, user_id, channel, transcript, summary, idempotency_key)
    for name, value in zip(_TEXT_FIELDS, texts, strict=True):
        _check_text(name, value, required=name in ("client_code", "user_id", "transcript"))
    params = {
        "user_id": user_id,
        "channel": channel,
        "transcript": transcript,
        "summary": summary,
        "metadata": _metadata_json(metadata),
        "client_code": client_code,
        "idempotency_key": idempotency_key,
        "client_latency_ms": getattr(_carried, "latency_ms", None),
    }
    try:
        if isinstance(target, ConnectionPool):
            with target.connection() as conn:
                row = conn.execute(query("inbox_enqueue"), params).fetchone()
        else:
            row = target.execute(query("inbox_enqueue"), params).fetchone()
    except psycopg.errors.InvalidParameterValue as error:
        raise InboxInputError(
            error.diag.column_name or "?", error.diag.message_primary or str(error)
        ) from None
    except psycopg.Error as error:
        if error.sqlstate == INBOX_FULL:
            raise InboxFullError(error.diag.message_primary or str(error)) from None
        raise
    _carried.latency_ms = (time.perf_counter() - started) * 1000
    assert row is not None
    return row[0]


def set_max_pending(conn: psycopg.Connection, max_pending: int) -> None:
    """The inbox's bound (INBOX_MAX_PENDING), kept in the database for every caller."""
    if max_pending < 1:
        raise ValueError(f"max_pending must be at least 1, got {max_pending}")
    conn.execute(query("inbox_set_max_pending"), {"max_pending": max_pending})


def recount(conn: psycopg.Connection) -> int:
    """Count the inbox (up to its bound) for the enqueue's bound check; the count."""
    row = conn.execute(query("inbox_recount")).fetchone()
    return int(row[0]) if row else 0


def has_items(conn: psycopg.Connection) -> bool:
    row = conn.execute(query("inbox_has_items")).fetchone()
    return bool(row and row[0])


def oldest_age(conn: psycopg.Connection) -> tuple[float | None, int]:
    """Seconds the oldest waiting item has waited (None: empty), and the items waiting."""
    row = conn.execute(query("inbox_oldest_age")).fetchone()
    assert row is not None
    return (None if row[0] is None else float(row[0])), int(row[1])


@dataclass
class DrainReport:
    model: str
    stored: int = 0
    rejected: int = 0  # moved to conversation_inbox_rejects
    failed_attempts: int = 0  # items that failed alone and stay for a later run
    batches: int = 0
    embedded: int = 0
    cache_hits: int = 0
    texts_sent: int = 0
    refused: int = 0  # texts the model refused: stored without a vector
    embed_seconds: float = 0.0
    seconds: float = 0.0
    pending_left: int = 0
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (session, reason)

    @property
    def per_second(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    def add(self, other: DrainReport) -> None:
        """Fold a worker's counts into the run's."""
        for name in (
            "stored",
            "rejected",
            "failed_attempts",
            "batches",
            "embedded",
            "cache_hits",
            "texts_sent",
            "refused",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.embed_seconds += other.embed_seconds
        self.rejects.extend(other.rejects)


@dataclass
class InboxItem:
    seq: int
    client_code: str
    session_id: str
    user_id: str
    channel: str
    full_conversation: str
    summary: str | None
    metadata: dict[str, Any]
    enqueued_at: Any


def _item(row: tuple[Any, ...]) -> InboxItem:
    """A taken row, its metadata (fetched as text) read here, with orjson: the writer's
    own encoder, so what loads here also writes."""
    *fields, metadata, enqueued_at = row
    try:
        loaded = orjson.loads(metadata)
    except orjson.JSONDecodeError as error:
        raise ItemUnreadable(f"metadata cannot be read: {error}") from None
    if not isinstance(loaded, dict):
        raise ItemUnreadable("metadata is not a JSON object")
    return InboxItem(*fields, loaded, enqueued_at)


def record_for(item: InboxItem) -> ConversationRecord:
    """The stored conversation of a pushed one: the app's fields, plus what the builder
    computes for every conversation (counts, language, sentiment, a summary when none
    was given), so pushed conversations are enriched and measured like any other."""
    labels: list[str] = []
    user_texts: list[str] = []
    dialogue: list[str] = []
    lead: int | None = None
    for match in _LINE.finditer(item.full_conversation):
        label, text = match[1].lower(), match[2].strip()
        labels.append(label)
        if text and (label in _USER_LABELS or label in _AI_LABELS):
            if label in _USER_LABELS:
                user_texts.append(text)
                if lead is None:
                    lead = len(dialogue)
            dialogue.append(text)
    if not labels:  # free text: one message, the user's
        user_texts = dialogue = [item.full_conversation.strip()]
        lead = 0
    language, confidence = guess_language("\n".join(user_texts))
    mood = sentiment(user_texts)
    computed: dict[str, Any] = {
        "message_count": max(len(labels), 1),
        "human_messages": sum(label in _USER_LABELS for label in labels) or (0 if labels else 1),
        "ai_messages": sum(label in _AI_LABELS for label in labels),
        "language": language,
        "language_confidence": round(confidence, 3),
        "sentiment": mood,
        "characters": len(item.full_conversation),
        "summarizer": "app" if item.summary else "extractive",
        "source": SOURCE,
    }
    return ConversationRecord(
        client_code=item.client_code,
        crew_code=CREW_PREFIX + item.client_code,
        session_id=item.session_id,
        user_id=item.user_id,
        full_conversation=item.full_conversation,
        summary=item.summary if item.summary else extractive_summary(dialogue, lead=lead),
        channel=item.channel,
        metadata={**computed, **item.metadata},  # the app's keys win
        status="active",
        message_count=computed["message_count"],
        sentiment=mood["compound"],
        language=language,
        created_at=item.enqueued_at,
        last_message_at=item.enqueued_at,
    )


def _vector(values: np.ndarray) -> Vector | None:
    """A stored vector, or None for a text that embeds to nothing (cosine undefined)."""
    if not np.any(values):
        return None
    return Vector(values.astype(np.float32, copy=False))


class _Failed:
    """Items that failed alone in this run, shared by its workers: each counts one
    attempt per run, and is not taken again before the next run."""

    def __init__(self) -> None:
        self._seqs: set[int] = set()
        self._lock = threading.Lock()

    def claim(self, seq: int) -> bool:
        """True for the first worker to report the item in this run."""
        with self._lock:
            if seq in self._seqs:
                return False
            self._seqs.add(seq)
            return True

    def seqs(self) -> list[int]:
        with self._lock:
            return sorted(self._seqs)


class _Drain:
    """One drain's connection, model and counters; batches until the inbox is empty."""

    def __init__(
        self,
        conn: psycopg.Connection,
        embedder: EmbeddingResource,
        report: DrainReport,
        batch_size: int,
        max_attempts: int,
        max_input_chars: int,
        failed: _Failed,
    ) -> None:
        self.conn = conn
        self.embedder = embedder
        self.report = report
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.max_input_chars = max_input_chars
        self.failed = failed

    def batch(self, seqs: list[int] | None = None) -> int:
        """Take, store and settle one batch (or the given items) in one transaction;
        the items taken. A failing item is found by halving and counted an attempt."""
        taken: list[int] = []
        try:
            with self.conn.transaction():
                if seqs is None:
                    params = {"skip": self.failed.seqs(), "limit": self.batch_size}
                    rows = self.conn.execute(query("inbox_take_batch"), params).fetchall()
                else:
                    rows = self.conn.execute(query("inbox_take_items"), {"seqs": seqs}).fetchall()
                taken = [row[0] for row in rows]
                if rows:
                    self._store([_item(row) for row in rows])
        except _ITEM_ERRORS as error:
            if not taken:
                raise
            if len(taken) == 1:
                self._failed(taken[0], error)
                return 1
            half = len(taken) // 2
            self.batch(taken[:half])
            self.batch(taken[half:])
        return len(taken)

    def _store(self, items: list[InboxItem]) -> None:
        started = time.perf_counter()
        records = [record_for(item) for item in items]
        hashes = [content_hash(record.full_conversation) for record in records]
        vectors, fresh, embed_seconds = self._vectors(records, hashes)
        result = upsert_conversations(self.conn, records, source=SOURCE)
        refused = {reject.record_key: reject.reason for reject in result.rejects}
        stored: list[int] = []
        rejected: list[int] = []
        reasons: list[str] = []
        for item, record in zip(items, records, strict=True):
            reason = refused.get(record.record_key)
            if reason is None:
                stored.append(item.seq)
            else:
                rejected.append(item.seq)
                reasons.append(reason)
                self.report.rejects.append((record.record_key, reason))
        embedded = self._save_vectors(records, hashes, vectors, fresh, stored, items)
        row = self.conn.execute(
            query("inbox_settle_batch"),
            {
                "stored": stored,
                "rejected": rejected,
                "reasons": reasons,
                "batch_seconds": time.perf_counter() - started,
                "embed_seconds": embed_seconds,
                "attempt_counted": False,
            },
        ).fetchone()
        self.report.pending_left = int(row[0]) if row else 0
        self.report.stored += len(stored)
        self.report.rejected += len(rejected)
        self.report.embedded += embedded
        self.report.batches += 1

    def _vectors(
        self, records: Sequence[ConversationRecord], hashes: Sequence[bytes]
    ) -> tuple[dict[bytes, Any], set[bytes], float | None]:
        """Each text's vector, from the persistent cache, else from the model (those
        are `fresh`: new cache entries); the seconds spent in the model."""
        unique = list(dict.fromkeys(hashes))
        vectors: dict[bytes, Any] = {
            bytes(h): vector
            for h, vector in self.conn.execute(
                query("embedding_cache_lookup"), {"model": self.report.model, "hashes": unique}
            )
        }
        self.report.cache_hits += sum(1 for h in hashes if h in vectors)
        texts: dict[bytes, str] = {}
        for record, key in zip(records, hashes, strict=True):
            if key not in vectors and key not in texts:
                texts[key] = (record.full_conversation or "")[: self.max_input_chars]
        if not texts:
            return vectors, set(), None
        begun = time.perf_counter()
        computed, refused = embed_each(self.embedder, list(texts.values()))
        seconds = time.perf_counter() - begun
        self.report.embed_seconds += seconds
        self.report.texts_sent += len(texts)
        self.report.refused += len(refused)
        for key, values in zip(texts, computed, strict=True):
            vectors[key] = None if values is None else _vector(values)
        # A refused text is stored without a vector and not cached (another may pass).
        keys = list(texts)
        return vectors, set(texts) - {keys[i] for i in refused}, seconds

    def _save_vectors(
        self,
        records: Sequence[ConversationRecord],
        hashes: Sequence[bytes],
        vectors: dict[bytes, Any],
        fresh: set[bytes],
        stored: list[int],
        items: Sequence[InboxItem],
    ) -> int:
        """The stored conversations' vectors (and the cache's new entries), in the
        batch's transaction, through the embedding step's own statements."""
        keep = set(stored)
        self.conn.execute(query("create_embedding_stage"))
        with self.conn.cursor() as cur:
            with cur.copy(query("copy_embedding_stage")) as copy:
                copy.set_types(["uuid", "bytea", "vector", "bool"])
                for item, record, key in zip(items, records, hashes, strict=True):
                    if item.seq in keep:
                        copy.write_row((record.id, key, vectors[key], key in fresh))
            row = cur.execute(query("save_embeddings"), {"model": self.report.model}).fetchone()
        return int(row[0]) if row else 0

    def _failed(self, seq: int, error: Exception) -> None:
        """An item that failed alone: one attempt more, or moved aside at the last."""
        if not self.failed.claim(seq):  # another worker of this run counted it
            return
        message = error.diag.message_primary if isinstance(error, psycopg.Error) else None
        reason = f"{type(error).__name__}: {(message or str(error)).strip()}"[:2000]
        with self.conn.transaction():
            row = self.conn.execute(
                query("inbox_record_failure"), {"seq": seq, "reason": reason}
            ).fetchone()
            if row is None:  # another drain holds it now, or it is gone
                return
            if row[0] >= self.max_attempts:
                moved = f"failed {row[0]} times; last error: {reason}"
                self.conn.execute(
                    query("inbox_settle_batch"),
                    {
                        "stored": [],
                        "rejected": [seq],
                        "reasons": [moved],
                        "batch_seconds": None,
                        "embed_seconds": None,
                        "attempt_counted": True,
                    },
                )
                self.report.rejected += 1
                self.report.rejects.append((str(seq), moved))
                return
        self.report.failed_attempts += 1


def drain(
    pool: ConnectionPool,
    embedder: EmbeddingResource,
    *,
    batch_size: int = 1000,
    max_batches: int | None = None,
    max_attempts: int = 5,
    max_input_chars: int = 8000,
    max_pending: int | None = None,
    workers: int = 1,
    progress: ProgressLog | None = None,
) -> DrainReport:
    """Store the inbox's conversations, oldest first, until it is empty (or
    `max_batches` ran). Several drains may run at once: each takes other items.

    `workers` connections drain side by side (one transaction each, disjoint items):
    while one waits on the database, another analyses and embeds its batch, so a
    drain uses more than one core. `max_pending` (INBOX_MAX_PENDING) is written to
    the database first, where the enqueue function reads it. Fails before any write
    when the model's dimension is not the column's.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    report = DrainReport(model=embedding_model_key(embedder))
    with pool.connection() as conn:
        dimension = column_dimension(conn)
        check_dimension(embedder.dimension(), dimension, "conversations", "embedding")
        if max_pending is not None:
            set_max_pending(conn, max_pending)
        with conn.transaction():
            # The model in force, as the embedding step records it (a change re-queues
            # the stored vectors for that step).
            conn.execute(
                query("embedding_model_change"), {"model": report.model, "dimension": dimension}
            )
        lanes = [DrainReport(model=report.model) for _ in range(workers)]
        failed = _Failed()
        budget = itertools.count() if max_batches is None else iter(range(max_batches))
        guard = threading.Lock()

        def run(lane: int, lane_conn: psycopg.Connection) -> None:
            work = _Drain(
                lane_conn, embedder, lanes[lane], batch_size, max_attempts, max_input_chars, failed
            )
            while True:
                with guard:
                    if next(budget, None) is None:
                        return
                if not work.batch():
                    return
                say(
                    f"worker {lane}: batch {lanes[lane].batches}, {lanes[lane].stored} stored, "
                    f"{lanes[lane].rejected} rejected, about {lanes[lane].pending_left} left"
                )

        def pooled(lane: int) -> None:
            with pool.connection() as lane_conn:
                run(lane, lane_conn)

        with ThreadPoolExecutor(max_workers=max(workers - 1, 1)) as helpers:
            others = [helpers.submit(pooled, lane) for lane in range(1, workers)]
            failure: BaseException | None = None
            try:
                run(0, conn)
            except BaseException as error:  # the other lanes still finish their batch
                failure = error
            for future in others:
                try:
                    future.result()
                except BaseException as error:
                    failure = failure or error
        for lane in lanes:
            report.add(lane)
        if failure is not None:
            raise failure
        report.pending_left = recount(conn)
    report.seconds = time.perf_counter() - started
    return report
