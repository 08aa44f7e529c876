"""No API of the package moves or reads a conversation across tenants.

Every public function that takes a client code (or writes a record that carries
one) is called with tenant A's client code and tenant B's conversation: nothing
of B's may come back, and B's row, tags and enriched row must stay as they were.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from conversation_assets import dashboards, demo, reads
from conversation_assets.bulk import upsert_conversations_in_batches
from conversation_assets.conversations import build_conversations
from conversation_assets.discovery import discover
from conversation_assets.enrichment import enrich, refresh_metrics, refresh_performance
from conversation_assets.store import ConversationRecord, conversation_id, upsert_conversations
from resources.embeddings import EmbeddingResource
from tests.sources import add_crew

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
A, B = "acme", "globex"
B_ID = conversation_id("crew-b", "s-b")
A_ID = conversation_id("crew-a", "s-a")


def record(
    client_code: str, crew_code: str, session_id: str, **changes: object
) -> ConversationRecord:
    base: dict[str, object] = {
        "client_code": client_code,
        "crew_code": crew_code,
        "session_id": session_id,
        "user_id": "u1",  # the same user id in both tenants
        "full_conversation": f"User: secret of {client_code}\nAssistant: noted",
        "summary": f"secret of {client_code}",
        "metadata": {"language": "en"},
        "message_count": 2,
        "created_at": NOW,
    }
    return ConversationRecord(**{**base, **changes})  # type: ignore[arg-type]


def snapshot(conn: psycopg.Connection) -> tuple:
    """Everything of B's conversation: its row (xmin: not even rewritten), tags,
    enriched row."""
    row = conn.execute(
        "SELECT xmin::text, to_jsonb(c) - 'embedding', embedding::text FROM conversations AS c "
        "WHERE id = %s",
        (B_ID,),
    ).fetchone()
    tags = conn.execute(
        "SELECT tag, client_code FROM conversation_tags WHERE conversation_id = %s ORDER BY tag",
        (B_ID,),
    ).fetchall()
    enriched = conn.execute(
        "SELECT to_jsonb(e) - 'enriched_at' FROM enriched_conversations AS e WHERE id = %s",
        (B_ID,),
    ).fetchone()
    return row, tags, enriched


@pytest.fixture
def tenants(conn: psycopg.Connection) -> tuple:
    """A's and B's conversations (same user id, B tagged, both with a vector, both
    enriched), and B's snapshot."""
    report = upsert_conversations(conn, [record(A, "crew-a", "s-a"), record(B, "crew-b", "s-b")])
    assert report.inserted == 2 and not report.rejects
    vector = np.ones(256, dtype=np.float32)
    register_vector(conn)
    conn.execute(
        "UPDATE conversations SET embedding = %s, embedding_hash = content_hash",
        (vector,),
    )
    reads.add_tags(conn, B, B_ID, ["vip"])
    return vector, snapshot(conn)


# --- writes through the store ---------------------------------------------------------


def test_upsert_never_moves_a_conversation_to_another_client(conn, tenants):
    _, before = tenants
    report = upsert_conversations(conn, [record(A, "crew-b", "s-b", summary="taken over")])

    assert (report.inserted, report.updated, report.unchanged) == (0, 0, 0)
    [reject] = report.rejects
    assert reject.record_key == "crew-b/s-b"
    assert "'globex'" in reject.reason and "'acme'" in reject.reason
    assert snapshot(conn) == before
    assert conn.execute(
        "SELECT client_code, reason FROM conversation_rejects WHERE record_key = 'crew-b/s-b'"
    ).fetchone() == (A, reject.reason)
    # The same record for its own client still lands.
    assert upsert_conversations(conn, [record(B, "crew-b", "s-b", summary="new")]).updated == 1


@pytest.mark.parametrize("through", ["connection", "pool"])
def test_bulk_loads_never_move_a_conversation_either(conn, db_url, tenants, through):
    _, before = tenants
    records = [record(A, "crew-a", f"n{i}") for i in range(5)] + [record(A, "crew-b", "s-b")]
    if through == "connection":
        report = upsert_conversations_in_batches(conn, records, batch_size=2)
    else:
        with ConnectionPool(db_url, min_size=2, max_size=2, kwargs={"autocommit": True}) as pool:
            report = upsert_conversations_in_batches(pool, records, batch_size=2, workers=2)
    assert report.inserted == 5 and [r.record_key for r in report.rejects] == ["crew-b/s-b"]
    assert snapshot(conn) == before


def test_a_racing_writer_of_another_client_is_refused_not_overwritten(conn, db_url):
    """B inserts the conversation and has not committed when A writes the same id:
    A waits, then the guard sees B's row and A's record is rejected."""
    with psycopg.connect(db_url, autocommit=True) as other:
        first = other.transaction()
        first.__enter__()
        upsert_conversations(other, [record(B, "crew-b", "s-b")])
        outcome: dict[str, object] = {}

        def writer() -> None:
            with psycopg.connect(db_url, autocommit=True) as mine:
                outcome["report"] = upsert_conversations(mine, [record(A, "crew-b", "s-b")])

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # waiting on B's uncommitted row
        first.__exit__(None, None, None)
        thread.join(10)
    report = outcome["report"]
    assert [r.record_key for r in report.rejects] == ["crew-b/s-b"]  # type: ignore[attr-defined]
    assert conn.execute("SELECT client_code FROM conversations").fetchall() == [(B,)]


