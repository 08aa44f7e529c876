"""Small helpers the tests use to write histories rows and to recount them."""

import json
from collections.abc import Iterable
from datetime import datetime

import psycopg
from psycopg import sql

from conversation_assets.demo import create_histories_table


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
