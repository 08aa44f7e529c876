"""Conversations: schema, bulk writes and rejects, the builder, embeddings, the assets."""

import enum
import hashlib
import json
import os
import random
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np
import orjson
import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Json

from conversation_assets import migrate
from conversation_assets.assets.conversations import conversations, conversations_match_sessions
from conversation_assets.assets.discovery import discovered_sessions
from conversation_assets.assets.embeddings import conversation_embeddings
from conversation_assets.assets.enrichment import enriched_conversations
from conversation_assets.bulk import BulkUpsertError, upsert_conversations_in_batches
from conversation_assets.conversations import build_conversations
from conversation_assets.discovery import discover
from conversation_assets.embedded import scratch_database
from conversation_assets.embedding import embed_backlog
from conversation_assets.enrichment import enrich
from conversation_assets.store import (
    BLANK_CHARACTERS,
    ConversationRecord,
    MetadataRefused,
    conversation_id,
    is_blank,
    metadata_json,
    upsert_conversations,
)
from jobs import INCREMENTAL_RUN_CONFIG
from resources.embeddings import DimensionMismatchError, EmbeddingResource
from resources.summarizer import SummarizerResource
from sensors import build_embedding_backlog_sensor
from tests.fakes import fake_summary
from tests.sources import add_crew, stats_flush, table_id

DAY = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
WIDE = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


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


def rows(conn, columns="session_id, summary, status, deleted_at IS NOT NULL"):
    return conn.execute(
        sql.SQL("SELECT {} FROM conversations ORDER BY session_id").format(sql.SQL(columns))
    ).fetchall()


def run_pipeline(postgres, **build):
    discover(postgres.pool, reconcile_after=timedelta(0))
    return build_conversations(postgres.pool, **build)


# --- schema -------------------------------------------------------------------------


def test_the_vector_column_follows_the_configured_dimension_and_down_reverses(server_url):
    with scratch_database(server_url, "cp_dim") as url, psycopg.connect(url, autocommit=True) as c:
        asked = []
        migrate.upgrade(c, embedding_dimension=lambda: asked.append(1) or 768)
        assert asked == [1]
        dimension = c.execute(
            "SELECT atttypmod FROM pg_attribute "
            "WHERE attrelid = 'conversations'::regclass AND attname = 'embedding'"
        ).fetchone()[0]
        assert dimension == 768
        assert (
            c.execute(
                "SELECT indexdef FROM pg_indexes "
                "WHERE indexname = 'conversations_embedding_hnsw_idx'"
            )
            .fetchone()[0]
            .endswith("WHERE (embedding IS NOT NULL)")
        )
        # Up to date: the model is not asked again.
        migrate.upgrade(c, embedding_dimension=lambda: asked.append(1) or 768)
        assert asked == [1]

        migrate.downgrade(c, 2)
        assert c.execute("SELECT to_regclass('conversations')").fetchone()[0] is None
        assert (
            c.execute(
                "SELECT count(*) FROM pg_attribute "
                "WHERE attrelid = 'discovered_sessions'::regclass AND attname = 'content_checksum'"
            ).fetchone()[0]
            == 0
        )
        migrate.upgrade(c)
        assert c.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0


def test_timestamps_trigger_keeps_updated_at_honest(conn):
    upsert_conversations(conn, [record()])
    first = conn.execute(
        "SELECT created_at, updated_at, last_message_at FROM conversations"
    ).fetchone()
    assert first[0] == DAY and first[2] == DAY  # last_message_at falls back to created_at

    time.sleep(0.01)
    report = upsert_conversations(conn, [record()])  # nothing changed: nothing rewritten
    assert (report.unchanged, report.updated) == (1, 0)
    assert conn.execute("SELECT updated_at FROM conversations").fetchone()[0] == first[1]

    upsert_conversations(conn, [record(summary="new", created_at=None)])
    created, updated = conn.execute("SELECT created_at, updated_at FROM conversations").fetchone()
    assert created == DAY  # not given: kept
    assert updated > first[1]


# --- bulk writes and rejects ----------------------------------------------------------


def test_bad_rows_are_rejected_with_their_reason_and_the_rest_lands(conn):
    good = [record(f"ok{i}") for i in range(5)]
    bad = [
        record("nul", full_conversation="User: a\x00b"),
        record("listmeta", metadata=["not", "an", "object"]),
        record("nanmeta", metadata={"x": float("nan")}),
        record("nulmeta", metadata={"x": "a\x00b"}),
        record("status", status="deleted"),
        record("", user_id="u"),
        record("nouser", user_id=" "),
        record("x" * 300),
        record("longchannel", channel="c" * 51),
        record("sentiment", sentiment=3.0),
        record("count", message_count="2"),
        record("bigcount", message_count=2**32 + 5),  # the binary COPY would store 5
        record("surrogate", summary="\ud800"),
    ]
    report = upsert_conversations(conn, good + bad[:6] + good[:1] + bad[6:])

    assert report.inserted == 5
    reasons = dict(conn.execute("SELECT record_key, reason FROM conversation_rejects"))
    assert reasons == {r.record_key: reasons[r.record_key] for r in bad}
    assert reasons["crew/nul"] == "full_conversation contains a NUL byte"
    assert reasons["crew/listmeta"] == "metadata is not a JSON object (array)"
    assert reasons["crew/nanmeta"].startswith("metadata is not JSON")
    assert "NUL character" in reasons["crew/nulmeta"]
    assert reasons["crew/status"].startswith("status 'deleted' is not one of")
    assert reasons["crew/"] == "session_id is missing or empty"
    assert reasons["crew/nouser"] == "user_id is missing or empty"
    assert reasons["crew/" + "x" * 300] == "session_id is longer than 255 characters"
    assert reasons["crew/longchannel"] == "channel is longer than 50 characters"
    assert reasons["crew/sentiment"] == "sentiment is outside [-1, 1]"
    assert reasons["crew/count"] == "message_count is not an integer (str)"
    assert reasons["crew/bigcount"] == (
        "message_count 4294967301 is out of range for an integer column"
    )
    assert "surrogate" in reasons["crew/surrogate"]
    assert sorted(r.reason for r in report.rejects) == sorted(reasons.values())
    assert [r[0] for r in rows(conn)] == [f"ok{i}" for i in range(5)]

    # Fixed at the source, the record lands and its reject is gone.
    upsert_conversations(conn, [record("status")])
    assert "crew/status" not in dict(
        conn.execute("SELECT record_key, reason FROM conversation_rejects")
    )


