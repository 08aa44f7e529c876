"""The write path into conversations: schema, upserts, rejects, encoding, bulk loads."""

import enum
import hashlib
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import pytest
from psycopg.types.json import Json

from conversation_assets import migrate
from conversation_assets.bulk import BulkUpsertError, upsert_conversations_in_batches
from conversation_assets.embedded import scratch_database
from conversation_assets.store import (
    BLANK_CHARACTERS,
    MetadataRefused,
    conversation_id,
    is_blank,
    metadata_json,
    upsert_conversations,
)
from tests.sources import DAY, record, rejects, rows

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


# --- upserts ------------------------------------------------------------------------


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


def test_an_aware_subclass_of_datetime_is_stored(conn):
    class Moment(datetime):
        pass

    at = Moment(2026, 11, 20, 9, tzinfo=UTC)
    report = upsert_conversations(conn, [record("a", created_at=at, source_updated_at=at)])
    assert report.inserted == 1 and not report.rejects


# --- rejects: a bad record is set aside with its reason, the rest lands -------------


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


# --- encoding metadata --------------------------------------------------------------


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


# --- process-wide state stays the application's -------------------------------------


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


# --- bulk loads ---------------------------------------------------------------------


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
