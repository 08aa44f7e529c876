"""Per-client HNSW indexes (conversation_assets/search_indexes.py) on a real PostgreSQL:
which clients get one, that searches use it, that it follows the clients' sizes,
and that an interrupted build or an overlapping sync leaves nothing wrong."""

from __future__ import annotations

import dagster as dg
import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from conversation_assets import locks, reads, search_indexes
from conversation_assets.assets.search_indexes import conversation_search_indexes
from conversation_assets.search_indexes import INDEX_PREFIX, index_name, sync_search_indexes
from tests.sources import DIM, set_vectors, store, unit
from tests.sources import recent_record as record

# A client code that needs quoting in SQL (a quote, a newline that would end a
# comment, a backslash), to prove the predicate is a literal wherever it lands.
ODD = "o'brien\n& co\\"
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
    assert "client_code = 'o''brien\n& co\\'::text" in definition, definition
    assert "deleted_at IS NULL" in definition, definition
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
    soft_delete(vectors_conn, ODD, 10)  # 20 left: still at the threshold
    kept = sync_search_indexes(vectors_conn, min_vectors=20)
    assert kept.dropped == [] and kept.indexes == 2 and kept.vectors_covered == 80
    soft_delete(vectors_conn, ODD, 1)  # 19 left: under it, ranked exactly from now on
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
        other.execute("SELECT pg_advisory_lock(%s)", (locks.key("search_indexes"),))
        report = sync_search_indexes(vectors_conn, min_vectors=20)
        assert report.skipped_reason and report.built == [] and indexes(vectors_conn) == {}
        # Released here: a closed connection's backend may still hold it a moment.
        other.execute("SELECT pg_advisory_unlock_all()")
    assert sync_search_indexes(vectors_conn, min_vectors=20).indexes == 2


def test_settings_are_given_back_and_bad_arguments_refused(
    vectors_conn: psycopg.Connection, postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A graph that needs 601 MB by the estimate (60 x (1 KB + 10 MB)): the build gets
    # more than the session had, and the session gets its own back.
    monkeypatch.setattr(search_indexes, "_GRAPH_BYTES_PER_ELEMENT", 10 * 2**20)
    said: list[str] = []
    with postgres.connection() as pooled:
        pooled.execute("SET maintenance_work_mem = '77MB'")
        report = sync_search_indexes(pooled, min_vectors=60, progress=said.append)
        assert report.built == ["big"]
        assert any("60 vectors, 601 MB" in line for line in said), said
        # The connection goes back to the pool with the settings it came with.
        assert pooled.execute("SHOW statement_timeout").fetchone() == ("5min",)
        assert pooled.execute("SHOW maintenance_work_mem").fetchone() == ("77MB",)
    for bad in ({"min_vectors": 0}, {"max_indexes": -1}, {"build_memory_mb": 8}):
        with pytest.raises(ValueError):
            sync_search_indexes(vectors_conn, **bad)  # type: ignore[arg-type]
    with vectors_conn.transaction(), pytest.raises(ValueError, match="no transaction open"):
        sync_search_indexes(vectors_conn)
    vectors_conn.autocommit = False
    with pytest.raises(ValueError, match="autocommit"):
        sync_search_indexes(vectors_conn)


def test_a_failed_build_lets_the_others_run_and_leaves_nothing_behind(
    vectors_conn: psycopg.Connection, db_url: str
) -> None:
    # Another session holds the lock every build needs; the builds give up after 200 ms.
    vectors_conn.execute("SET lock_timeout = '200ms'")
    with psycopg.connect(db_url) as blocker:
        blocker.execute("LOCK TABLE conversations IN SHARE UPDATE EXCLUSIVE MODE")
        with pytest.raises(search_indexes.SearchIndexError) as raised:
            sync_search_indexes(vectors_conn, min_vectors=20)
        blocker.rollback()
    report = raised.value.report
    assert set(report.failed) == {"big", ODD} and report.built == []
    assert all("lock" in reason for reason in report.failed.values()), report.failed
    assert indexes(vectors_conn) == {}  # no invalid leftover
    assert vectors_conn.execute("SHOW statement_timeout").fetchone() == ("0",)  # as it was
    # The lock was given back: the next sync runs and builds both (waiting as long as
    # it takes, should autovacuum hold the table's lock a moment).
    vectors_conn.execute("RESET lock_timeout")
    assert sorted(sync_search_indexes(vectors_conn, min_vectors=20).built) == sorted(["big", ODD])


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

    # A sync under way elsewhere: the run fails, with no materialization.
    with psycopg.connect(postgres.database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (locks.key("search_indexes"),))
        skipped = dg.materialize(
            [conversation_search_indexes], resources={"postgres": postgres}, raise_on_error=False
        )
        other.execute("SELECT pg_advisory_unlock_all()")
    assert not skipped.success
    assert skipped.asset_materializations_for_node("conversation_search_indexes") == []


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


def test_placeholders_in_sql_comments_are_never_filled() -> None:
    # A value with a newline filled into a comment would end the comment and run.
    from psycopg import sql

    from conversation_assets.queries import query

    rendered = query(
        "reads_nearest", columns=sql.SQL("c.id"), order=sql.SQL("distance\nDROP TABLE x")
    ).as_string(None)
    comments = [line for line in rendered.splitlines() if line.lstrip().startswith("--")]
    assert any("{order} is `distance`" in line for line in comments), comments
    assert rendered.count("DROP TABLE x") == 1  # only where the placeholder is in the SQL