def test_a_batch_refused_by_copy_is_checked_and_written_again_inside_the_callers_transaction(
    conn,
):
    # Texts go unchecked first; a NUL byte passes the encoder and fails the COPY. The
    # retry must undo only the batch's own attempt (a savepoint here), not the
    # caller's earlier work, and record its Python rejects once.
    conn.execute("CREATE TABLE callers_work (n integer)")
    conn.autocommit = False
    conn.execute("INSERT INTO callers_work VALUES (1)")
    report = upsert_conversations(
        conn,
        [
            record("before"),
            record("nul", summary="a\x00b"),
            record("badmeta", metadata={"x": float("inf")}),
            record("after"),
        ],
    )
    conn.commit()
    conn.autocommit = True

    assert (report.inserted, report.rejected) == (2, 2)
    assert sorted(r.record_key for r in report.rejects) == ["crew/badmeta", "crew/nul"]
    assert [r[0] for r in rows(conn)] == ["after", "before"]
    reasons = dict(conn.execute("SELECT record_key, reason FROM conversation_rejects"))
    assert reasons["crew/nul"] == "summary contains a NUL byte"
    assert reasons["crew/badmeta"].startswith("metadata is not JSON")
    assert len(reasons) == 2
    assert conn.execute("SELECT n FROM callers_work").fetchall() == [(1,)]


def test_values_the_encoder_refuses_are_rejected_with_their_field(conn):
    report = upsert_conversations(
        conn,
        [
            record("ok1"),
            record("nottext", channel=7),
            record("intranscript", full_conversation=5),  # hashed before any check
            record("surrogate", user_id="u\udc80"),
            record("listcrew", crew_code=["crew"]),  # cannot even key the batch
            record("ok2"),
        ],
    )
    assert report.inserted == 2
    reasons = {r.record_key: r.reason for r in report.rejects}
    assert reasons["crew/nottext"] == "channel is not text (int)"
    assert reasons["crew/intranscript"] == "full_conversation is not text (int)"
    assert "surrogate" in reasons["crew/surrogate"]
    assert [reason for key, reason in reasons.items() if key.startswith("sha256:")] == [
        "crew_code is not text (list)"
    ]
    assert [r[0] for r in rows(conn)] == ["ok1", "ok2"]

    # Two such records alike share a record key (a hash of the record): one reject row.
    twins = [record("listcrew", crew_code=["crew"]), record("listcrew", crew_code=["crew"])]
    assert upsert_conversations(conn, twins).rejected == 2
    assert conn.execute(
        "SELECT count(*) FROM conversation_rejects WHERE reason = 'crew_code is not text (list)'"
    ).fetchone() == (1,)


def test_the_content_hash_is_the_sha256_of_the_transcript_and_rejects_show_the_record(conn):
    # The embedding cache and backlog key on it: sha256 of the UTF-8 text, "" for none.
    texts = {"plain": "User: hi", "accents": "Usuário: olá 👋", "none": None, "empty": ""}
    upsert_conversations(
        conn, [record(name, full_conversation=text) for name, text in texts.items()]
    )
    stored = dict(conn.execute("SELECT session_id, content_hash FROM conversations"))
    assert stored == {
        name: hashlib.sha256((text or "").encode("utf-8")).digest() for name, text in texts.items()
    }

    # A record refused in SQL is kept as JSON of what was sent, in the record's order
    # (its key fields first, so a long summary cannot push them out), without the hash.
    upsert_conversations(
        conn,
        [
            record("badstatus", status="gone", summary="a summary"),
            record("longsummary", status="gone", summary="S" * 600),
            record("nocrew", crew_code=None),
        ],
    )
    excerpts = dict(conn.execute("SELECT record_key, record_excerpt FROM conversation_rejects"))
    sent = json.loads(excerpts["crew/badstatus"])
    assert list(sent)[:3] == ["client_code", "crew_code", "session_id"]
    assert (sent["status"], sent["summary"]) == ("gone", "a summary")
    assert "content_hash" not in sent
    assert excerpts["crew/longsummary"].startswith(
        '{"client_code":"acme","crew_code":"crew","session_id":"longsummary",'
    )
    # Without a crew the key is the hash of that JSON: the same as earlier versions'.
    (nocrew,) = [key for key in excerpts if key.startswith("sha256:")]
    assert nocrew == "sha256:" + hashlib.sha256(excerpts[nocrew].encode()).hexdigest()


