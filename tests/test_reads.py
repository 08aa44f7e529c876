"""The product's query module (conversation_assets/reads.py) on a real PostgreSQL.

Small cases get a fresh database each (the `conn` fixture); the plan, iterative
scan and recall checks share one module database of 15k conversations with
vectors, built once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from conversation_assets import reads
from conversation_assets.embedded import scratch_database
from conversation_assets.queries import query as named_query
from conversation_assets.store import ConversationRecord, soft_delete_gone
from resources.embeddings import EmbeddingResource
from tests.sources import DIM, NOW, set_vectors, store, unit
from tests.sources import recent_record as record


def ids(items: list) -> list:
    return [getattr(i, "conversation", i).id for i in items]


# --- tenancy --------------------------------------------------------------------------


def test_two_clients_with_the_same_users_and_tags_never_mix(conn: psycopg.Connection) -> None:
    shared = {"user_id": "u1", "channel": "web", "summary": "refund please"}
    a1, a2 = store(conn, record("s1", **shared), record("s2", **shared))
    (b1,) = store(conn, record("s1", client_code="globex", crew_code="crew-b", **shared))
    for cid, client in ((a1, "acme"), (a2, "acme"), (b1, "globex")):
        assert reads.add_tags(conn, client, cid, ["vip"]) == 1
    rng = np.random.default_rng(1)
    vectors = unit(rng.standard_normal((3, DIM)))
    set_vectors(conn, [a1, a2, b1], vectors)

    for client, expected in (("acme", {a1, a2}), ("globex", {b1})):
        page = reads.list_conversations(
            conn, client, user_id="u1", search="refund", include_tags=["vip"]
        )
        assert set(ids(page.items)) == expected and page.total == len(expected)
        assert all(i.client_code == client for i in page.items)
        # globex's own vector is the query: acme still only gets acme's rows.
        for search in (reads.semantic_search, reads.exact_search):
            hits = search(conn, client, vectors[2], k=10)
            assert set(ids(hits)) == expected
        stats = reads.conversation_stats(conn, client, "u1")
        assert stats["total_conversations"] == stats["with_embeddings"] == len(expected)
    assert reads.list_conversations(conn, "nobody").total == 0

    # Another client's id is invisible to every function and changes nothing.
    assert reads.get_conversation(conn, "globex", a1) is None
    assert reads.get_conversation(conn, "globex", a1, include_deleted=True) is None
    assert reads.soft_delete(conn, "globex", a1) is False
    assert reads.set_status(conn, "globex", a1, "closed") is False
    assert reads.add_tags(conn, "globex", a1, ["stolen"]) == 0
    assert reads.remove_tags(conn, "globex", a1, ["vip"]) == 0
    untouched = reads.get_conversation(conn, "acme", a1)
    assert untouched is not None
    assert (untouched.status, untouched.tags, untouched.deleted_at) == ("active", ["vip"], None)
    assert reads.soft_delete(conn, "acme", a1) is True
    assert reads.restore(conn, "globex", a1) is False
    assert reads.get_conversation(conn, "acme", a1) is None
    assert reads.restore(conn, "acme", a1) is True
    # Tags written through the module carry the conversation's client.
    rows = conn.execute("SELECT DISTINCT client_code FROM conversation_tags ORDER BY 1").fetchall()
    assert rows == [("acme",), ("globex",)]


# --- listing ----------------------------------------------------------------------------


def test_pagination_pages_total_stable_order_and_last_page(conn: psycopg.Connection) -> None:
    # Seven rows, two pairs sharing a created_at: ties are ordered by id.
    times = [NOW - timedelta(minutes=m) for m in (1, 2, 2, 3, 4, 4, 5)]
    stored = store(conn, *(record(f"s{i}", created_at=t) for i, t in enumerate(times)))
    expected = [
        i
        for _, i in sorted(zip(times, stored, strict=True), key=lambda p: (-p[0].timestamp(), p[1]))
    ]

    pages = [reads.list_conversations(conn, "acme", page=n, page_size=3) for n in (1, 2, 3)]
    assert [(p.total, p.pages, p.page, p.page_size) for p in pages] == [
        (7, 3, n, 3) for n in (1, 2, 3)
    ]
    assert [len(p.items) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in ids(p.items)] == expected
    assert reads.list_conversations(conn, "acme", page=2, page_size=3) == pages[1]  # stable
    past = reads.list_conversations(conn, "acme", page=4, page_size=3)
    assert (past.items, past.total, past.pages) == ([], 7, 3)
    empty = reads.list_conversations(conn, "acme", user_id="nobody")
    assert (empty.items, empty.total, empty.pages) == ([], 0, 0)
    whole = reads.list_conversations(conn, "acme", page_size=500)
    assert ids(whole.items) == expected and whole.pages == 1


def test_each_filter_alone_and_combined(conn: psycopg.Connection) -> None:
    day = NOW - timedelta(days=2)
    a, b, c, d = store(
        conn,
        record("a", user_id="alice", channel="web", created_at=day - timedelta(hours=5)),
        record("b", user_id="alice", channel="whatsapp", created_at=day),
        record(
            "c",
            user_id="bob",
            channel="web",
            created_at=day + timedelta(hours=5),
            status="handoff_complete",
            summary="Billing question",
        ),
        record(
            "d",
            user_id="bob",
            channel="sms",
            created_at=day + timedelta(days=1),
            full_conversation="User: my INVOICE is wrong",
        ),
    )
    reads.set_status(conn, "acme", a, "closed")

    def listed(**filters: object) -> set:
        return set(ids(reads.list_conversations(conn, "acme", **filters).items))  # type: ignore[arg-type]

    assert listed() == {a, b, c, d}
    assert listed(user_id="alice") == {a, b}
    assert listed(channel="web") == {a, c}
    assert listed(status="closed") == {a}
    assert listed(status="handoff_complete") == {c}
    assert listed(status="active") == {b, d}
    # start inclusive, end exclusive.
    assert listed(start=day) == {b, c, d}
    assert listed(end=day) == {a}
    assert listed(start=day, end=day + timedelta(days=1)) == {b, c}
    # search: summary, transcript and user_id, case-insensitively.
    assert listed(search="billing") == {c}
    assert listed(search="invoice") == {d}
    assert listed(search="ALI") == {a, b}
    assert listed(user_id="bob", channel="web", search="question") == {c}
    assert listed(user_id="alice", start=day, channel="whatsapp", status="active") == {b}
    assert listed(user_id="alice", channel="sms") == set()
    # The transcript only when asked.
    page = reads.list_conversations(conn, "acme", user_id="bob", with_transcript=True)
    assert {i.full_conversation for i in page.items} == {
        "User: my INVOICE is wrong",
        "User: hello from c\nAssistant: hi!",
    }
    assert all(i.full_conversation is None for i in reads.list_conversations(conn, "acme").items)


def test_search_treats_percent_underscore_and_backslash_literally(
    conn: psycopg.Connection,
) -> None:
    pct, digits, under, letter, slash = store(
        conn,
        record("pct", summary="50% off"),
        record("digits", summary="5000 off"),
        record("under", summary="a_b"),
        record("letter", summary="axb"),
        record("slash", summary=r"C:\temp"),
    )

    def found(text: str) -> set:
        return set(ids(reads.list_conversations(conn, "acme", search=text).items))

    assert found("%") == {pct}
    assert found("0% o") == {pct}
    assert found("_") == {under}
    assert found("a_b") == {under}
    assert found("\\") == {slash}
    assert found(r"c:\t") == {slash}
    assert found("%%") == set()
    assert found("0 off") == {digits}
    assert found("x") == {letter}


def test_include_and_exclude_tags(conn: psycopg.Connection) -> None:
    a, b, c, d = store(conn, record("a"), record("b"), record("c"), record("d"))
    reads.add_tags(conn, "acme", a, ["vip", "billing"])
    reads.add_tags(conn, "acme", b, ["vip"])
    reads.add_tags(conn, "acme", c, ["spam"])

    def listed(**filters: object) -> set:
        return set(ids(reads.list_conversations(conn, "acme", **filters).items))  # type: ignore[arg-type]

    assert listed(include_tags=["vip"]) == {a, b}
    assert listed(include_tags=["billing", "spam"]) == {a, c}  # any of them
    assert listed(exclude_tags=["spam"]) == {a, b, d}
    assert listed(exclude_tags=["billing", "spam"]) == {b, d}  # none of them
    assert listed(include_tags=["vip"], exclude_tags=["billing"]) == {b}
    assert listed(include_tags=[" vip ", ""]) == {a, b}  # trimmed, empty ignored
    assert listed(include_tags=["nothing"]) == set()
    page = reads.list_conversations(conn, "acme", include_tags=["vip"])
    assert {i.id: i.tags for i in page.items} == {a: ["billing", "vip"], b: ["vip"]}


def test_list_argument_validation(conn: psycopg.Connection) -> None:
    cases = [
        ({"page": 0}, "page must be"),
        ({"page_size": 0}, "page_size must be"),
        ({"page_size": 501}, "page_size must be"),
        ({"status": "deleted"}, "status 'deleted' is not one of"),
        ({"start": NOW, "end": NOW}, "must be before end"),
        ({"start": NOW, "end": NOW - timedelta(days=1)}, "must be before end"),
        ({"start": datetime(2026, 1, 1)}, "timezone-aware"),  # noqa: DTZ001 - the point
        ({"include_tags": "vip"}, "not one string"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            reads.list_conversations(conn, "acme", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not a UUID"):
        reads.get_conversation(conn, "acme", "not-a-uuid")


# --- deletion, status, tags -------------------------------------------------------------


def test_deleted_rows_are_never_listed_or_found(conn: psycopg.Connection) -> None:
    live, gone = store(conn, record("live", summary="same"), record("gone", summary="same"))
    set_vectors(conn, [live, gone], unit(np.ones((2, DIM))))
    assert reads.soft_delete(conn, "acme", gone) is True
    assert reads.soft_delete(conn, "acme", gone) is False  # already deleted
    assert ids(reads.list_conversations(conn, "acme", search="same").items) == [live]
    assert reads.list_conversations(conn, "acme").total == 1
    assert ids(reads.semantic_search(conn, "acme", np.ones(DIM))) == [live]
    assert ids(reads.exact_search(conn, "acme", np.ones(DIM))) == [live]
    assert reads.get_conversation(conn, "acme", gone) is None
    shown = reads.get_conversation(conn, "acme", gone, include_deleted=True)
    assert shown is not None and shown.deleted_at is not None
    assert reads.conversation_stats(conn, "acme", "u1")["total_conversations"] == 1
    assert reads.set_status(conn, "acme", gone, "closed") is False
    assert reads.add_tags(conn, "acme", gone, ["x"]) == 0


def test_soft_delete_then_restore(conn: psycopg.Connection) -> None:
    (cid,) = store(conn, record("s1"))
    reads.add_tags(conn, "acme", cid, ["keep"])
    assert reads.restore(conn, "acme", cid) is False  # nothing to undo
    assert reads.soft_delete(conn, "acme", cid) is True
    assert conn.execute(
        "SELECT deleted_by, deleted_at IS NOT NULL FROM conversations WHERE id = %s", (cid,)
    ).fetchone() == ("product", True)
    assert reads.restore(conn, "acme", cid) is True
    back = reads.get_conversation(conn, "acme", cid)
    assert back is not None and back.deleted_at is None and back.tags == ["keep"]
    assert back.full_conversation == "User: hello from s1\nAssistant: hi!"
    short = reads.get_conversation(conn, "acme", str(cid), with_transcript=False)
    assert short is not None and short.full_conversation is None
    assert reads.restore(conn, "acme", cid) is False
    assert reads.soft_delete(conn, "acme", "00000000-0000-0000-0000-000000000000") is False


def test_restore_refuses_deletions_made_because_the_source_is_gone(
    conn: psycopg.Connection,
) -> None:
    (cid,) = store(conn, record("s1"))
    assert soft_delete_gone(conn, [("crew-a", "s1", None)]) == 1
    assert reads.restore(conn, "acme", cid) is False
    assert reads.soft_delete(conn, "acme", cid) is False  # already deleted
    assert conn.execute(
        "SELECT deleted_by FROM conversations WHERE id = %s", (cid,)
    ).fetchone() == ("source",)
    # It comes back by itself when the session does.
    store(conn, record("s1"))
    assert reads.get_conversation(conn, "acme", cid) is not None


def test_restore_refuses_a_products_deletion_once_the_session_is_gone(
    conn: psycopg.Connection,
) -> None:
    (cid,) = store(conn, record("s1"))
    assert reads.soft_delete(conn, "acme", cid) is True  # the product deletes it first
    # Then discovery finds the session's rows gone (its row stays, marked deleted).
    conn.execute(
        """INSERT INTO discovered_sessions (crew_code, session_id, client_code, message_count,
               human_message_count, ai_message_count, first_message_id, last_message_id,
               started_at, ended_at, time_source, deleted_at)
           VALUES ('crew-a', 's1', 'acme', 2, 1, 1, 1, 2, now(), now(), 'created_at', now())"""
    )

    assert reads.restore(conn, "acme", cid) is False

    conn.execute("UPDATE discovered_sessions SET deleted_at = NULL")  # its rows are back
    assert reads.restore(conn, "acme", cid) is True


def test_set_status_validates_and_a_rebuild_keeps_the_products_status(
    conn: psycopg.Connection,
) -> None:
    (cid,) = store(conn, record("s1"))
    for status in ("handoff_complete", "deleted", "", "CLOSED"):
        with pytest.raises(ValueError, match="not one the product sets"):
            reads.set_status(conn, "acme", cid, status)
    assert reads.set_status(conn, "acme", cid, "archived") is True
    store(conn, record("s1", summary="rebuilt"))
    kept = reads.get_conversation(conn, "acme", cid)
    assert kept is not None and (kept.status, kept.summary) == ("archived", "rebuilt")
    assert reads.set_status(conn, "acme", cid, "active") is True
    assert ids(reads.list_conversations(conn, "acme", status="active").items) == [cid]


def test_tags_are_trimmed_deduplicated_and_counted(conn: psycopg.Connection) -> None:
    (cid,) = store(conn, record("s1"))
    assert reads.add_tags(conn, "acme", cid, [" vip ", "", "   ", "vip", "new"]) == 2
    assert reads.add_tags(conn, "acme", cid, ["vip", "later"]) == 1
    assert reads.add_tags(conn, "acme", cid, []) == 0
    found = reads.get_conversation(conn, "acme", cid)
    assert found is not None and found.tags == ["later", "new", "vip"]
    assert reads.remove_tags(conn, "acme", cid, [" new", "absent"]) == 1
    assert reads.remove_tags(conn, "acme", cid, [""]) == 0
    with pytest.raises(ValueError, match="longer than 100"):
        reads.add_tags(conn, "acme", cid, ["x" * 101])
    found = reads.get_conversation(conn, "acme", cid)
    assert found is not None and found.tags == ["later", "vip"]


# --- a user's statistics -----------------------------------------------------------------


def test_conversation_stats(conn: psycopg.Connection) -> None:
    recent = NOW - timedelta(days=1)
    stored = store(
        conn,
        record("a", created_at=recent),
        record("b", created_at=recent, status="handoff_complete"),
        record("c", created_at=recent, status="handoff_complete"),
        record("d", created_at=NOW - timedelta(days=10)),
        record("old", created_at=NOW - timedelta(days=40)),  # outside 30 days
        record("gone", created_at=recent),
        record("other-user", user_id="u2", created_at=recent),
        record("x", client_code="globex", crew_code="crew-b", created_at=recent),
    )
    a, b, _, d, old, gone, *_ = stored
    set_vectors(conn, [a, b, old], unit(np.ones((3, DIM))))
    reads.soft_delete(conn, "acme", gone)

    assert reads.conversation_stats(conn, "acme", "u1") == {
        "total_conversations": 4,
        "active_conversations": 2,
        "with_embeddings": 2,
        "handoff_complete": 2,
        "avg_per_day": round(4 / 30, 2),
    }
    week = reads.conversation_stats(conn, "acme", "u1", days=7)
    assert (week["total_conversations"], week["active_conversations"]) == (3, 1)
    assert week["avg_per_day"] == round(3 / 7, 2)
    assert reads.conversation_stats(conn, "acme", "u1", days=60)["total_conversations"] == 5
    assert reads.conversation_stats(conn, "acme", "nobody")["total_conversations"] == 0
    with pytest.raises(ValueError, match="days must be"):
        reads.conversation_stats(conn, "acme", "u1", days=0)
    # The SQL function's own check, for callers that bypass the module.
    with pytest.raises(psycopg.errors.RaiseException, match="p_days must be at least 1, got 0"):
        conn.execute("SELECT * FROM get_conversation_stats('acme', 'u1', 0)")


# --- semantic search on small data ----------------------------------------------------------


def test_semantic_search_filters_orders_and_checks_the_dimension(
    conn: psycopg.Connection,
) -> None:
    stored = store(
        conn,
        record("a", user_id="alice", channel="web"),
        record("b", user_id="alice", channel="sms"),
        record("c", user_id="bob", channel="web"),
        record("no-vector", user_id="alice", channel="web"),
    )
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((3, DIM)))
    set_vectors(conn, stored[:3], vectors)
    query = vectors[0] + 0.1 * vectors[1]

    hits = reads.semantic_search(conn, "acme", query, k=10)
    assert ids(hits) == ids(reads.exact_search(conn, "acme", query.tolist(), k=10))
    assert len(hits) == 3 and ids(hits)[:2] == stored[:2]  # no-vector is never a hit
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    expected = 1 - float(query @ vectors[0]) / float(np.linalg.norm(query))
    assert hits[0].distance == pytest.approx(expected, abs=1e-5)
    assert hits[0].conversation.full_conversation is None
    assert ids(reads.semantic_search(conn, "acme", query, k=1)) == stored[:1]
    assert ids(reads.semantic_search(conn, "acme", query, user_id="bob")) == [stored[2]]
    assert ids(reads.semantic_search(conn, "acme", query, channel="sms")) == [stored[1]]
    assert reads.semantic_search(conn, "acme", query, user_id="bob", channel="sms") == []

    with pytest.raises(ValueError, match=r"3 dimensions .* vector\(256\)"):
        reads.semantic_search(conn, "acme", [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"512 dimensions .* vector\(256\)"):
        reads.exact_search(conn, "acme", np.ones(512))
    for bad, message in (
        ({"k": 0}, "k must be"),
        ({"ef_search": 0}, "ef_search must be"),
        ({"max_scan_tuples": 0}, "max_scan_tuples must be"),
    ):
        with pytest.raises(ValueError, match=message):
            reads.semantic_search(conn, "acme", query, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        reads.semantic_search(conn, "acme", np.full(DIM, np.nan))
    # The transaction's settings end with it.
    assert conn.execute("SHOW hnsw.iterative_scan").fetchone() == ("off",)
    assert conn.execute("SHOW enable_indexscan").fetchone() == ("on",)


def test_semantic_search_text_finds_the_conversation_with_that_text(
    conn: psycopg.Connection,
) -> None:
    texts = [
        "My parcel never arrived and the tracking number shows nothing.",
        "How do I reset my password for the mobile app?",
        "I would like a refund for the duplicate charge on my credit card.",
        "Can you recommend a vegetarian recipe for dinner tonight?",
        "The printer in the office keeps jamming on double-sided pages.",
    ]
    stored = store(conn, *(record(f"s{i}", full_conversation=t) for i, t in enumerate(texts)))
    embedder = EmbeddingResource()
    set_vectors(conn, stored, embedder.embed(texts))
    for i, text in enumerate(texts):
        hits = reads.semantic_search_text(conn, embedder, "acme", text, k=3)
        assert hits[0].conversation.id == stored[i]
        assert hits[0].distance == pytest.approx(0, abs=1e-5)
    assert reads.semantic_search_text(conn, embedder, "globex", texts[0]) == []


def test_search_works_on_a_connection_without_the_vector_adapter(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as setup:
        (cid,) = store(setup, record("s1"))
        set_vectors(setup, [cid], unit(np.ones((1, DIM))))
    with psycopg.connect(db_url, autocommit=True) as plain:  # no register_vector
        assert ids(reads.semantic_search(plain, "acme", np.ones(DIM))) == [cid]
        assert ids(reads.exact_search(plain, "acme", [1.0] * DIM)) == [cid]


# --- the shared large database (read-only for the tests that use it) ------------------------

TARGET = "c00"  # the client the search tests query: ~2% of the rows
LARGE = "c01"  # a client holding a quarter of the rows
CLIENTS = [f"c{i:02d}" for i in range(30)]
ROWS = 15_000
USERS = [f"u{i:02d}" for i in range(20)]


@dataclass
class Big:
    url: str
    clients: np.ndarray  # client code, by row
    queries: np.ndarray  # query vectors: 10 near the target client's rows, 10 anywhere


def embedding_like(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with text embeddings' shape: a low-dimensional latent (20 clusters
    for 80% of rows, scattered for the rest) mapped to 256-d, plus noise. Returns the
    vectors and the latents (queries are made near them)."""
    latent_dim = 16
    mapping = rng.standard_normal((latent_dim, DIM))
    centers = 2 * rng.standard_normal((20, latent_dim))
    latents = rng.standard_normal((rows, latent_dim))
    clustered = rng.random(rows) < 0.8
    latents[clustered] = (
        centers[rng.integers(0, 20, int(clustered.sum()))] + 0.5 * latents[clustered]
    )
    vectors = unit(latents @ mapping + 0.3 * rng.standard_normal((rows, DIM)))
    return vectors, latents @ mapping


