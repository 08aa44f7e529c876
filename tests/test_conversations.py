"""The builder: sessions to conversations, its queue, summaries, the conversations asset."""

import json
import random
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
from psycopg import sql

from conversation_assets.assets.conversations import conversations, conversations_match_sessions
from conversation_assets.assets.discovery import discovered_sessions
from conversation_assets.assets.enrichment import enriched_conversations
from conversation_assets.conversations import build_conversations
from conversation_assets.discovery import discover
from conversation_assets.enrichment import enrich
from jobs import INCREMENTAL_RUN_CONFIG
from resources.summarizer import SummarizerResource
from tests.fakes import fake_summary
from tests.sources import (
    DAY,
    add_crew,
    pipeline_resources,
    rejects,
    rows,
    run_pipeline,
    say,
    stats_flush,
    table_id,
)

WIDE = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


def nested(levels: int) -> str:
    """A valid message (jsonb holds it) nested deeper than Python's json can parse."""
    return '{"type": "human", "content": "deep", "x": ' + "[" * levels + "]" * levels + "}"


# --- sessions become conversations --------------------------------------------------


def test_a_session_becomes_a_readable_conversation(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
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
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
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
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
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


def test_incremental_equals_a_from_scratch_full_build(conn, postgres, other_db_url):
    from resources.postgres import PostgresResource

    add_crew(conn, "lc", "acme", "lc_histories", "langchain")
    add_crew(conn, "sd", "globex", "sd_histories", "n8n_created_at")
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
            shape = "langchain" if table.startswith("lc") else "n8n_created_at"
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


# --- the queue: one session or crew never stops the rest ----------------------------


def test_a_change_that_lands_during_a_build_is_built_by_the_next_run(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
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
    add_crew(conn, "good", "acme", "good_histories", "n8n_created_at")
    add_crew(conn, "bad", "acme", "bad_histories", "n8n")
    say(conn, "good_histories", "g1", "human", "hello", DAY)
    say(conn, "bad_histories", "b1", "human", "hello")
    discover(postgres.pool)
    conn.execute("DROP TABLE bad_histories")

    report = build_conversations(postgres.pool)

    assert "does not exist" in report.crew_errors["bad"]
    assert rows(conn, "session_id") == [("g1",)]
    assert conn.execute("SELECT crew_code FROM conversation_queue").fetchall() == [("bad",)]


def test_a_message_too_deep_for_python_rejects_its_session_and_the_queue_moves_on(conn, postgres):
    add_crew(conn, "a", "acme", "a_histories", "n8n_created_at")
    add_crew(conn, "b", "globex", "b_histories", "n8n_created_at")
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
    add_crew(conn, "a", "acme", "a_histories", "n8n_created_at")
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


# --- summaries ----------------------------------------------------------------------


def test_an_llm_summarizer_that_fails_leaves_the_extractive_summary(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
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


def test_a_summarizer_answering_the_wrong_count_or_type_keeps_extractive_summaries(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
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


# --- the conversations asset --------------------------------------------------------


def test_the_job_builds_conversations_after_discovery_and_the_check_agrees(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    say(conn, "histories", "s1", "human", "hello", DAY)
    say(conn, "histories", "s2", "human", "hello", DAY + timedelta(days=1))

    result = dg.materialize(
        [discovered_sessions, conversations, enriched_conversations],  # as in discovery_job
        partition_key=DAY.date().isoformat(),
        resources=pipeline_resources(postgres),
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
        [conversations],
        partition_key=DAY.date().isoformat(),
        resources=pipeline_resources(postgres),
    )
    assert full.success
    assert conversations_match_sessions(postgres=postgres).passed


def test_the_asset_stores_an_llm_summary_from_an_ollama_server(conn, postgres, model_server):
    chat = model_server  # conftest's local Ollama- and OpenAI-compatible server
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    say(conn, "histories", "s1", "human", "Where is my parcel?", DAY)
    say(conn, "histories", "s1", "ai", "It ships today.", DAY + timedelta(seconds=5))
    llm = SummarizerResource(backend="ollama", base_url=chat.url, model="tiny")

    result = dg.materialize(
        [discovered_sessions, conversations, enriched_conversations],  # as in discovery_job
        partition_key=DAY.date().isoformat(),
        resources={**pipeline_resources(postgres), "summarizer": llm},
        run_config=INCREMENTAL_RUN_CONFIG,
    )

    assert result.success
    transcript, summary, summarizer = conn.execute(
        "SELECT full_conversation, summary, metadata->>'summarizer' FROM conversations"
    ).fetchone()
    assert summary == fake_summary(transcript) and summarizer == "ollama:tiny"
    assert [r["path"] for r in chat.requests] == ["/api/chat"]