def test_metadata_json_writes_what_json_writes(conn):
    # orjson writes the metadata unless json would write it differently or refuse it.
    class Color(enum.Enum):
        RED = "red"

    class Label(str):
        pass

    cases = {
        "plain": {"a": 1, "b": [1.5, 1e-05, 1e16], "c": {"d": "olá"}, "e": True},
        "nulls": {"a": None, "b": "nullable"},
        "intkeys": {1: "one", None: "none"},
        "subclass": {"label": Label("x")},
        "bigint": {"n": 2**70},
        "enum": {"color": Color.RED},
    }
    refused = {
        "nan": {"x": float("nan")},
        "date": {"when": datetime(2026, 1, 1)},
        "fragment": orjson.Fragment(b"{oops"),  # raw text orjson does not check
    }
    report = upsert_conversations(
        conn,
        [record(name, metadata=metadata) for name, metadata in {**cases, **refused}.items()],
    )
    stored = dict(conn.execute("SELECT session_id, metadata FROM conversations"))
    expected = {name: json.loads(json.dumps(m)) for name, m in cases.items() if name != "enum"}
    assert {k: v for k, v in stored.items() if k != "enum"} == expected
    assert stored["enum"] == {"color": "red"}  # json refuses an Enum; orjson writes its value
    reasons = {r.record_key: r.reason for r in report.rejects}
    assert set(reasons) == {f"crew/{name}" for name in refused}
    assert all(reason.startswith("metadata is not JSON") for reason in reasons.values())


def test_metadata_with_nulls_keeps_orjsons_output_and_nan_is_refused_as_json_refuses_it():
    # A null is usually None (every session of a table without created_at has
    # duration_seconds: null): orjson's output stands, written once. orjson also
    # writes NaN and infinities as null; they are found and refused with json's reason.
    common = {"duration_seconds": None, "turns": [1, None, 2.5], "language": "en"}
    assert metadata_json(common) == orjson.dumps(common)  # not json's '{"a": null}'
    json_reason = str(pytest.raises(ValueError, json.dumps, [float("nan")], allow_nan=False).value)
    for hidden in (
        {"a": None, "b": float("nan")},
        {"a": [None, {"b": float("-inf")}]},
        {"a": None, "t": (1.0, float("inf"))},
    ):
        with pytest.raises(MetadataRefused) as refused:
            metadata_json(hidden)
        assert str(refused.value) == f"metadata is not JSON: {json_reason}"


def test_the_write_path_touches_no_process_wide_switch(conn, postgres):
    # No socket option, no garbage-collector switch, no adapter outside its own cursor:
    # an application's connection and process are as they were.
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    with sock:
        buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        spelled = conn.execute("SELECT %s::text", [Json({"a": 1})]).fetchone()
        upsert_conversations(conn, [record("one", metadata={"a": None})])
        upsert_conversations_in_batches(conn, [record("two"), record("three")], batch_size=1)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == buffer
    assert spelled == ('{"a": 1}',)  # json.dumps, the default, on the connection
    assert conn.execute("SELECT %s::text", [Json({"a": 1})]).fetchone() == spelled
    with postgres.pool.connection() as pooled:
        assert pooled.execute("SELECT %s::text", [Json({"a": 1})]).fetchone() == spelled
    assert [r[0] for r in rows(conn)] == ["one", "three", "two"]


def test_two_rejected_records_of_one_session_leave_one_reject(conn):
    # The rejects table holds one row a record key; the last record's reason wins.
    report = upsert_conversations(
        conn,
        [
            record("twice", metadata=["not", "json", "object"]),
            record("twice", metadata={"x": float("nan")}),
            record("twice", summary="a\x00b"),
        ],
    )
    assert report.inserted == 0
    reasons = dict(conn.execute("SELECT record_key, reason FROM conversation_rejects"))
    assert list(reasons) == ["crew/twice"]
    assert reasons["crew/twice"] == "summary contains a NUL byte"


def test_encoding_a_batch_leaves_the_garbage_collector_alone(conn):
    # A process-wide switch is the application's: the write path never flips it.
    import gc

    def failing_source():
        yield record("gc2")
        raise RuntimeError("the source broke mid-batch")

    seen = []

    class Watching(dict):
        """Metadata that notes, while it is encoded, whether the collector runs."""

        def items(self):
            seen.append(gc.isenabled())
            return super().items()

    assert gc.isenabled()
    upsert_conversations(conn, [record("gc1", metadata=Watching(language="en"))])
    assert seen == [True] and gc.isenabled()  # running while encoding, and after
    with pytest.raises(RuntimeError, match="mid-batch"):
        upsert_conversations(conn, failing_source())
    assert gc.isenabled()  # after a failure too
    gc.disable()
    try:
        upsert_conversations(conn, [record("gc3")])
        assert not gc.isenabled()  # someone else's choice stands
    finally:
        gc.enable()
    assert [r[0] for r in rows(conn)] == ["gc1", "gc3"]