@pytest.fixture(scope="module")
def big(server_url: str, template_db: str) -> Iterator[Big]:
    """15k conversations over 30 clients with embedding-like vectors, analysed, built once."""
    rng = np.random.default_rng(7)
    weights = np.full(len(CLIENTS), 0.73 / (len(CLIENTS) - 2))
    weights[:2] = 0.02, 0.25
    clients = rng.choice(CLIENTS, size=ROWS, p=weights)
    users = rng.choice(USERS, size=ROWS)
    channels = rng.choice(["web", "whatsapp", "sms"], size=ROWS)
    ages = rng.uniform(0, 90 * 86400, size=ROWS)
    records = [
        ConversationRecord(
            client_code=str(clients[i]),
            crew_code=f"crew-{clients[i]}",
            session_id=f"s{i}",
            user_id=str(users[i]),
            channel=str(channels[i]),
            full_conversation=f"User: question {i}\nAssistant: answer {i}",
            summary=f"conversation {i}",
            message_count=2,
            created_at=NOW - timedelta(seconds=float(ages[i])),
        )
        for i in range(ROWS)
    ]
    vectors, mapped = embedding_like(rng, ROWS)
    near = rng.choice(np.flatnonzero(clients == TARGET), 10)
    anywhere = rng.integers(0, ROWS, 10)
    queries = unit(mapped[np.concatenate([near, anywhere])] + 0.5 * rng.standard_normal((20, DIM)))
    with scratch_database(server_url, "cp_reads", template=template_db) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            store(conn, *records)
            # Building the HNSW index once over the loaded vectors is several times
            # faster than growing it row by row; same definition as the migration's.
            (index,) = conn.execute(
                "SELECT pg_get_indexdef('conversations_embedding_hnsw_idx'::regclass)"
            ).fetchone()
            conn.execute("DROP INDEX conversations_embedding_hnsw_idx")
            set_vectors(conn, [r.id for r in records], vectors)
            conn.execute("SET maintenance_work_mem = '256MB'")
            conn.execute(index)
            # Vacuumed, as autovacuum leaves a table: index-only scans are then possible.
            conn.execute("VACUUM ANALYZE conversations")
        yield Big(url=url, clients=clients, queries=queries)


