"""The demo data generator, against a real PostgreSQL.

Uses ``DATABASE_URL`` when set (in a fresh database created and dropped here),
otherwise an embedded PostgreSQL 18 started in a temporary directory.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from conversation_assets import demo

START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def demo_db_url(db_url: str) -> str:
    """A fresh, migrated database of its own (conftest's), so tests never share rows."""
    return db_url


@pytest.fixture
def demo_conn(demo_db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(demo_db_url, autocommit=True) as connection:
        yield connection


def _table() -> str:
    return f"h_{uuid.uuid4().hex[:10]}"


def _rows(conn: psycopg.Connection, table: str) -> list[tuple]:
    return conn.execute(
        sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(*table.split(".")))
    ).fetchall()


def _columns(conn: psycopg.Connection, table: str) -> dict[str, str]:
    schema, name = table.split(".") if "." in table else ("public", table)
    rows = conn.execute(
        """SELECT column_name::text, data_type::text, character_maximum_length
           FROM information_schema.columns WHERE table_schema = %s AND table_name = %s""",
        (schema, name),
    ).fetchall()
    return {col: f"{kind}({length})" if length else kind for col, kind, length in rows}


def _indexed_columns(conn: psycopg.Connection, table: str) -> set[tuple[str, bool]]:
    """(column, is primary key) for every single-column index of the table."""
    rows = conn.execute(
        """SELECT a.attname::text, i.indisprimary
           FROM pg_index AS i
           JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
           WHERE i.indrelid = to_regclass(%s) AND i.indnatts = 1""",
        (table,),
    ).fetchall()
    return {(col, primary) for col, primary in rows}


def test_shapes_have_the_real_columns_and_indexes(demo_conn: psycopg.Connection) -> None:
    demo_conn.execute("CREATE SCHEMA IF NOT EXISTS shapes")
    tables = {shape: f"shapes.{shape}_histories" for shape in demo.HISTORY_SHAPES}
    for shape, table in tables.items():
        demo.create_histories_table(demo_conn, table, shape)
        demo.create_histories_table(demo_conn, table, shape)  # if missing: a second call is a no-op

    assert _columns(demo_conn, tables["n8n"]) == {
        "id": "integer",
        "session_id": "character varying(255)",
        "message": "jsonb",
    }
    assert _indexed_columns(demo_conn, tables["n8n"]) == {("id", True)}

    assert _columns(demo_conn, tables["langchain"]) == {
        "id": "integer",
        "session_id": "uuid",
        "message": "jsonb",
        "created_at": "timestamp with time zone",
    }
    assert _indexed_columns(demo_conn, tables["langchain"]) == {("id", True), ("session_id", False)}

    assert _columns(demo_conn, tables["n8n_created_at"]) == {
        "id": "integer",
        "session_id": "character varying(255)",
        "message": "jsonb",
        "created_at": "timestamp with time zone",
    }
    assert _indexed_columns(demo_conn, tables["n8n_created_at"]) == {
        ("id", True),
        ("created_at", False),
    }

    with pytest.raises(ValueError, match="unknown history shape"):
        demo.create_histories_table(demo_conn, _table(), "mongo")


@pytest.mark.parametrize("shape", demo.HISTORY_SHAPES)
def test_fill_is_deterministic_for_a_seed(demo_conn: psycopg.Connection, shape: str) -> None:
    first, second, third = _table(), _table(), _table()
    for table in (first, second, third):
        demo.create_histories_table(demo_conn, table, shape)
    added = demo.fill_histories(
        demo_conn, first, shape, sessions=150, seed=11, start=START, malformed=4
    )
    again = demo.fill_histories(
        demo_conn, second, shape, sessions=150, seed=11, start=START, malformed=4
    )
    other = demo.fill_histories(demo_conn, third, shape, sessions=150, seed=12, start=START)

    assert added == again == len(_rows(demo_conn, first)) > 300
    assert _rows(demo_conn, first) == _rows(demo_conn, second)
    assert other == len(_rows(demo_conn, third))
    assert [r[1:] for r in _rows(demo_conn, first)[:50]] != [
        r[1:] for r in _rows(demo_conn, third)[:50]
    ]


@pytest.mark.parametrize("shape", demo.HISTORY_SHAPES)
def test_seeds_never_share_sessions(demo_conn: psycopg.Connection, shape: str) -> None:
    table = _table()
    demo.create_histories_table(demo_conn, table, shape)
    demo.fill_histories(demo_conn, table, shape, sessions=200, seed=1, start=START)
    demo.fill_histories(demo_conn, table, shape, sessions=200, seed=2, start=START)
    distinct = demo_conn.execute(
        sql.SQL("SELECT count(DISTINCT session_id) FROM {}").format(sql.Identifier(table))
    ).fetchone()
    assert distinct == (400,)


@pytest.mark.parametrize("shape", demo.HISTORY_SHAPES)
def test_fill_looks_like_a_real_chat_product(demo_conn: psycopg.Connection, shape: str) -> None:
    table = _table()
    demo.create_histories_table(demo_conn, table, shape)
    added = demo.fill_histories(demo_conn, table, shape, sessions=2000, seed=5, start=START, days=7)
    ident = sql.Identifier(table)
    lengths = [
        n
        for (n,) in demo_conn.execute(
            sql.SQL("SELECT count(*) FROM {} GROUP BY session_id").format(ident)
        )
    ]
    assert len(lengths) == 2000 and sum(lengths) == added
    assert sum(1 for n in lengths if 2 <= n <= 10) > 0.75 * len(lengths)
    assert max(lengths) >= 100
    assert 6 <= added / len(lengths) <= 16

    content = sql.SQL(
        "message -> 'data' ->> 'content'" if shape == "langchain" else "message ->> 'content'"
    )
    texts = [t for (t,) in demo_conn.execute(sql.SQL("SELECT {} FROM {}").format(content, ident))]
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts)  # CJK
    assert any("é" in t for t in texts)
    assert any(any(ord(ch) > 0xFFFF for ch in t) for t in texts)  # emoji

    types = dict(
        demo_conn.execute(
            sql.SQL("SELECT message ->> 'type', count(*) FROM {} GROUP BY 1").format(ident)
        ).fetchall()
    )
    assert types["human"] > 0.3 * added and types["ai"] > 0.25 * added
    if shape == "langchain":
        assert types["system"] > 0 and types["tool"] > 0
        assert set(types) == {"human", "ai", "system", "tool"}
    else:
        assert set(types) == {"human", "ai"}
        # Within a session, human and ai alternate, starting with the human.
        sequences = demo_conn.execute(
            sql.SQL(
                """SELECT array_agg(message ->> 'type' ORDER BY id)
                   FROM {} GROUP BY session_id"""
            ).format(ident)
        ).fetchall()
        for (seq,) in sequences:
            assert seq[:2] == ["human", "ai"]

    if shape != "n8n":
        bounds = demo_conn.execute(
            sql.SQL(
                """SELECT min(created_at), max(created_at),
                          bool_and(created_at >= previous)
                   FROM (SELECT created_at, lag(created_at) OVER (ORDER BY id) AS previous
                         FROM {}) AS t"""
            ).format(ident)
        ).fetchone()
        assert bounds is not None
        earliest, latest, ids_follow_time = bounds
        assert ids_follow_time
        assert START - timedelta(days=7, hours=1) <= earliest < START - timedelta(days=5)
        assert START - timedelta(days=1) < latest <= START


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("n8n", {'message has no "type"': 3, "message is not a JSON object": 2,
                 "session_id is empty": 2}),
        ("n8n_created_at", {'message has no "type"': 3, "message is not a JSON object": 2,
                            "session_id is empty": 2}),
        ("langchain", {'message has no "type"': 4, "message is not a JSON object": 3}),
    ],
)  # fmt: skip
def test_malformed_rows_are_there(
    demo_conn: psycopg.Connection, shape: str, expected: dict[str, int]
) -> None:
    table = _table()
    demo.create_histories_table(demo_conn, table, shape)
    clean = demo.fill_histories(demo_conn, table, shape, sessions=100, seed=3, start=START)
    table2 = _table()
    demo.create_histories_table(demo_conn, table2, shape)
    added = demo.fill_histories(
        demo_conn, table2, shape, sessions=100, seed=3, start=START, malformed=7
    )
    assert added == clean + 7
    reasons = dict(
        demo_conn.execute(
            sql.SQL(
                """SELECT r, count(*) FROM {},
                          discovery_reject_reason(session_id::text, message) AS r
                   WHERE r IS NOT NULL GROUP BY r"""
            ).format(sql.Identifier(table2))
        ).fetchall()
    )
    assert reasons == expected


