"""The tests' data: histories rows (written and recounted), conversation records,
vectors, and running the pipeline over them.

Two record factories: `record` (acme's crew "crew", created on the fixed `DAY`) for
the write path, the builder, embeddings and enrichment; `recent_record` (acme's
"crew-a", created an hour before `NOW`) for the reads, whose windows count back
from now (test_reads and test_search_indexes import it as `record`).
"""

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from conversation_assets.conversations import BuildReport, build_conversations
from conversation_assets.demo import create_histories_table
from conversation_assets.discovery import discover
from conversation_assets.store import ConversationRecord, upsert_conversations
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource
from resources.summarizer import SummarizerResource

DAY = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
NOW = datetime.now(UTC).replace(microsecond=0)
DIM = 256  # the migrated embedding column (the local model's dimension)


# --- histories tables ---------------------------------------------------------------


def add_crew(
    conn: psycopg.Connection, crew_code: str, client_code: str, table: str, shape: str
) -> None:
    create_histories_table(conn, table, shape)
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES (%s, %s, %s)",
        (crew_code, client_code, table),
    )


def table_id(table: str) -> sql.Identifier:
    return sql.Identifier(*table.split("."))


def message(shape: str, kind: str, content: str) -> dict:
    if shape == "langchain":
        return {"type": kind, "data": {"content": content, "type": kind, "additional_kwargs": {}}}
    return {"type": kind, "content": content, "additional_kwargs": {}, "response_metadata": {}}


def insert(
    conn: psycopg.Connection,
    table: str,
    shape: str,
    rows: Iterable[tuple[str, str] | tuple[str, str, datetime]],
) -> list[int]:
    """Insert (session_id, type[, created_at]) rows in order; return their ids."""
    ids = []
    for row in rows:
        session_id, kind = row[0], row[1]
        body = json.dumps(message(shape, kind, f"{kind} says héllo 👋 {session_id}"))
        if len(row) == 3 and shape != "n8n":
            query = sql.SQL(
                "INSERT INTO {} (session_id, message, created_at) VALUES (%s, %s, %s) RETURNING id"
            ).format(table_id(table))
            ids.append(conn.execute(query, (session_id, body, row[2])).fetchone()[0])
        else:
            query = sql.SQL(
                "INSERT INTO {} (session_id, message) VALUES (%s, %s) RETURNING id"
            ).format(table_id(table))
            ids.append(conn.execute(query, (session_id, body)).fetchone()[0])
    return ids


def say(conn, table, session_id, kind, content, at=None, **kwargs):
    """One histories row in langchain-js/n8n shape (top-level content), with kwargs."""
    body = {"type": kind, "content": content, "additional_kwargs": kwargs}
    if at is None:
        statement = sql.SQL("INSERT INTO {} (session_id, message) VALUES (%s, %s) RETURNING id")
        params: tuple = (session_id, json.dumps(body))
    else:
        statement = sql.SQL(
            "INSERT INTO {} (session_id, message, created_at) VALUES (%s, %s, %s) RETURNING id"
        )
        params = (session_id, json.dumps(body), at)
    return conn.execute(statement.format(table_id(table)), params).fetchone()[0]


def recount(conn: psycopg.Connection, table: str, has_created_at: bool) -> dict[str, tuple]:
    """Exact session aggregates straight from the source (the oracle)."""
    created = sql.SQL("created_at") if has_created_at else sql.SQL("NULL::timestamptz")
    query = sql.SQL(
        """SELECT session_id::text, count(*)::int,
                  (count(*) FILTER (WHERE message->>'type' = 'human'))::int,
                  (count(*) FILTER (WHERE message->>'type' = 'ai'))::int,
                  min(id)::bigint, max(id)::bigint, min({created}), max({created})
           FROM {table}
           WHERE session_id IS NOT NULL AND session_id::text <> ''
             AND jsonb_typeof(message) = 'object' AND message ? 'type'
           GROUP BY 1"""
    ).format(created=created, table=table_id(table))
    return {row[0]: tuple(row[1:]) for row in conn.execute(query)}