@pytest.fixture
def big_conn(big: Big) -> Iterator[psycopg.Connection]:
    """Like the project's pool: autocommit, pgvector, always planned with the parameters."""
    with psycopg.connect(big.url, autocommit=True, prepare_threshold=None) as connection:
        register_vector(connection)
        yield connection


def explain_list(conn: psycopg.Connection, client_code: str, **filters: object) -> str:
    statement, params = reads._list_statement(client_code, **filters)  # type: ignore[arg-type]
    rows = conn.execute(sql.SQL("EXPLAIN (COSTS OFF) ") + statement, params).fetchall()
    return "\n".join(r[0] for r in rows)


def test_list_plans_use_the_user_and_client_indexes(big_conn: psycopg.Connection) -> None:
    for client in (TARGET, "c05", LARGE):
        plan = explain_list(big_conn, client, user_id="u03")
        assert "conversations_user_created_idx" in plan, plan
        plan = explain_list(big_conn, client, user_id="u03", channel="web", search="question")
        assert "conversations_user_created_idx" in plan, plan
    for client in (TARGET, "c05"):
        # A client's list: through one of its client-keyed indexes (both cover id and
        # created_at, so the count is an index-only scan), never a table scan.
        plan = explain_list(big_conn, client)
        assert "conversations_client_created_idx" in plan or (
            "Index Only Scan using conversations_user_created_idx" in plan
        ), plan
        assert "Seq Scan on conversations" not in plan, plan
        plan = explain_list(big_conn, client, start=NOW - timedelta(days=3), status="active")
        assert "conversations_client_created_idx" in plan, plan
    # The unused optional filters are folded away, not evaluated per row.
    plan = explain_list(big_conn, "c05", user_id="u03")
    assert "NULL::" not in plan and "cardinality" not in plan and "ILIKE" not in plan, plan


