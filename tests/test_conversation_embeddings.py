"""The embedding backlog: cache, dimension check, model change, the asset and its sensor."""

import dagster as dg
import numpy as np
import pytest

from conversation_assets.assets.embeddings import conversation_embeddings
from conversation_assets.embedding import embed_backlog
from conversation_assets.store import upsert_conversations
from resources.embeddings import DimensionMismatchError, EmbeddingResource
from sensors import build_embedding_backlog_sensor
from tests.sources import pipeline_resources, record

# --- the backlog --------------------------------------------------------------------


def test_embeddings_drain_the_backlog_and_unchanged_text_is_never_embedded_again(conn, postgres):
    same = "User: where is my order?\nAssistant: it ships today."
    upsert_conversations(
        conn,
        [
            record("a", full_conversation=same),
            record("b", full_conversation=same),
            record("c", full_conversation="User: refund please"),
            record("empty", full_conversation=""),
        ],
    )
    embedder = EmbeddingResource()

    first = embed_backlog(postgres.pool, embedder, batch_size=2)
    assert (first.embedded, first.texts_sent, first.backlog_left) == (4, 2, 0)
    stored = dict(conn.execute("SELECT session_id, embedding IS NOT NULL FROM conversations"))
    assert stored == {"a": True, "b": True, "c": True, "empty": False}
    assert (
        conn.execute(
            "SELECT count(*) FROM conversations WHERE embedding_hash IS DISTINCT FROM content_hash"
        ).fetchone()[0]
        == 0
    )

    again = embed_backlog(postgres.pool, embedder)
    assert (again.embedded, again.texts_sent) == (0, 0)

    # A new conversation with a known text comes from the cache; a changed one is re-embedded.
    upsert_conversations(
        conn,
        [
            record("d", full_conversation=same),
            record("c", full_conversation="User: refund now please"),
        ],
    )
    third = embed_backlog(postgres.pool, embedder)
    assert (third.embedded, third.cache_hits, third.texts_sent) == (2, 1, 1)
    vector = np.array(
        conn.execute(
            "SELECT embedding::real[] FROM conversations WHERE session_id = 'c'"
        ).fetchone()[0]
    )
    expected = embedder.embed(["User: refund now please"])[0]
    assert np.allclose(vector, expected, atol=1e-6)


def test_a_text_the_model_refuses_never_stops_the_backlog(conn, postgres, model_server):
    model_server.max_text_chars = 4000  # a model's context limit, in characters here
    (model_server.dimension,) = conn.execute(
        "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'conversations'::regclass "
        "AND attname = 'embedding'"
    ).fetchone()
    remote = EmbeddingResource(backend="openai", base_url=model_server.url, max_retries=0)
    upsert_conversations(
        conn,
        [record(f"s{i}", full_conversation=f"User: question {i}") for i in range(5)]
        + [record("long", full_conversation="User: " + "漢" * 6000)],
    )

    report = embed_backlog(postgres.pool, remote, batch_size=10)

    assert (report.embedded, report.refused, report.backlog_left) == (6, 1, 0)
    assert "input longer than 4000" in (report.last_refusal or "")
    stored = dict(conn.execute("SELECT session_id, embedding IS NOT NULL FROM conversations"))
    assert stored == {**{f"s{i}": True for i in range(5)}, "long": False}
    # Not cached as "no vector": a later model (or a shorter text) is asked again.
    assert conn.execute("SELECT count(*) FROM embedding_cache").fetchone() == (5,)


def test_a_dimension_mismatch_stops_before_any_write_and_names_the_fix(conn, postgres):
    upsert_conversations(conn, [record("a")])
    conn.execute("ALTER TABLE conversations ALTER COLUMN embedding TYPE vector(8)")

    with pytest.raises(DimensionMismatchError, match=r"(?s)256-d .* vector\(8\).*ALTER TABLE"):
        embed_backlog(postgres.pool, EmbeddingResource())
    assert conn.execute("SELECT count(*) FROM embedding_cache").fetchone()[0] == 0


def test_a_new_model_requeues_every_vector(conn, postgres):
    upsert_conversations(conn, [record("a"), record("b")])
    embed_backlog(postgres.pool, EmbeddingResource())
    conn.execute("UPDATE embedding_state SET model = 'ollama:old-model'")

    report = embed_backlog(postgres.pool, EmbeddingResource())

    assert report.requeued_for_model_change == 2
    assert report.embedded == 2 and report.cache_hits == 2  # the cache is per model


# --- the embeddings asset and its sensor --------------------------------------------


def test_embedding_asset_and_backlog_sensor(conn, postgres):
    instance = dg.DagsterInstance.ephemeral()
    sensor = build_embedding_backlog_sensor()

    def tick():
        with dg.build_sensor_context(instance=instance, resources={"postgres": postgres}) as c:
            return sensor(c)

    assert isinstance(tick(), dg.SkipReason)
    upsert_conversations(conn, [record("a"), record("b")])
    request = tick()
    assert isinstance(request, dg.RunRequest) and request.tags["embedding/backlog"] == "2"

    result = dg.materialize(
        [conversation_embeddings], resources=pipeline_resources(postgres), instance=instance
    )
    assert result.success
    metadata = result.asset_materializations_for_node("conversation_embeddings")[0].metadata
    assert metadata["embedded"].value == 2 and metadata["backlog_left"].value == 0
    assert isinstance(tick(), dg.SkipReason)