def test_the_builder_never_moves_a_conversation_when_a_crew_changes_client(conn, postgres):
    add_crew(conn, "crew-b", B, "b_histories", "n8n_created_at")
    conn.execute(
        "INSERT INTO b_histories (session_id, message, created_at) VALUES "
        """('s-b', '{"type": "human", "content": "hello"}', %s)""",
        (NOW,),
    )
    discover(postgres.pool)
    build_conversations(postgres.pool)
    row = conn.execute("SELECT xmin::text, client_code FROM conversations").fetchone()
    assert row[1] == B

    conn.execute("UPDATE crews SET client_code = %s", (A,))
    conn.execute("UPDATE discovered_sessions SET client_code = %s", (A,))
    conn.execute("INSERT INTO conversation_queue (crew_code, session_id) VALUES ('crew-b', 's-b')")
    report = build_conversations(postgres.pool)

    assert [r.record_key for r in report.written.rejects] == ["crew-b/s-b"]
    assert conn.execute("SELECT xmin::text, client_code FROM conversations").fetchone() == row
    assert report.queue_left == 0


# --- the product's reads and writes (reads.py) ------------------------------------------


def test_get_conversation(conn, tenants):
    assert reads.get_conversation(conn, A, B_ID) is None
    assert reads.get_conversation(conn, A, B_ID, include_deleted=True) is None
    assert reads.get_conversation(conn, B, B_ID) is not None


def test_list_conversations(conn, tenants):
    for filters in ({}, {"user_id": "u1"}, {"search": "globex"}, {"include_tags": ["vip"]}):
        page = reads.list_conversations(conn, A, with_transcript=True, **filters)
        assert B_ID not in [c.id for c in page.items]
        assert all(c.client_code == A for c in page.items)
    assert reads.list_conversations(conn, A, search="globex").total == 0


def test_semantic_search(conn, tenants):
    vector, _ = tenants
    for exact_below in (0, 10**9):  # through HNSW, and ranked exactly
        hits = reads.semantic_search(conn, A, vector, k=10, exact_below=exact_below)
        assert [h.conversation.id for h in hits] == [A_ID]


def test_exact_search(conn, tenants):
    vector, _ = tenants
    assert [h.conversation.id for h in reads.exact_search(conn, A, vector)] == [A_ID]


def test_semantic_search_text(conn, tenants):
    embedder = EmbeddingResource()
    register_vector(conn)
    [b_vector] = embedder.embed(["secret of globex"])
    conn.execute("UPDATE conversations SET embedding = %s WHERE id = %s", (b_vector, B_ID))
    hits = reads.semantic_search_text(conn, embedder, A, "secret of globex", k=10)
    assert [h.conversation.id for h in hits] == [A_ID]


def test_explain_search(conn, tenants):
    vector, _ = tenants
    for exact in (False, True):
        plan = reads.explain_search(conn, A, vector, exact=exact)
        assert "'acme'" in plan and "'globex'" not in plan


def test_soft_delete(conn, tenants):
    _, before = tenants
    assert reads.soft_delete(conn, A, B_ID) is False
    assert snapshot(conn) == before


def test_restore(conn, tenants):
    assert reads.soft_delete(conn, B, B_ID) is True
    deleted = snapshot(conn)
    assert reads.restore(conn, A, B_ID) is False
    assert snapshot(conn) == deleted


def test_set_status(conn, tenants):
    _, before = tenants
    assert reads.set_status(conn, A, B_ID, "closed") is False
    assert snapshot(conn) == before


def test_add_tags(conn, tenants):
    _, before = tenants
    assert reads.add_tags(conn, A, B_ID, ["mine", "vip"]) == 0
    assert snapshot(conn) == before


def test_remove_tags(conn, tenants):
    _, before = tenants
    assert reads.remove_tags(conn, A, B_ID, ["vip"]) == 0
    assert snapshot(conn) == before


def test_conversation_stats(conn, tenants):
    assert reads.conversation_stats(conn, A, "u1")["total_conversations"] == 1


# --- enrichment and its dashboards -------------------------------------------------------


def test_enrichment_and_dashboards_keep_each_client_to_itself(conn, postgres, tenants):
    demo.create_product_tables(conn)
    conn.execute(
        "INSERT INTO user_insights (client_code, user_id, plan) VALUES (%s, 'u1', 'a-plan')", (A,)
    )
    # A ticket of client A naming B's conversation: it must not be attached to it.
    conn.execute(
        "INSERT INTO linked_tickets VALUES (%s, %s, 'A-1', 'not yours', 'Todo', 'https://t/1')",
        (B_ID, A),
    )
    enrich(postgres.pool, mode="incremental")
    row = conn.execute(
        "SELECT client_code, user_insights, ticket_identifier FROM enriched_conversations "
        "WHERE id = %s",
        (B_ID,),
    ).fetchone()
    assert row == (B, None, None)

    day = NOW.replace(hour=0)
    refresh_metrics(postgres.pool, (day, day + timedelta(days=1)))
    hour = NOW.replace(minute=0)
    refresh_performance(postgres.pool, (hour, hour + timedelta(hours=1)))
    series = dashboards.daily_series(conn, A, day.date(), day.date())
    assert [d.conversations for d in series] == [1]
    channels = dashboards.top_channels(conn, A, day.date(), day.date())
    assert [c.conversations for c in channels] == [1]
    assert sum(n for _, n in dashboards.last_24_hours(conn, A)) == 1
