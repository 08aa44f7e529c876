"""The product's queries: list, get, semantic search, soft delete, status, tags, stats.

The list with filters and tags a chat product's conversation page needs, and
its per-user lookups, over the pipeline's `conversations` table. Every function
takes the client first and every statement is keyed by it (tenancy is an
invariant, not a filter the caller may forget); list and search never return
soft-deleted rows. SQL lives in ``sql/reads.sql``; values always travel as
parameters. A wrong argument is a ValueError naming it (``arguments``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from conversation_assets import arguments
from conversation_assets.queries import query
from conversation_assets.search_indexes import MIN_VECTORS
from conversation_assets.store import STATUSES
from resources.embeddings import EmbeddingResource

# What the product may set: closed and archived are kept by rebuilds; active
# reopens a conversation (the pipeline's next build sets its own status again).
PRODUCT_STATUSES = ("active", "closed", "archived")
MAX_PAGE_SIZE = 500
MAX_K = 1000
MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
# A client under this many rows (the planner's estimate) is ranked exactly; at and
# over it, it has an HNSW index of its own (search_indexes.MIN_VECTORS says why).
EXACT_BELOW = MIN_VECTORS
MAX_TAG_LENGTH = 100  # conversation_tags' check constraint
SEARCH_SEPARATOR = "\x1f"  # between the parts of conversation_search_text (migration 0007)


@dataclass
class ConversationSummary:
    """One conversation as the product shows it (transcript only when asked)."""

    id: uuid.UUID
    client_code: str
    crew_code: str
    session_id: str
    user_id: str
    channel: str
    status: str
    summary: str | None
    message_count: int
    sentiment: float | None
    language: str | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    last_message_at: datetime | None
    tags: list[str] = field(default_factory=list)
    full_conversation: str | None = None
    # Only ever set by get_conversation(include_deleted=True).
    deleted_at: datetime | None = None


@dataclass
class ConversationPage:
    items: list[ConversationSummary]
    total: int
    page: int
    page_size: int
    pages: int


@dataclass
class SearchHit:
    conversation: ConversationSummary
    distance: float  # cosine distance: 0 same direction, 2 opposite


def _summary(row: Sequence[Any]) -> ConversationSummary:
    """A row of the `reads_columns` block (in its order) as a summary."""
    (
        id_,
        client_code,
        crew_code,
        session_id,
        user_id,
        channel,
        status,
        summary,
        message_count,
        sentiment,
        language,
        metadata,
        created_at,
        updated_at,
        last_message_at,
        deleted_at,
        full_conversation,
        tags,
    ) = row
    return ConversationSummary(
        id=id_,
        client_code=client_code,
        crew_code=crew_code,
        session_id=session_id,
        user_id=user_id,
        channel=channel,
        status=status,
        summary=summary,
        message_count=message_count,
        sentiment=sentiment,
        language=language,
        metadata=metadata,
        created_at=created_at,
        updated_at=updated_at,
        last_message_at=last_message_at,
        tags=list(tags),
        full_conversation=full_conversation,
        deleted_at=deleted_at,
    )


def _columns() -> sql.Composed:
    return query("reads_columns")


def _uuid(conversation_id: uuid.UUID | str) -> uuid.UUID:
    """A clear error for an id that is not a UUID, instead of a database error."""
    if isinstance(conversation_id, uuid.UUID):
        return conversation_id
    try:
        return uuid.UUID(str(conversation_id))
    except ValueError:
        raise ValueError(f"conversation_id {conversation_id!r} is not a UUID") from None


def _like_pattern(search: str) -> str:
    """A substring pattern matching `search` literally (%, _ and \\ escaped).

    The searched text joins its parts with U+001F (conversation_search_text), so a
    search holding it could match across two parts: it is refused.
    """
    if SEARCH_SEPARATOR in search:
        raise ValueError("search must not contain the control character U+001F")
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _clean_tags(
    tags: Iterable[str] | None, name: str = "tags", optional: bool = False
) -> list[str]:
    """Trimmed, non-empty, unique (first occurrence order) tags; a filter may be None."""
    cleaned: dict[str, None] = {}
    for tag in arguments.strings(name, tags, optional=optional):
        tag = tag.strip()
        if not tag:
            continue
        if len(tag) > MAX_TAG_LENGTH:
            raise ValueError(f"tag {tag[:20]!r}... is longer than {MAX_TAG_LENGTH} characters")
        cleaned[tag] = None
    return list(cleaned)


def _list_statement(
    client_code: str,
    *,
    user_id: str | None = None,
    channel: str | None = None,
    status: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    search: str | None = None,
    include_tags: Iterable[str] | None = (),
    exclude_tags: Iterable[str] | None = (),
    page: int = 1,
    page_size: int = 50,
    with_transcript: bool = False,
) -> tuple[sql.Composed, dict[str, Any]]:
    """The validated list statement and its parameters (also what tests EXPLAIN)."""
    arguments.text("client_code", client_code)
    arguments.text("user_id", user_id, optional=True)
    arguments.text("channel", channel, optional=True)
    arguments.text("search", search, optional=True)
    arguments.whole_number("page", page, 1)
    arguments.whole_number("page_size", page_size, 1, MAX_PAGE_SIZE)
    arguments.flag("with_transcript", with_transcript)
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    arguments.aware_time("start", start)
    arguments.aware_time("end", end)
    if start is not None and end is not None and not start < end:
        raise ValueError(f"start ({start.isoformat()}) must be before end ({end.isoformat()})")
    params = {
        "client_code": client_code,
        "user_id": user_id,
        "channel": channel,
        "status": status,
        "start": start,
        "end": end,
        "pattern": _like_pattern(search) if search else None,
        "include_tags": _clean_tags(include_tags, "include_tags", optional=True),
        "exclude_tags": _clean_tags(exclude_tags, "exclude_tags", optional=True),
        "limit": page_size,
        "offset": (page - 1) * page_size,
        "with_transcript": with_transcript,
    }
    return query("reads_list_conversations", columns=_columns()), params


def list_conversations(
    conn: psycopg.Connection,
    client_code: str,
    *,
    user_id: str | None = None,
    channel: str | None = None,
    status: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    search: str | None = None,
    include_tags: Iterable[str] | None = (),
    exclude_tags: Iterable[str] | None = (),
    page: int = 1,
    page_size: int = 50,
    with_transcript: bool = False,
) -> ConversationPage:
    """A page of the client's live conversations, newest first, with the total.

    One statement returns the page, its tags and the count of all matches.
    `start` is inclusive, `end` exclusive (on created_at); `search` is a
    case-insensitive literal substring of summary, transcript or user_id;
    `include_tags` keeps conversations with any of them, `exclude_tags` drops
    those with any of them.
    """
    statement, params = _list_statement(
        client_code,
        user_id=user_id,
        channel=channel,
        status=status,
        start=start,
        end=end,
        search=search,
        include_tags=include_tags,
        exclude_tags=exclude_tags,
        page=page,
        page_size=page_size,
        with_transcript=with_transcript,
    )
    rows = conn.execute(statement, params, prepare=False).fetchall()
    total = int(rows[0][0]) if rows else 0
    items = [_summary(row[1:]) for row in rows if row[1] is not None]
    return ConversationPage(
        items=items,
        total=total,
        page=page,
        page_size=page_size,
        pages=math.ceil(total / page_size),
    )


def get_conversation(
    conn: psycopg.Connection,
    client_code: str,
    conversation_id: uuid.UUID | str,
    *,
    include_deleted: bool = False,
    with_transcript: bool = True,
) -> ConversationSummary | None:
    """One conversation of this client (None when absent, another client's or deleted)."""
    arguments.text("client_code", client_code)
    arguments.flag("include_deleted", include_deleted)
    arguments.flag("with_transcript", with_transcript)
    row = conn.execute(
        query("reads_get_conversation", columns=_columns()),
        {
            "id": _uuid(conversation_id),
            "client_code": client_code,
            "include_deleted": include_deleted,
            "with_transcript": with_transcript,
        },
    ).fetchone()
    return _summary(row) if row else None


def _query_vector(query_vector: Any) -> np.ndarray:
    vector = np.asarray(query_vector, dtype=np.float32)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"query_vector must be one non-empty vector, got shape {vector.shape}")
    if not np.isfinite(vector).all():
        raise ValueError("query_vector contains NaN or infinite values")
    return vector