def test_load_demo_is_idempotent(demo_conn: psycopg.Connection) -> None:
    assert demo_conn.execute("SELECT count(*) FROM crews").fetchone() == (0,)
    added = demo.load_demo(demo_conn)

    assert len(added) == 6 and all(rows > 500 for rows in added.values())
    assert "demo.initech_billing_histories" in added
    crews = demo_conn.execute("SELECT client_code, histories_table FROM crews").fetchall()
    assert len(crews) == 6 and {client for client, _ in crews} == {"acme", "globex", "initech"}
    shapes = set()
    for _, table in crews:
        assert len(_rows(demo_conn, table)) == added[table]
        columns = _columns(demo_conn, table)
        shapes.add(
            "langchain"
            if columns["session_id"] == "uuid"
            else "n8n_created_at"
            if "created_at" in columns
            else "n8n"
        )
    assert shapes == set(demo.HISTORY_SHAPES)
    rejects = demo_conn.execute(
        sql.SQL(
            """SELECT count(*) FROM {}
               WHERE discovery_reject_reason(session_id::text, message) IS NOT NULL"""
        ).format(sql.Identifier("demo", "initech_billing_histories"))
    ).fetchone()
    assert rejects is not None and rejects[0] > 0

    assert demo.load_demo(demo_conn) == {}
    assert demo_conn.execute("SELECT count(*) FROM crews").fetchone() == (6,)
    for _, table in crews:
        assert len(_rows(demo_conn, table)) == added[table]