def test_the_offered_trigram_index_serves_a_text_search(big_conn: psycopg.Connection) -> None:
    search = {"search": "ANSWER 1234"}  # rows 1234 and 12340-12349, any case
    before = reads.list_conversations(big_conn, LARGE, **search, page_size=500)
    assert "conversations_search_trgm_idx" not in explain_list(big_conn, LARGE, **search)

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), big_conn.transaction():  # the module's data stays as it was
        big_conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        big_conn.execute(named_query("reads_search_text_index", concurrently=sql.SQL("")))
        big_conn.execute("ANALYZE conversations")
        plan = explain_list(big_conn, LARGE, **search)
        assert "conversations_search_trgm_idx" in plan, plan
        after = reads.list_conversations(big_conn, LARGE, **search, page_size=500)
        assert [c.id for c in after.items] == [c.id for c in before.items]
        assert after.total == before.total > 0
        raise Rollback


def test_semantic_search_plans(big: Big, big_conn: psycopg.Connection) -> None:
    query = big.queries[0]
    # A client above exact_below: the planner goes through the HNSW index by itself.
    plan = reads.explain_search(big_conn, LARGE, query, exact_below=1000)
    assert "Index Scan using conversations_embedding_hnsw_idx" in plan, plan
    # A small one (2%, under EXACT_BELOW by the planner's statistics): its few
    # hundred rows are ranked exactly, never through the HNSW index.
    small = reads.explain_search(big_conn, TARGET, query)
    assert "hnsw" not in small and "conversations_client_vectors_idx" in small, small
    # Asked to (exact_below=0) and with sorts off, it takes the HNSW path too.
    big_conn.execute("SET enable_sort = off")
    plan = reads.explain_search(big_conn, TARGET, query, exact_below=0)
    assert "Index Scan using conversations_embedding_hnsw_idx" in plan, plan
    # The relaxed order is re-sorted outside, not taken as the CTE's ORDER BY.
    assert plan.startswith("Sort\n") and "Presorted Key" not in plan, plan
    # exact_search: every candidate's distance, whatever the session's settings.
    for client in (TARGET, LARGE):
        exact = reads.explain_search(big_conn, client, query, exact=True)
        assert "Seq Scan on conversations" in exact and "hnsw" not in exact, exact