def _vector_text(vector: np.ndarray) -> str:
    """pgvector's text form: works whether or not the connection registered the adapter."""
    return "[" + ",".join(map(repr, vector.tolist())) + "]"


def _check_k(k: int) -> None:
    arguments.whole_number("k", k, 1, MAX_K)


def _nearest(
    conn: psycopg.Connection,
    settings: sql.Composed,
    settings_params: dict[str, Any],
    client_code: str,
    query_vector: Any,
    *,
    k: int,
    user_id: str | None,
    channel: str | None,
    explain: bool = False,
    exact_below: int = 0,
) -> list[SearchHit] | str:
    """Apply the transaction's settings, check the dimension, run the nearest query.

    With `exact_below`, a search filtered to one user, or to a client the planner
    estimates at fewer rows than that, ranks those rows exactly instead of asking
    the HNSW index (whose filtered scan would read far past k for them).
    """
    arguments.text("client_code", client_code)
    arguments.text("user_id", user_id, optional=True)
    arguments.text("channel", channel, optional=True)
    arguments.whole_number("exact_below", exact_below, 0)
    _check_k(k)
    vector = _query_vector(query_vector)
    params = {
        "query": _vector_text(vector),
        "client_code": client_code,
        "user_id": user_id,
        "channel": channel,
        "k": k,
        "with_transcript": False,
    }
    with conn.transaction():
        row = conn.execute(settings, settings_params).fetchone()
        assert row is not None, "the settings statement returns one row"
        dimension = row[-1]
        if dimension is None or dimension < 1:
            raise ValueError("conversations.embedding has no fixed dimension (vector without N)")
        if vector.size != dimension:
            raise ValueError(
                f"query_vector has {vector.size} dimensions but conversations.embedding is "
                f"vector({dimension})"
            )
        client_rows = None if row[-2] is None else float(row[-2])
        exact = client_rows is not None and (user_id is not None or client_rows < exact_below)
        order = sql.SQL("(c.embedding <=> %(query)s::vector) + 0" if exact else "distance")
        statement = query("reads_nearest", columns=_columns(), order=order)
        if explain:
            statement = sql.SQL("EXPLAIN (COSTS OFF) ") + statement
        rows = conn.execute(statement, params, prepare=False).fetchall()
    if explain:
        return "\n".join(r[0] for r in rows)
    return [SearchHit(conversation=_summary(r[1:]), distance=float(r[0])) for r in rows]