@pytest.mark.parametrize("shape", demo.HISTORY_SHAPES)
def test_add_messages_mixes_new_and_existing_sessions(
    demo_conn: psycopg.Connection, shape: str
) -> None:
    table = _table()
    ident = sql.Identifier(table)
    demo.create_histories_table(demo_conn, table, shape)
    demo.fill_histories(demo_conn, table, shape, sessions=500, seed=9, malformed=3)
    before_max = demo_conn.execute(sql.SQL("SELECT max(id) FROM {}").format(ident)).fetchone()
    known = {
        s
        for (s,) in demo_conn.execute(
            sql.SQL("SELECT DISTINCT session_id::text FROM {}").format(ident)
        )
    }

    added = demo.add_messages(demo_conn, table, shape, count=1000, seed=4)

    assert added == 1000
    new_rows = demo_conn.execute(
        sql.SQL("SELECT session_id::text, message FROM {} WHERE id > %s").format(ident),
        before_max,
    ).fetchall()
    assert len(new_rows) == 1000
    to_new = [s for s, _ in new_rows if s not in known]
    assert len(to_new) == 300
    assert 50 <= len(set(to_new)) <= 100
    assert all(s for s, _ in new_rows)
    assert {m["type"] for _, m in new_rows} == {"human", "ai"}

    # Same seed again: its "new" sessions are new again, not the previous call's.
    first_new = set(to_new)
    assert demo.add_messages(demo_conn, table, shape, count=10, seed=4) == 10
    latest = demo_conn.execute(
        sql.SQL("SELECT session_id::text FROM {} ORDER BY id DESC LIMIT 10").format(ident)
    ).fetchall()
    fresh = {s for (s,) in latest if s not in known and s not in first_new}
    assert len(fresh) == 1  # round(10 * 0.3) = 3 messages fill one new session


def test_add_messages_to_an_empty_table_starts_sessions(demo_conn: psycopg.Connection) -> None:
    table = _table()
    demo.create_histories_table(demo_conn, table, "langchain")
    assert demo.add_messages(demo_conn, table, "langchain", count=20, seed=1) == 20
    sessions = demo_conn.execute(
        sql.SQL("SELECT count(DISTINCT session_id) FROM {}").format(sql.Identifier(table))
    ).fetchone()
    assert sessions == (5,)
