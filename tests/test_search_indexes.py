"""Per-client HNSW indexes (conversation_assets/search_indexes.py) on a real PostgreSQL:
which clients get one, that searches use it, that it follows the clients' sizes,
and that an interrupted build or an overlapping sync leaves nothing wrong."""

from __future__ import annotations

import dagster as dg
import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from conversation_assets import reads
from conversation_assets.assets.conversations import conversation_search_indexes
from conversation_assets.search_indexes import INDEX_PREFIX, index_name, sync_search_indexes
from tests.test_reads import DIM, record, set_vectors, store, unit

# A client code that needs quoting in SQL, to prove the predicate is a literal.
ODD = "o'brien & co"
SIZES = {"big": 60, ODD: 30, "small": 5}


@pytest.fixture
def vectors_conn(conn: psycopg.Connection) -> psycopg.Connection:
    """Three clients of 60, 30 and 5 conversations, all with vectors, analysed."""
    rng = np.random.default_rng(11)
    for client, count in SIZES.items():
        records = [
            record(f"{client}-{i}", client_code=client, crew_code=f"crew-{client}")
            for i in range(count)
        ]
        ids = store(conn, *records)
        set_vectors(conn, ids, unit(rng.standard_normal((count, DIM))))
    conn.execute("VACUUM ANALYZE conversations")
    register_vector(conn)
    return conn