def _search_settings(ef_search: int, max_scan_tuples: int, client_code: str) -> dict[str, Any]:
    arguments.whole_number("ef_search", ef_search, 1, MAX_EF_SEARCH)
    arguments.whole_number("max_scan_tuples", max_scan_tuples, 1, 2**31 - 1)
    return {
        "ef_search": str(ef_search),
        "max_scan_tuples": str(max_scan_tuples),
        "client_code": client_code,
    }


def semantic_search(
    conn: psycopg.Connection,
    client_code: str,
    query_vector: Any,
    *,
    k: int = 10,
    user_id: str | None = None,
    channel: str | None = None,
    ef_search: int = 40,
    max_scan_tuples: int = 20000,
    exact_below: int = EXACT_BELOW,
) -> list[SearchHit]:
    """The client's k live conversations nearest (cosine) to `query_vector`, nearest first.

    Approximate, through the client's own HNSW index when conversation_search_indexes
    gave it one (the planner picks it), else the shared one, which holds every
    client's vectors: the scan is iterative, reading on until k rows pass the
    filters or `max_scan_tuples` were read (then fewer than k may come back). A search for
    one user, or in a client the planner's statistics put under `exact_below`
    rows, ranks those rows exactly through their btree index instead: there the
    filtered HNSW scan would read far past k, and the exact ranking is cheaper.
    """
    hits = _nearest(
        conn,
        query("reads_search_settings"),
        _search_settings(ef_search, max_scan_tuples, client_code),
        client_code,
        query_vector,
        k=k,
        user_id=user_id,
        channel=channel,
        exact_below=exact_below,
    )
    assert isinstance(hits, list)
    return hits


def semantic_search_text(
    conn: psycopg.Connection,
    embedder: EmbeddingResource,
    client_code: str,
    text: str,
    **kwargs: Any,
) -> list[SearchHit]:
    """Embed `text` with the model the stored vectors come from, then semantic_search."""
    vectors = embedder.embed([text])
    return semantic_search(conn, client_code, vectors[0], **kwargs)


def exact_search(
    conn: psycopg.Connection,
    client_code: str,
    query_vector: Any,
    *,
    k: int = 10,
    user_id: str | None = None,
    channel: str | None = None,
) -> list[SearchHit]:
    """The exact top k (no index: every candidate's distance), the ground truth for recall."""
    hits = _nearest(
        conn,
        query("reads_exact_settings"),
        {},
        client_code,
        query_vector,
        k=k,
        user_id=user_id,
        channel=channel,
    )
    assert isinstance(hits, list)
    return hits