def test_a_bulk_load_leaves_the_garbage_collector_alone(conn, postgres):
    # Freezing objects (gc.freeze) is process-wide, and the application's choice:
    # a load neither freezes nor unfreezes, during the load, after it, or on failure.
    import gc

    seen = []
    frozen_before = gc.get_freeze_count()

    def source(prefix):
        for i in range(7):
            seen.append((gc.isenabled(), gc.get_freeze_count()))  # between and in batches
            yield record(f"{prefix}{i}")

    upsert_conversations_in_batches(postgres.pool, source("p"), batch_size=2)
    upsert_conversations_in_batches(conn, source("c"), batch_size=2)
    assert seen == [(True, frozen_before)] * 14
    assert gc.get_freeze_count() == frozen_before and gc.isenabled()

    def failing():
        yield record("f1")
        raise RuntimeError("the source broke mid-load")

    with pytest.raises(BulkUpsertError, match="mid-load"):
        upsert_conversations_in_batches(postgres.pool, failing(), batch_size=1)
    assert gc.get_freeze_count() == frozen_before

    # Objects someone else froze (a server about to fork) stay frozen.
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        upsert_conversations_in_batches(conn, [record("after-freeze")])
        assert gc.get_freeze_count() > frozen // 2 > 0  # not unfrozen by the load
    finally:
        gc.unfreeze()
    assert len(rows(conn)) == 16  # 7 + 7, f1 (its batch committed), after-freeze


def test_a_batch_is_all_or_nothing_when_its_connection_dies(conn, db_url):
    upsert_conversations(conn, [record("s0")])
    batch = [record(f"s{i}", summary="second version") for i in range(200)]
    outcome: dict = {}

    def write() -> None:
        with psycopg.connect(db_url, autocommit=True, application_name="cp-victim") as victim:
            try:
                upsert_conversations(victim, batch)
            except psycopg.Error as error:
                outcome["error"] = error

    with psycopg.connect(db_url) as blocker:
        blocker.execute("SELECT 1 FROM conversations WHERE session_id = 's0' FOR UPDATE")
        writer = threading.Thread(target=write)
        writer.start()
        pid = None
        for _ in range(200):
            pid = conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE application_name = 'cp-victim' AND wait_event_type = 'Lock'"
            ).fetchone()
            if pid:
                break
            time.sleep(0.05)
        assert pid, "the batch never reached its upsert"
        conn.execute("SELECT pg_terminate_backend(%s)", pid)
        writer.join(timeout=30)
        blocker.rollback()

    assert "error" in outcome
    assert rows(conn, "session_id, summary") == [("s0", "hello from s0")]
    report = upsert_conversations(conn, batch)  # the rerun writes it whole
    assert (report.inserted, report.updated) == (199, 1)


@pytest.mark.parametrize("through", ["connection", "pool"])
def test_a_bulk_load_in_batches_lands_whole_and_the_last_record_of_a_session_wins(
    conn, postgres, through
):
    first = [record(f"s{i:03}", summary="first") for i in range(300)]
    again = [record(f"s{i:03}", summary="last") for i in range(0, 300, 3)]
    bad = [record("nul", full_conversation="a\x00b"), record("status", status="gone")]
    target = conn if through == "connection" else postgres.pool
    # Batches of 7 and 3 workers: each session's two records sit in different batches.
    report = upsert_conversations_in_batches(
        target, first + bad + again, batch_size=7, workers=3, source="bulk"
    )

    assert (report.inserted, report.updated, report.rejected) == (300, 100, 2)
    stored = dict(conn.execute("SELECT session_id, summary FROM conversations"))
    assert stored == {f"s{i:03}": "last" if i % 3 == 0 else "first" for i in range(300)}
    assert conn.execute(
        "SELECT record_key, source FROM conversation_rejects ORDER BY 1"
    ).fetchall() == [("crew/nul", "bulk"), ("crew/status", "bulk")]

    unchanged = upsert_conversations_in_batches(target, first[1::3], batch_size=50, workers=2)
    assert (unchanged.inserted, unchanged.updated, unchanged.unchanged) == (0, 0, 100)


def test_a_failed_batch_of_a_parallel_load_is_raised_and_other_batches_stay(conn, postgres):
    conn.execute(
        "ALTER TABLE conversations ADD CONSTRAINT no_boom CHECK (summary IS DISTINCT FROM 'boom')"
    )
    batch = [record(f"s{i:02}") for i in range(40)] + [record("x", summary="boom")]
    with pytest.raises(BulkUpsertError, match="no_boom") as failure:
        upsert_conversations_in_batches(postgres.pool, batch, batch_size=5, workers=2)
    assert isinstance(failure.value.__cause__, psycopg.errors.CheckViolation)
    stored = {r[0] for r in conn.execute("SELECT session_id FROM conversations")}
    assert "x" not in stored
    # The report counts exactly what committed; the pool got its connections back.
    assert failure.value.report.inserted == len(stored) > 0
    assert postgres.pool.get_stats().get("pool_available", 0) >= 2
    with pytest.raises(ValueError, match="workers must be at least 1"):
        upsert_conversations_in_batches(postgres.pool, batch, workers=0)