def indexes(conn: psycopg.Connection) -> dict[str, str]:
    """Per-client index name -> its definition."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_indexdef(c.oid) FROM pg_index AS i "
        "JOIN pg_class AS c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'conversations'::regclass AND starts_with(c.relname, %s)",
        (INDEX_PREFIX,),
    ).fetchall()
    return dict(rows)


def test_clients_over_the_threshold_get_their_own_index(vectors_conn: psycopg.Connection) -> None:
    report = sync_search_indexes(vectors_conn, min_vectors=20)
    assert sorted(report.built) == sorted(["big", ODD])
    assert report.indexes == 2 and report.vectors_covered == 90 and report.vectors_total == 95
    built = indexes(vectors_conn)
    assert set(built) == {index_name("big"), index_name(ODD)}
    definition = built[index_name(ODD)]
    assert "USING hnsw (embedding vector_cosine_ops)" in definition, definition
    assert "client_code = 'o''brien & co'::text" in definition, definition
    assert report.index_bytes > 0

    # Nothing to do the second time.
    again = sync_search_indexes(vectors_conn, min_vectors=20)
    assert (again.built, again.dropped, again.indexes) == ([], [], 2)


def test_searches_use_their_clients_index_and_find_the_exact_neighbours(
    vectors_conn: psycopg.Connection,
) -> None:
    sync_search_indexes(vectors_conn, min_vectors=20)
    vectors_conn.execute("SET enable_sort = off")  # the index path, at this tiny size
    query = unit(np.random.default_rng(3).standard_normal(DIM))
    for client in ("big", ODD):
        plan = reads.explain_search(vectors_conn, client, query, exact_below=0)
        assert f"Index Scan using {index_name(client)}" in plan, plan
        found = reads.semantic_search(vectors_conn, client, query, k=10, exact_below=0)
        exact = reads.exact_search(vectors_conn, client, query, k=10)
        assert [h.conversation.id for h in found] == [h.conversation.id for h in exact]
        assert {h.conversation.client_code for h in found} == {client}
    # A client without one still goes through the shared index.
    plan = reads.explain_search(vectors_conn, "small", query, exact_below=0)
    assert "Index Scan using conversations_embedding_hnsw_idx" in plan, plan


def test_the_largest_clients_first_and_shrunk_ones_dropped(
    vectors_conn: psycopg.Connection,
) -> None:
    only_one = sync_search_indexes(vectors_conn, min_vectors=20, max_indexes=1)
    assert only_one.built == ["big"] and set(indexes(vectors_conn)) == {index_name("big")}

    sync_search_indexes(vectors_conn, min_vectors=20)
    soft_delete(vectors_conn, ODD, 11)  # 19 left: under 20, over half of it
    kept = sync_search_indexes(vectors_conn, min_vectors=20)
    assert kept.dropped == [] and kept.indexes == 2  # no rebuild at the threshold
    soft_delete(vectors_conn, ODD, 10)  # 9 left: under half
    shrunk = sync_search_indexes(vectors_conn, min_vectors=20)
    assert shrunk.dropped == [index_name(ODD)]
    assert set(indexes(vectors_conn)) == {index_name("big")}


def soft_delete(conn: psycopg.Connection, client: str, count: int) -> None:
    conn.execute(
        "UPDATE conversations SET deleted_at = now(), deleted_by = 'product' WHERE id IN "
        "(SELECT id FROM conversations WHERE client_code = %s AND deleted_at IS NULL "
        "ORDER BY session_id LIMIT %s)",
        (client, count),
    )


def test_an_invalid_leftover_is_dropped_and_rebuilt(vectors_conn: psycopg.Connection) -> None:
    # What an interrupted CREATE INDEX CONCURRENTLY leaves: an invalid index by that name.
    name = index_name("big")
    with pytest.raises(psycopg.errors.UniqueViolation):
        vectors_conn.execute(
            f'CREATE UNIQUE INDEX CONCURRENTLY "{name}" ON conversations (user_id)'
        )
    (valid,) = vectors_conn.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (name,)
    ).fetchone()
    assert valid is False
    report = sync_search_indexes(vectors_conn, min_vectors=50)
    assert report.dropped == [name] and report.built == ["big"]
    assert "USING hnsw" in indexes(vectors_conn)[name]
    (valid,) = vectors_conn.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (name,)
    ).fetchone()
    assert valid is True


def test_an_overlapping_sync_skips(vectors_conn: psycopg.Connection, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended('conversation_search_indexes', 0))")
        report = sync_search_indexes(vectors_conn, min_vectors=20)
        assert report.skipped_reason and report.built == [] and indexes(vectors_conn) == {}
    assert sync_search_indexes(vectors_conn, min_vectors=20).indexes == 2


def test_settings_are_reset_and_bad_arguments_refused(
    vectors_conn: psycopg.Connection, postgres
) -> None:
    with postgres.connection() as pooled:
        pooled.execute("SET maintenance_work_mem = '77MB'")
        assert sync_search_indexes(pooled, min_vectors=20).indexes == 2
        # The connection goes back to the pool with the settings it came with.
        assert pooled.execute("SHOW statement_timeout").fetchone() == ("5min",)
        assert pooled.execute("SHOW maintenance_work_mem").fetchone() == ("77MB",)
    for bad in ({"min_vectors": 0}, {"max_indexes": -1}, {"build_memory_mb": 8}):
        with pytest.raises(ValueError):
            sync_search_indexes(vectors_conn, **bad)  # type: ignore[arg-type]
    vectors_conn.autocommit = False
    with pytest.raises(ValueError, match="autocommit"):
        sync_search_indexes(vectors_conn)


def test_the_asset_reports_what_it_built(vectors_conn: psycopg.Connection, postgres) -> None:
    result = dg.materialize(
        [conversation_search_indexes],
        resources={"postgres": postgres},
        run_config={"ops": {"conversation_search_indexes": {"config": {"min_vectors": 50}}}},
    )
    assert result.success
    metadata = result.asset_materializations_for_node("conversation_search_indexes")[0].metadata
    assert metadata["built_for_clients"].value == ["big"]
    assert metadata["client_indexes"].value == 1
    assert metadata["vectors_in_client_indexes"].value == 60
    assert metadata["live_vectors"].value == 95
    assert set(indexes(vectors_conn)) == {index_name("big")}


def test_the_cli_syncs_and_says_what_it_did(
    vectors_conn: psycopg.Connection,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conversation_assets import cli

    monkeypatch.setenv("DATABASE_URL", db_url)
    assert cli.main(["search-indexes", "--min-vectors", "20", "--max-indexes", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 client indexes hold 60 of 95 live vectors (1 built, 0 dropped" in out, out
    assert set(indexes(vectors_conn)) == {index_name("big")}
    assert cli.main(["search-indexes", "--max-indexes", "0"]) == 0
    assert "0 client indexes" in capsys.readouterr().out and indexes(vectors_conn) == {}