def stored(conn: psycopg.Connection, crew_code: str, *, with_times: bool) -> dict[str, tuple]:
    """Live discovered sessions of a crew, in recount()'s shape."""
    rows = conn.execute(
        """SELECT session_id, message_count, human_message_count, ai_message_count,
                  first_message_id, last_message_id, started_at, ended_at
           FROM discovered_sessions WHERE crew_code = %s AND deleted_at IS NULL""",
        (crew_code,),
    )
    return {
        row[0]: tuple(row[1:]) if with_times else tuple(row[1:6]) + (None, None) for row in rows
    }


def stats_flush(conn: psycopg.Connection) -> None:
    """Make this backend's table counters visible now (they are flushed lazily)."""
    conn.execute("SELECT pg_stat_force_next_flush()")


# --- running the pipeline -------------------------------------------------------------


def run_pipeline(postgres: PostgresResource, **build) -> BuildReport:
    """Discovery (reconciling at once), then one build of conversations."""
    discover(postgres.pool, reconcile_after=timedelta(0))
    return build_conversations(postgres.pool, **build)


def pipeline_resources(postgres: PostgresResource) -> dict:
    """The resources the conversation assets run with: the test's database, the
    extractive summarizer and the local embedding model."""
    return {
        "postgres": postgres,
        "summarizer": SummarizerResource(),
        "embeddings": EmbeddingResource(),
    }


# --- conversations --------------------------------------------------------------------


def record(session_id="s1", **changes) -> ConversationRecord:
    base = {
        "client_code": "acme",
        "crew_code": "crew",
        "session_id": session_id,
        "user_id": "u1",
        "full_conversation": f"User: hello from {session_id}\nAssistant: hi!",
        "summary": f"hello from {session_id}",
        "metadata": {"language": "en"},
        "message_count": 2,
        "created_at": DAY,
    }
    return ConversationRecord(**{**base, **changes})


def recent_record(session_id: str, **changes: object) -> ConversationRecord:
    base: dict[str, object] = {
        "client_code": "acme",
        "crew_code": "crew-a",
        "session_id": session_id,
        "user_id": "u1",
        "full_conversation": f"User: hello from {session_id}\nAssistant: hi!",
        "summary": f"hello from {session_id}",
        "metadata": {"language": "en"},
        "message_count": 2,
        "created_at": NOW - timedelta(hours=1),
    }
    base.update(changes)
    return ConversationRecord(**base)  # type: ignore[arg-type]


def store(conn: psycopg.Connection, *records: ConversationRecord) -> list:
    """Write the records (none may be rejected); return their conversation ids."""
    report = upsert_conversations(conn, records)
    assert not report.rejects, report.rejects
    return [r.id for r in records]


def rows(conn, columns="session_id, summary, status, deleted_at IS NOT NULL"):
    return conn.execute(
        sql.SQL("SELECT {} FROM conversations ORDER BY session_id").format(sql.SQL(columns))
    ).fetchall()


def rejects(conn):
    return dict(conn.execute("SELECT record_key, reason FROM conversation_rejects"))


# --- vectors ----------------------------------------------------------------------------


def set_vectors(conn: psycopg.Connection, ids: list, vectors: np.ndarray) -> None:
    """Store vectors as the embedding step would (embedding_hash = content_hash)."""
    register_vector(conn)
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE vector_stage (id uuid, embedding vector) ON COMMIT DROP")
        with conn.cursor().copy("COPY vector_stage FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "vector"])
            for id_, vector in zip(ids, vectors, strict=True):
                copy.write_row((id_, np.asarray(vector, dtype=np.float32)))
        conn.execute(
            "UPDATE conversations AS c SET embedding = s.embedding, embedding_hash = c.content_hash"
            " FROM vector_stage AS s WHERE c.id = s.id"
        )


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)