def explain_search(
    conn: psycopg.Connection,
    client_code: str,
    query_vector: Any,
    *,
    exact: bool = False,
    k: int = 10,
    user_id: str | None = None,
    channel: str | None = None,
    ef_search: int = 40,
    max_scan_tuples: int = 20000,
    exact_below: int = EXACT_BELOW,
) -> str:
    """The plan semantic_search (or exact_search) runs, with the same settings: to check
    in production that the HNSW index is used."""
    if exact:
        settings, settings_params = query("reads_exact_settings"), {}
    else:
        settings = query("reads_search_settings")
        settings_params = _search_settings(ef_search, max_scan_tuples, client_code)
    plan = _nearest(
        conn,
        settings,
        settings_params,
        client_code,
        query_vector,
        k=k,
        user_id=user_id,
        channel=channel,
        explain=True,
        exact_below=exact_below,
    )
    assert isinstance(plan, str)
    return plan


def soft_delete(
    conn: psycopg.Connection, client_code: str, conversation_id: uuid.UUID | str
) -> bool:
    """Hide a live conversation (kept, restorable); False when absent or already deleted."""
    arguments.text("client_code", client_code)
    row = conn.execute(
        query("reads_soft_delete"), {"id": _uuid(conversation_id), "client_code": client_code}
    ).fetchone()
    return row is not None


def restore(conn: psycopg.Connection, client_code: str, conversation_id: uuid.UUID | str) -> bool:
    """Undo soft_delete. A conversation whose source rows are gone is not restored
    (False), whoever deleted it first: it comes back by itself when they do."""
    arguments.text("client_code", client_code)
    row = conn.execute(
        query("reads_restore"), {"id": _uuid(conversation_id), "client_code": client_code}
    ).fetchone()
    return row is not None


def set_status(
    conn: psycopg.Connection, client_code: str, conversation_id: uuid.UUID | str, status: str
) -> bool:
    """Set a live conversation's status to one of PRODUCT_STATUSES; False when not found."""
    arguments.text("client_code", client_code)
    if not isinstance(status, str) or status not in PRODUCT_STATUSES:
        raise ValueError(
            f"status {status!r} is not one the product sets ({', '.join(PRODUCT_STATUSES)})"
        )
    row = conn.execute(
        query("reads_set_status"),
        {"id": _uuid(conversation_id), "client_code": client_code, "status": status},
    ).fetchone()
    return row is not None


def _change_tags(
    conn: psycopg.Connection,
    statement: str,
    client_code: str,
    conversation_id: uuid.UUID | str,
    tags: Iterable[str],
) -> int:
    arguments.text("client_code", client_code)
    cleaned = _clean_tags(tags)
    if not cleaned:
        return 0
    rows = conn.execute(
        query(statement),
        {"id": _uuid(conversation_id), "client_code": client_code, "tags": cleaned},
    ).fetchall()
    return len(rows)


def add_tags(
    conn: psycopg.Connection,
    client_code: str,
    conversation_id: uuid.UUID | str,
    tags: Iterable[str],
) -> int:
    """Tag a live conversation of this client; returns how many tags were new."""
    return _change_tags(conn, "reads_add_tags", client_code, conversation_id, tags)


def remove_tags(
    conn: psycopg.Connection,
    client_code: str,
    conversation_id: uuid.UUID | str,
    tags: Iterable[str],
) -> int:
    """Remove tags from a conversation of this client; returns how many were removed."""
    return _change_tags(conn, "reads_remove_tags", client_code, conversation_id, tags)


def conversation_stats(
    conn: psycopg.Connection, client_code: str, user_id: str, days: int = 30
) -> dict[str, Any]:
    """One user's figures over the last `days` days: totals, active, embedded, handed off
    and the daily average (the SQL function get_conversation_stats)."""
    arguments.text("client_code", client_code)
    arguments.text("user_id", user_id)
    arguments.whole_number("days", days, 1)
    row = conn.execute(
        query("reads_conversation_stats"),
        {"client_code": client_code, "user_id": user_id, "days": days},
    ).fetchone()
    assert row is not None, "get_conversation_stats returns one row"
    total, active, with_embeddings, handoff_complete, avg_per_day = row
    return {
        "total_conversations": int(total),
        "active_conversations": int(active),
        "with_embeddings": int(with_embeddings),
        "handoff_complete": int(handoff_complete),
        "avg_per_day": float(avg_per_day),
    }