def test_iterative_scan_returns_k_rows_of_a_small_client(
    big: Big, big_conn: psycopg.Connection
) -> None:
    big_conn.execute("SET enable_sort = off")  # the HNSW path (see the plans test)
    for query in big.queries:
        hits = reads.semantic_search(big_conn, TARGET, query, k=10, exact_below=0)
        assert len(hits) == 10
        assert {h.conversation.client_code for h in hits} == {TARGET}
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    # Without the iterative scan the same search stops at ef_search candidates, of
    # which ~2% are the client's: fewer than k rows.
    no_iteration = sql.SQL(
        "SELECT set_config('hnsw.iterative_scan', 'off', true),"
        " set_config('hnsw.ef_search', '40', true), NULL::float8, {dimension}"
    ).format(dimension=sql.Literal(DIM))
    short = reads._nearest(
        big_conn, no_iteration, {}, TARGET, big.queries[0], k=10, user_id=None, channel=None
    )
    assert isinstance(short, list) and len(short) < 10


def recall(
    conn: psycopg.Connection, client: str, queries: np.ndarray, **search: int
) -> list[float]:
    figures = []
    for query in queries:
        approximate = set(ids(reads.semantic_search(conn, client, query, k=10, **search)))
        exact = reads.exact_search(conn, client, query, k=10)
        assert len(exact) == 10
        figures.append(len(approximate & set(ids(exact))) / 10)
    return figures


