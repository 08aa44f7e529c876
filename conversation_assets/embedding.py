"""Embedding conversations: a step of its own that drains a backlog in batches.

A conversation waits for a vector while its `content_hash` differs from its
`embedding_hash`. Each batch looks its texts up in the persistent
`embedding_cache` (keyed by model and text hash), sends only the misses to the
model, outside any transaction, then stores cache entries and vectors in one
transaction. A slow remote model therefore delays vectors, never discovery or
the conversations themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import psycopg
from pgvector import Vector
from psycopg_pool import ConnectionPool

from conversation_assets import locks, settings
from conversation_assets.queries import query
from resources import embedding_resource
from resources.embeddings import EmbeddingResource, check_dimension, embed_each

ProgressLog = Callable[[str], None]


@dataclass
class EmbedReport:
    model: str
    dimension: int
    embedded: int = 0
    cache_hits: int = 0
    model_calls: int = 0
    texts_sent: int = 0
    empty: int = 0
    refused: int = 0  # texts the model refused (stored without a vector)
    last_refusal: str | None = None
    batches: int = 0
    requeued_for_model_change: int = 0
    backlog_left: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0
    skipped_reason: str | None = None

    @property
    def texts_per_second(self) -> float:
        return self.texts_sent / self.embed_seconds if self.embed_seconds else 0.0


def configured_dimension() -> int:
    """N of the vector(N) column to create: EMBEDDING_DIMENSION, else the model's."""
    current = settings.load()
    if current.embedding_dimension is not None:
        return current.embedding_dimension
    embedder = embedding_resource(current, for_dagster=False)
    try:
        return embedder.dimension()
    except Exception as error:  # noqa: BLE001 - any failure gets the same advice
        raise settings.SettingError(
            f"cannot ask the {embedder.backend} model {embedder.model_name!r} for its "
            f"dimension ({error}); set EMBEDDING_DIMENSION to create the embedding column."
        ) from error


def embedding_model_key(embedder: EmbeddingResource) -> str:
    """The cache's model key: backend and model, so two backends never share vectors."""
    return f"{embedder.backend}:{embedder.model_name}"


def column_dimension(conn: psycopg.Connection) -> int:
    row = conn.execute(query("embedding_column_dimension")).fetchone()
    if row is None or row[0] is None or row[0] < 1:
        raise RuntimeError("conversations.embedding has no vector dimension; run migrate")
    return int(row[0])


def backlog_size(conn: psycopg.Connection) -> int:
    row = conn.execute(query("embedding_backlog_count")).fetchone()
    return int(row[0]) if row else 0


def _vector(values: np.ndarray) -> Vector | None:
    """A stored vector, or None for a text that embeds to nothing (cosine undefined)."""
    if not np.any(values):
        return None
    return Vector(values.astype(np.float32, copy=False))


def embed_backlog(
    pool: ConnectionPool,
    embedder: EmbeddingResource,
    *,
    batch_size: int = 512,
    max_batches: int | None = None,
    max_input_chars: int = 8000,
    progress: ProgressLog | None = None,
) -> EmbedReport:
    """Embed waiting conversations until the backlog is empty or `max_batches` ran.

    Fails before any write when the model's dimension is not the column's.
    Texts are cut to `max_input_chars` (a conversation's opening states its topic;
    remote models have context limits).
    """
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    model = embedding_model_key(embedder)
    with pool.connection() as conn:
        dimension = column_dimension(conn)
        check_dimension(embedder.dimension(), dimension, "conversations", "embedding")
        report = EmbedReport(model=model, dimension=dimension)
        # One drain at a time: two would embed the same texts twice.
        with locks.session_lock(conn, "conversation_embeddings", wait=False) as locked:
            if not locked:
                report.skipped_reason = "another embedding run is draining the backlog"
                say(report.skipped_reason)
                report.backlog_left = backlog_size(conn)
                return report
            with conn.transaction():
                change = conn.execute(
                    query("embedding_model_change"), {"model": model, "dimension": dimension}
                ).fetchone()
            if change and change[0] is not None and change[0] != model:
                report.requeued_for_model_change = int(change[1])
                say(
                    f"embedding model changed from {change[0]} to {model}: "
                    f"{change[1]} conversations queued to be embedded again"
                )
            while max_batches is None or report.batches < max_batches:
                if not _embed_batch(conn, embedder, report, batch_size, max_input_chars):
                    break
                say(
                    f"batch {report.batches}: {report.embedded} embedded so far "
                    f"({report.cache_hits} from the cache, {report.texts_sent} sent to {model})"
                )
            report.backlog_left = backlog_size(conn)
    report.seconds = time.perf_counter() - started
    return report


def _embed_batch(
    conn: psycopg.Connection,
    embedder: EmbeddingResource,
    report: EmbedReport,
    batch_size: int,
    max_input_chars: int,
) -> bool:
    rows = conn.execute(query("embedding_backlog_batch"), {"limit": batch_size}).fetchall()
    if not rows:
        return False
    hashes = list({bytes(row[1]) for row in rows})
    cached = {
        bytes(h): vector
        for h, vector in conn.execute(
            query("embedding_cache_lookup"), {"model": report.model, "hashes": hashes}
        )
    }
    texts: dict[bytes, str] = {}
    for _, text_hash, text in rows:
        key = bytes(text_hash)
        if key not in cached and key not in texts:
            texts[key] = (text or "")[:max_input_chars]
    fresh: dict[bytes, Vector | None] = {}
    to_send = {k: t for k, t in texts.items() if t.strip()}
    fresh.update({k: None for k in texts if k not in to_send})
    report.empty += len(texts) - len(to_send)
    refused: set[bytes] = set()
    if to_send:
        begun = time.perf_counter()
        keys = list(to_send)
        vectors, refusals = embed_each(embedder, list(to_send.values()))
        report.embed_seconds += time.perf_counter() - begun
        report.model_calls += 1
        report.texts_sent += len(to_send)
        for key, values in zip(keys, vectors, strict=True):
            if values is None:
                continue
            if values.shape[0] != report.dimension:
                check_dimension(values.shape[0], report.dimension, "conversations", "embedding")
            fresh[key] = _vector(values)
        # Stored without a vector and not cached: another text, or model, may pass.
        refused = {keys[i] for i in refusals}
        report.refused += len(refusals)
        if refusals:
            report.last_refusal = next(iter(refusals.values()))
    with conn.transaction():
        conn.execute(query("create_embedding_stage"))
        with conn.cursor() as cur:
            with cur.copy(query("copy_embedding_stage")) as copy:
                copy.set_types(["uuid", "bytea", "vector", "bool"])
                for conversation, text_hash, _ in rows:
                    key = bytes(text_hash)
                    if key in refused:
                        copy.write_row((conversation, key, None, False))
                        continue
                    is_fresh = key in fresh
                    vector = fresh[key] if is_fresh else cached[key]
                    copy.write_row((conversation, key, vector, is_fresh))
            saved = cur.execute(query("save_embeddings"), {"model": report.model}).fetchone()
    report.embedded += int(saved[0]) if saved else 0
    report.cache_hits += sum(1 for _, h, _ in rows if bytes(h) in cached)
    report.batches += 1
    return True