def test_an_older_build_never_overwrites_a_newer_one_and_product_choices_stay(conn):
    newer, older = DAY + timedelta(minutes=5), DAY
    upsert_conversations(conn, [record(summary="newer", source_updated_at=newer)])
    report = upsert_conversations(conn, [record(summary="older", source_updated_at=older)])
    assert report.unchanged == 1 and rows(conn)[0][1] == "newer"

    conn.execute("UPDATE conversations SET status = 'archived'")
    upsert_conversations(
        conn, [record(summary="newest", source_updated_at=newer + timedelta(minutes=5))]
    )
    assert rows(conn)[0][1:3] == ("newest", "archived")
    assert (
        conversation_id("crew", "s1") == conn.execute("SELECT id FROM conversations").fetchone()[0]
    )


# --- the builder ------------------------------------------------------------------------


def test_a_session_becomes_a_readable_conversation(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    at = DAY
    say(
        conn,
        "histories",
        "s1",
        "human",
        "Hi! My order has not arrived.",
        at,
        user_id="u-42",
        channel="telegram",
    )
    say(
        conn, "histories", "s1", "ai", "Sorry about that, let me check.", at + timedelta(seconds=30)
    )
    say(conn, "histories", "s1", "human", "Thanks, that worked, great!", at + timedelta(seconds=90))
    say(
        conn,
        "histories",
        "s1",
        "ai",
        "Transferring you now.",
        at + timedelta(seconds=95),
        handoff=True,
    )

    report = run_pipeline(postgres)

    assert (report.written.inserted, report.queue_left) == (1, 0)
    row = conn.execute(
        "SELECT client_code, user_id, channel, status, message_count, full_conversation, "
        "summary, metadata, sentiment, language, created_at, last_message_at FROM conversations"
    ).fetchone()
    client, user, channel, status, count, transcript, summary, metadata, sentiment, language = row[
        :10
    ]
    assert (client, user, channel, status, count) == (
        "acme",
        "u-42",
        "telegram",
        "handoff_complete",
        4,
    )
    assert transcript.splitlines() == [
        "User: Hi! My order has not arrived.",
        "Assistant: Sorry about that, let me check.",
        "User: Thanks, that worked, great!",
        "Assistant: Transferring you now.",
    ]
    assert "My order has not arrived" in summary
    assert metadata["message_count"] == 4 and metadata["duration_seconds"] == 95.0
    assert sentiment > 0 and language == "en"
    assert row[10:] == (at, at + timedelta(seconds=95))


def test_only_changed_sessions_are_rebuilt_and_edits_are_seen(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    for s in ("a", "b", "c"):
        say(conn, "histories", s, "human", f"question {s}", DAY)
    run_pipeline(postgres)
    versions = dict(conn.execute("SELECT session_id, xmin::text FROM conversations"))

    say(conn, "histories", "b", "ai", "answer b", DAY + timedelta(minutes=1))
    edited = conn.execute(
        "UPDATE histories SET message = jsonb_set(message, '{content}', '\"edited c\"') "
        "WHERE session_id = 'c' RETURNING id"
    ).fetchall()
    assert edited
    stats_flush(conn)
    report = run_pipeline(postgres)

    assert report.sessions == 2  # b grew, c was edited in place: a is not touched
    after = dict(conn.execute("SELECT session_id, xmin::text FROM conversations"))
    assert after["a"] == versions["a"] and after["b"] != versions["b"]
    assert (
        "edited c"
        in conn.execute(
            "SELECT full_conversation FROM conversations WHERE session_id = 'c'"
        ).fetchone()[0]
    )


def test_deleted_sessions_are_soft_deleted_then_restored_when_rows_come_back(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    say(conn, "histories", "gone", "human", "bye", DAY)
    say(conn, "histories", "kept", "human", "hello", DAY)
    run_pipeline(postgres)

    conn.execute("DELETE FROM histories WHERE session_id = 'gone'")  # n8n's clear()
    stats_flush(conn)
    report = run_pipeline(postgres)
    assert report.soft_deleted == 1
    assert conn.execute(
        "SELECT session_id, deleted_by FROM conversations WHERE deleted_at IS NOT NULL"
    ).fetchall() == [("gone", "source")]

    say(conn, "histories", "gone", "human", "back again", DAY + timedelta(hours=1))
    run_pipeline(postgres)
    assert rows(conn, "session_id, deleted_at IS NULL") == [("gone", True), ("kept", True)]


def test_a_change_that_lands_during_a_build_is_built_by_the_next_run(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    say(conn, "histories", "s1", "human", "first question", DAY)
    discover(postgres.pool)

    def meanwhile(transcripts):
        # Between the build's read and its write, the session gets a message (each
        # time: the run still ends, leaving the newest change to the next run).
        say(conn, "histories", "s1", "human", "second question", DAY + timedelta(minutes=1))
        discover(postgres.pool)
        return [None] * len(transcripts)

    report = build_conversations(postgres.pool, summarize=meanwhile)
    assert report.batches == 1 and report.queue_left == 1
    assert "second" not in rows(conn, "full_conversation")[0][0]
    assert conn.execute("SELECT version FROM conversation_queue").fetchall() == [(2,)]

    build_conversations(postgres.pool)
    assert "second question" in rows(conn, "full_conversation")[0][0]
    assert conn.execute("SELECT count(*) FROM conversation_queue").fetchone()[0] == 0


def test_a_failing_crew_keeps_its_sessions_queued_and_others_are_built(conn, postgres):
    add_crew(conn, "good", "acme", "good_histories", "seed000")
    add_crew(conn, "bad", "acme", "bad_histories", "n8n")
    say(conn, "good_histories", "g1", "human", "hello", DAY)
    say(conn, "bad_histories", "b1", "human", "hello")
    discover(postgres.pool)
    conn.execute("DROP TABLE bad_histories")

    report = build_conversations(postgres.pool)

    assert "does not exist" in report.crew_errors["bad"]
    assert rows(conn, "session_id") == [("g1",)]
    assert conn.execute("SELECT crew_code FROM conversation_queue").fetchall() == [("bad",)]


def test_incremental_equals_a_from_scratch_full_build(conn, postgres, other_db_url):
    from resources.postgres import PostgresResource

    add_crew(conn, "lc", "acme", "lc_histories", "langchain")
    add_crew(conn, "sd", "globex", "sd_histories", "seed000")
    rng = random.Random(11)
    sessions = {
        "lc": [f"{i:08d}-0000-4000-8000-000000000000" for i in range(12)],
        "sd": [f"sd{i}" for i in range(12)],
    }
    for round_number in range(6):
        for crew, table in (("lc", "lc_histories"), ("sd", "sd_histories")):
            for _ in range(rng.randint(3, 15)):
                session = rng.choice(sessions[crew])
                at = DAY + timedelta(hours=rng.randint(0, 72))
                kind = rng.choice(["human", "ai"])
                if crew == "lc":
                    body = {
                        "type": kind,
                        "data": {
                            "content": f"{kind} {rng.random():.5f}",
                            "type": kind,
                            "additional_kwargs": {"user_id": "u1"},
                        },
                    }
                    conn.execute(
                        "INSERT INTO lc_histories (session_id, message, created_at) "
                        "VALUES (%s, %s, %s)",
                        (session, json.dumps(body), at),
                    )
                else:
                    say(conn, table, session, kind, f"{kind} {rng.random():.5f}", at, channel="web")
            if round_number % 2:
                victim = rng.choice(sessions[crew])
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE session_id = %s").format(table_id(table)),
                    (victim,),
                )
        stats_flush(conn)
        report = run_pipeline(postgres, batch_sessions=5)
        assert not report.crew_errors

    with psycopg.connect(other_db_url, autocommit=True) as other:
        for table in ("lc_histories", "sd_histories"):
            shape = "langchain" if table.startswith("lc") else "seed000"
            add_crew(other, table[:2], "acme" if shape == "langchain" else "globex", table, shape)
            copied = conn.execute(
                sql.SQL(
                    "SELECT id, session_id::text, message::text, created_at FROM {} ORDER BY id"
                ).format(table_id(table))
            ).fetchall()
            with other.cursor().copy(
                sql.SQL("COPY {} (id, session_id, message, created_at) FROM STDIN").format(
                    table_id(table)
                )
            ) as copy:
                for row in copied:
                    copy.write_row(row)
        fresh = PostgresResource(database_url=other_db_url)
        try:
            discover(fresh.pool, mode="full", window=WIDE)
            build_conversations(fresh.pool, mode="full", window=WIDE)
        finally:
            fresh.close()
        columns = (
            "id, client_code, user_id, channel, summary, full_conversation, metadata, "
            "status, message_count, created_at, last_message_at, content_hash"
        )
        live = sql.SQL("SELECT {} FROM conversations WHERE deleted_at IS NULL ORDER BY id").format(
            sql.SQL(columns)
        )
        expected = other.execute(live).fetchall()
    assert expected  # the comparison is not vacuous
    assert conn.execute(live).fetchall() == expected


def test_an_llm_summarizer_that_fails_leaves_the_extractive_summary(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    say(conn, "histories", "s1", "human", "Where is my parcel?", DAY)
    discover(postgres.pool)
    broken = SummarizerResource(
        backend="ollama", base_url="http://127.0.0.1:9", max_retries=0, timeout_seconds=1
    )

    report = build_conversations(
        postgres.pool, summarize=broken.summarize, summarizer_name=broken.name
    )

    assert report.summarizer_errors and "extractive summaries kept" in report.summarizer_errors[0]
    assert rows(conn, "summary, metadata->>'summarizer'") == [("Where is my parcel?", "extractive")]


def test_the_asset_stores_an_llm_summary_from_an_ollama_server(conn, postgres, model_server):
    chat = model_server  # conftest's local Ollama- and OpenAI-compatible server
    add_crew(conn, "crew", "acme", "histories", "seed000")
    say(conn, "histories", "s1", "human", "Where is my parcel?", DAY)
    say(conn, "histories", "s1", "ai", "It ships today.", DAY + timedelta(seconds=5))
    llm = SummarizerResource(backend="ollama", base_url=chat.url, model="tiny")

    result = dg.materialize(
        [discovered_sessions, conversations, enriched_conversations],  # as in discovery_job
        partition_key=DAY.date().isoformat(),
        resources={**_resources(postgres), "summarizer": llm},
        run_config=INCREMENTAL_RUN_CONFIG,
    )

    assert result.success
    transcript, summary, summarizer = conn.execute(
        "SELECT full_conversation, summary, metadata->>'summarizer' FROM conversations"
    ).fetchone()
    assert summary == fake_summary(transcript) and summarizer == "ollama:tiny"
    assert [r["path"] for r in chat.requests] == ["/api/chat"]


# --- embeddings ----------------------------------------------------------------------


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


# --- Dagster ------------------------------------------------------------------------


def _resources(postgres):
    return {
        "postgres": postgres,
        "summarizer": SummarizerResource(),
        "embeddings": EmbeddingResource(),
    }


def test_the_job_builds_conversations_after_discovery_and_the_check_agrees(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    say(conn, "histories", "s1", "human", "hello", DAY)
    say(conn, "histories", "s2", "human", "hello", DAY + timedelta(days=1))

    result = dg.materialize(
        [discovered_sessions, conversations, enriched_conversations],  # as in discovery_job
        partition_key=DAY.date().isoformat(),
        resources=_resources(postgres),
        run_config=INCREMENTAL_RUN_CONFIG,
    )

    assert result.success
    materializations = result.asset_materializations_for_node("conversations")
    own = next(m for m in materializations if m.partition == DAY.date().isoformat())
    assert own.metadata["inserted"].value == 2 and own.metadata["rejected"].value == 0
    announced = {m.partition for m in materializations}
    assert announced == {DAY.date().isoformat(), (DAY + timedelta(days=1)).date().isoformat()}
    assert conversations_match_sessions(postgres=postgres).passed

    conn.execute("UPDATE conversations SET message_count = 7 WHERE session_id = 's1'")
    failed = conversations_match_sessions(postgres=postgres)
    assert not failed.passed and failed.metadata["conversations_with_other_counts"].value == 1

    # A partition run (full mode, the default) rebuilds that day and repairs it.
    full = dg.materialize(
        [conversations], partition_key=DAY.date().isoformat(), resources=_resources(postgres)
    )
    assert full.success
    assert conversations_match_sessions(postgres=postgres).passed


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
        [conversation_embeddings], resources=_resources(postgres), instance=instance
    )
    assert result.success
    metadata = result.asset_materializations_for_node("conversation_embeddings")[0].metadata
    assert metadata["embedded"].value == 2 and metadata["backlog_left"].value == 0
    assert isinstance(tick(), dg.SkipReason)


# --- one item never stops the rest -----------------------------------------------------


def nested(levels: int) -> str:
    """A valid message (jsonb holds it) nested deeper than Python's json can parse."""
    return '{"type": "human", "content": "deep", "x": ' + "[" * levels + "]" * levels + "}"


def rejects(conn):
    return dict(conn.execute("SELECT record_key, reason FROM conversation_rejects"))


def test_a_message_too_deep_for_python_rejects_its_session_and_the_queue_moves_on(conn, postgres):
    add_crew(conn, "a", "acme", "a_histories", "seed000")
    add_crew(conn, "b", "globex", "b_histories", "seed000")
    say(conn, "a_histories", "ok1", "human", "hello from acme", DAY)
    say(conn, "a_histories", "deep", "human", "a normal first message", DAY)
    deep_id = conn.execute(
        sql.SQL(
            "INSERT INTO {} (session_id, message, created_at) VALUES ('deep', %s, %s) RETURNING id"
        ).format(table_id("a_histories")),
        (nested(2500), DAY + timedelta(seconds=1)),
    ).fetchone()[0]
    say(conn, "b_histories", "ok2", "human", "hello from globex", DAY)

    report = run_pipeline(postgres, batch_sessions=10)

    assert rows(conn, "session_id, client_code") == [("ok1", "acme"), ("ok2", "globex")]
    reason = rejects(conn)["a/deep"]
    assert reason.startswith(f"histories row {deep_id}: message is nested too deeply")
    assert [r.record_key for r in report.written.rejects] == ["a/deep"]
    assert report.queue_left == 0  # settled, not left first in the queue
    assert conn.execute(
        "SELECT client_code, crew_code, session_id, source FROM conversation_rejects"
    ).fetchall() == [("acme", "a", "deep", "pipeline")]
    # Enrichment behind it goes on too.
    assert enrich(postgres.pool, mode="incremental").written == 2

    # A change to the session queues it again: retried (and still refused).
    say(conn, "a_histories", "deep", "ai", "still there", DAY + timedelta(seconds=2))
    stats_flush(conn)
    again = run_pipeline(postgres)
    assert [r.record_key for r in again.written.rejects] == ["a/deep"] and again.queue_left == 0


def test_times_python_cannot_load_leave_out_their_row_or_reject_their_session(conn, postgres):
    add_crew(conn, "a", "acme", "a_histories", "seed000")
    for session in ("good", "late", "endless"):
        say(conn, "a_histories", session, "human", f"hello {session}", DAY)
    discover(postgres.pool, reconcile_after=timedelta(0))
    # Valid timestamptz values past what a Python datetime holds, as another writer
    # could leave them between discovery and the build.
    late_id = conn.execute(
        "UPDATE a_histories SET created_at = '10000-01-01' WHERE session_id = 'late' RETURNING id"
    ).fetchone()[0]
    conn.execute(
        "UPDATE discovered_sessions SET started_at = '-infinity' WHERE session_id = 'endless'"
    )

    report = build_conversations(postgres.pool)

    assert rows(conn, "session_id") == [("good",)]
    found = rejects(conn)
    # The row's time is no session time: the builder leaves the row out by discovery's
    # own rule (the session has nothing left to build), and discovery, seeing the
    # update, rejects the row and deletes the session.
    assert "a/late" not in found and report.without_messages == 1
    assert found["a/endless"].startswith("its discovered session cannot be read:")
    assert report.queue_left == 0
    stats_flush(conn)
    assert not discover(postgres.pool, reconcile_after=timedelta(0)).failed
    (reason,) = conn.execute(
        "SELECT reason FROM discovery_rejects WHERE message_id = %s", (late_id,)
    ).fetchone()
    assert reason.startswith("created_at 10000-01-01") and "is no session time" in reason
    assert conn.execute(
        "SELECT deleted_at IS NOT NULL FROM discovered_sessions WHERE session_id = 'late'"
    ).fetchone() == (True,)


def test_a_summarizer_answering_the_wrong_count_or_type_keeps_extractive_summaries(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    say(conn, "histories", "s1", "human", "Where is my parcel?", DAY)
    say(conn, "histories", "s2", "human", "Where is my refund?", DAY)
    discover(postgres.pool)
    report = build_conversations(postgres.pool, summarize=lambda texts: [])
    assert "0 summaries for 2 transcripts" in report.summarizer_errors[0]
    assert report.queue_left == 0 and len(rows(conn)) == 2

    say(conn, "histories", "s1", "ai", "Today.", DAY + timedelta(seconds=5))
    stats_flush(conn)
    discover(postgres.pool)
    build_conversations(postgres.pool, summarize=lambda texts: [{"not": "text"}] * len(texts))
    assert rows(conn, "session_id, metadata->>'summarizer'")[0] == ("s1", "extractive")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("created_at", datetime(2026, 1, 1, 9), "created_at is a naive datetime"),
        ("last_message_at", "2026-01-01T09:00:00Z", "last_message_at is not a datetime (str)"),
        ("source_updated_at", DAY.date(), "source_updated_at is not a datetime (date)"),
        ("created_at", 1_767_258_000, "created_at is not a datetime (int)"),
        ("sentiment", 1e300, "sentiment is outside [-1, 1]"),
        ("sentiment", 10**400, "sentiment is outside [-1, 1]"),
        ("sentiment", float("nan"), "sentiment is outside [-1, 1]"),
        ("sentiment", "0.5", "sentiment is not a number (str)"),
        ("message_count", True, "message_count is not an integer (bool)"),
        ("metadata", {"at": DAY}, "metadata is not JSON"),
        ("channel", 7, "channel is not text (int)"),
    ],
)
def test_a_value_of_the_wrong_type_rejects_its_record_and_the_rest_lands(
    conn, field, value, reason
):
    good = [record("a"), record("c", created_at=DAY + timedelta(minutes=1))]
    report = upsert_conversations(conn, [good[0], record("b", **{field: value}), good[1]])

    assert report.inserted == 2
    assert [r[0] for r in rows(conn)] == ["a", "c"]
    assert [r.record_key for r in report.rejects] == ["crew/b"]
    assert rejects(conn)["crew/b"].startswith(reason)


def test_an_aware_subclass_of_datetime_is_stored(conn):
    class Moment(datetime):
        pass

    at = Moment(2026, 11, 20, 9, tzinfo=UTC)
    report = upsert_conversations(conn, [record("a", created_at=at, source_updated_at=at)])
    assert report.inserted == 1 and not report.rejects


@pytest.mark.parametrize(
    "session_id", ["\n", "\t", "   ", "\r\n", "\u3000", "\u00a0\u2003", "\u2028"]
)
def test_a_key_made_only_of_whitespace_is_rejected_whatever_the_whitespace(conn, session_id):
    report = upsert_conversations(conn, [record(session_id), record("ok", user_id="\t\u205f")])
    assert report.inserted == 0
    assert sorted(r.reason for r in report.rejects) == [
        "session_id is missing or empty",
        "user_id is missing or empty",
    ]


def test_python_and_postgresql_agree_on_what_is_blank(conn):
    blank_in_sql = {
        chr(row[0])
        for row in conn.execute(
            "SELECT i FROM generate_series(1, 1114111) AS i "
            "WHERE i NOT BETWEEN 55296 AND 57343 AND text_is_blank(chr(i))"
        )
    }
    assert blank_in_sql == set(BLANK_CHARACTERS)
    assert {c for c in map(chr, range(1, 0x110000)) if is_blank(c)} == blank_in_sql
    # Unicode's White_Space: str.isspace() less U+001C-U+001F (separators, not space).
    assert blank_in_sql == {c for c in map(chr, range(0x110000)) if c.isspace()} - set(
        "\x1c\x1d\x1e\x1f"
    )


def test_the_write_path_guards_migration_goes_down_and_up(server_url):
    with (
        scratch_database(server_url, "cp_guards") as url,
        psycopg.connect(url, autocommit=True) as c,
    ):
        reason = (
            "SELECT conversation_reject_reason('acme', 'crew', E'\\t', 'u', 'web', 'active', "
            "1, 0, '{}')"
        )
        migrate.upgrade(c)
        assert c.execute(reason).fetchone() == ("session_id is missing or empty",)
        migrate.downgrade(c, 5)
        assert c.execute("SELECT to_regclass('enrichment_rejects')").fetchone()[0] is None
        assert c.execute(reason).fetchone() == (None,)  # the first rule: spaces only
        migrate.upgrade(c)
        assert c.execute(reason).fetchone() == ("session_id is missing or empty",)