def test_recall_at_10_against_exact_search(big: Big, big_conn: psycopg.Connection) -> None:
    large = recall(big_conn, LARGE, big.queries, exact_below=1000)  # the planner's HNSW path
    big_conn.execute("SET enable_sort = off")
    small = recall(big_conn, TARGET, big.queries, exact_below=0)  # HNSW + iterative scan
    exact_path = recall(big_conn, TARGET, big.queries)  # ranked exactly: recall 1
    print(f"recall@10: {LARGE} {np.mean(large):.3f}, {TARGET} (HNSW) {np.mean(small):.3f}")
    assert np.mean(large) >= 0.9, large
    assert np.mean(small) >= 0.9, small
    assert exact_path == [1.0] * len(big.queries)


def test_reads_are_never_prepared_whatever_the_connection_does(
    big: Big, big_conn: psycopg.Connection
) -> None:
    # A prepared statement gets a generic plan, which cannot fold the unused optional
    # filters away: reads.py plans every list and search with its parameters.
    with psycopg.connect(big.url, autocommit=True, prepare_threshold=0) as eager:
        register_vector(eager)
        for _ in range(6):
            reads.list_conversations(eager, LARGE, user_id="u03")
            reads.semantic_search(eager, LARGE, big.queries[0], k=10)
        prepared = eager.execute(
            "SELECT count(*) FROM pg_prepared_statements "
            "WHERE statement LIKE '%%WITH nearest AS%%' OR statement LIKE '%%WITH matched AS%%'",
            prepare=False,
        ).fetchone()
    assert prepared == (0,)
