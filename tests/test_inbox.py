"""Push ingestion against real PostgreSQL: enqueue, backpressure, drain, failures."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import uuid

import dagster as dg
import psycopg
import pytest
from pgvector.psycopg import register_vector

from conversation_assets import inbox, reads
from conversation_assets.enrichment import enrich
from conversation_assets.inbox import InboxFullError, InboxInputError, queue_conversation_storage
from conversation_assets.store import conversation_id
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource
from tests.sources import add_crew, run_pipeline, say

TRANSCRIPT = "User: where is my parcel? It was due on Monday.\nAI: It left the depot today."
LOCAL = EmbeddingResource()


def _client(conn: psycopg.Connection, code: str = "acme") -> None:
    conn.execute("INSERT INTO inbox_clients (client_code) VALUES (%s)", (code,))


def _push(conn: psycopg.Connection, n: int, client: str = "acme", **kwargs) -> list[uuid.UUID]:
    return [
        queue_conversation_storage(
            conn,
            f"u-{i}",
            "telegram",
            f"User: question {i} about refunds\nAI: answer {i}",
            f"summary {i}",
            {"n": i},
            client_code=client,
            **kwargs,
        )
        for i in range(n)
    ]


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    return conn.execute(sql, params).fetchone()[0]  # type: ignore[index]


def test_enqueue_then_drain_stores_embeds_and_is_searchable(conn, postgres):
    _client(conn)
    conversation = queue_conversation_storage(
        conn, "u-42", "telegram", TRANSCRIPT, None, {"plan": "gold"}, client_code="acme"
    )
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 1
    assert _count(conn, "SELECT count(*) FROM conversations") == 0

    report = inbox.drain(postgres.pool, LOCAL)

    assert (report.stored, report.rejected, report.embedded, report.pending_left) == (1, 0, 1, 0)
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 0
    row = conn.execute(
        """SELECT client_code, crew_code, user_id, channel, full_conversation, summary,
                  metadata, message_count, language, embedding IS NOT NULL,
                  embedding_hash = content_hash
           FROM conversations WHERE id = %s""",
        (conversation,),
    ).fetchone()
    assert row[:5] == ("acme", "inbox:acme", "u-42", "telegram", TRANSCRIPT)
    assert "parcel" in row[5]  # no summary given: the extractive one
    assert row[6]["plan"] == "gold" and row[6]["source"] == "inbox"
    assert (row[7], row[8], row[9], row[10]) == (2, "en", True, True)
    # Listed, searchable, enriched like any other conversation.
    register_vector(conn)
    page = reads.list_conversations(conn, "acme", user_id="u-42")
    assert [item.id for item in page.items] == [conversation]
    hits = reads.semantic_search_text(conn, LOCAL, "acme", "where is my parcel", k=3)
    assert [hit.conversation.id for hit in hits] == [conversation]
    enrich(postgres.pool, mode="incremental")
    assert _count(conn, "SELECT count(*) FROM enriched_conversations WHERE id = %s", conversation)
    # The embedding cache now holds the text: a second push of it is a cache hit.
    queue_conversation_storage(conn, "u-43", "web", TRANSCRIPT, client_code="acme")
    again = inbox.drain(postgres.pool, LOCAL)
    assert (again.stored, again.cache_hits, again.texts_sent) == (1, 1, 0)
    state = conn.execute("SELECT stored_total, rejected_total FROM inbox_state").fetchone()
    assert state == (2, 0)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"transcript": ""}, "transcript", "transcript is empty"),
        ({"transcript": "  \n\t"}, "transcript", "transcript is empty"),
        ({"transcript": "x" * 1_000_001}, "transcript", "longer than 1,000,000"),
        ({"transcript": "a\x00b"}, "transcript", "NUL byte"),
        ({"summary": "s\x00"}, "summary", "NUL byte"),
        ({"summary": "s" * 10_001}, "summary", "summary is longer"),
        ({"user_id": " "}, "user_id", "user_id is missing or empty"),
        ({"user_id": 42}, "user_id", "not text (int)"),
        ({"channel": "c" * 51}, "channel", "longer than 50"),
        ({"metadata": ["a"]}, "metadata", "not a JSON object (list)"),
        ({"metadata": {"x": float("nan")}}, "metadata", "not JSON"),
        ({"metadata": {"x": "a\x00"}}, "metadata", "NUL"),
        ({"metadata": {"x": "y" * 70_000}}, "metadata", "larger than 64 KB"),
        ({"metadata": _nested(65)}, "metadata", "nested deeper than 64 levels"),
        ({"metadata": {"x": 10**400}}, "metadata", "beyond double precision"),
        ({"client_code": "nobody"}, "client_code", "'nobody' is not a known client"),
        ({"client_code": "a b"}, "client_code", "client_code must be"),
        ({"idempotency_key": ""}, "idempotency_key", "idempotency_key is empty"),
        ({"idempotency_key": "k" * 256}, "idempotency_key", "longer than 255"),
        ({"transcript": "\ud800"}, "transcript", "lone surrogate"),
    ],
)
def test_bad_input_is_refused_naming_the_field(conn, change, field, message):
    _client(conn)
    args = {
        "user_id": "u",
        "channel": "web",
        "transcript": TRANSCRIPT,
        "summary": None,
        "metadata": {},
        "client_code": "acme",
        "idempotency_key": None,
    }
    args.update(change)
    with pytest.raises(InboxInputError, match=re.escape(message)) as refused:
        queue_conversation_storage(conn, **args)
    assert refused.value.field == field
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 0


def test_a_client_with_a_crew_is_known(conn):
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES ('bot', 'globex', 't')"
    )
    assert queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="globex")
    assert [r[0] for r in conn.execute("SELECT client_code FROM known_clients")] == ["globex"]


def test_a_repeated_idempotency_key_stores_once_and_tenants_never_collide(conn, postgres):
    _client(conn)
    _client(conn, "globex")
    first = queue_conversation_storage(
        conn, "u", "web", TRANSCRIPT, client_code="acme", idempotency_key="order-7"
    )
    again = queue_conversation_storage(
        conn, "u", "web", TRANSCRIPT, client_code="acme", idempotency_key="order-7"
    )
    other = queue_conversation_storage(
        conn, "v", "web", "User: hi", client_code="globex", idempotency_key="order-7"
    )
    assert first == again == conversation_id("inbox:acme", "order-7")
    assert other != first
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 2
    assert inbox.drain(postgres.pool, LOCAL).stored == 2
    # Stored already: the same key again returns the id and queues nothing.
    assert (
        queue_conversation_storage(
            conn, "u", "web", "User: changed", client_code="acme", idempotency_key="order-7"
        )
        == first
    )
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 0
    assert conn.execute(
        "SELECT client_code, full_conversation FROM conversations WHERE id = %s", (first,)
    ).fetchone() == ("acme", TRANSCRIPT)
    # No key: a new conversation each call.
    a = queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="acme")
    b = queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="acme")
    assert a != b


def test_backpressure_refuses_past_the_bound_and_counts_refusals(conn, postgres):
    _client(conn)
    inbox.set_max_pending(conn, 5)
    _push(conn, 5)
    with pytest.raises(InboxFullError, match=r"holds about 5 conversations, its bound is 5"):
        queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="acme")
    with pytest.raises(InboxFullError):
        queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="acme")
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 5  # nothing dropped
    assert _count(conn, "SELECT last_value FROM conversation_inbox_refused_seq") == 2
    # The drain makes room; the estimate follows its count.
    report = inbox.drain(postgres.pool, LOCAL, batch_size=2, max_batches=1)
    assert report.stored == 2 and report.pending_left == 3
    _push(conn, 2)
    with pytest.raises(InboxFullError):
        _push(conn, 1)
    assert inbox.drain(postgres.pool, LOCAL).stored == 5
    assert _count(conn, "SELECT pending_base FROM inbox_state") == 0


def test_the_bound_is_set_by_the_drain_from_its_setting(conn, postgres):
    inbox.drain(postgres.pool, LOCAL, max_pending=1234)
    assert _count(conn, "SELECT max_pending FROM inbox_state") == 1234


def _drain_pid(conn: psycopg.Connection, timeout: float = 20.0) -> int:
    """The backend of a drain waiting on the inbox_state row lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute(
            """SELECT pid FROM pg_stat_activity
               WHERE wait_event_type = 'Lock' AND query LIKE '%%that stored the batch%%'
                 AND pid <> pg_backend_pid()"""
        ).fetchone()
        if row:
            return row[0]
        time.sleep(0.02)
    seen = conn.execute(
        "SELECT pid, state, wait_event_type, wait_event, left(query, 300) FROM pg_stat_activity"
    ).fetchall()
    raise AssertionError(f"no drain is waiting on inbox_state: {seen}")


def test_a_drain_killed_mid_batch_leaves_its_batch_then_a_rerun_is_exact(conn, db_url, postgres):
    _client(conn)
    ids = _push(conn, 30)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            inbox.drain(postgres.pool, LOCAL, batch_size=10)
        except BaseException as error:  # noqa: BLE001 - the test looks at it
            failure.append(error)

    with psycopg.connect(db_url, autocommit=True) as blocker:
        with blocker.transaction():
            blocker.execute("SELECT 1 FROM inbox_state FOR UPDATE")
            worker = threading.Thread(target=run)
            worker.start()
            pid = _drain_pid(conn)  # its batch stored and embedded, not yet committed
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            worker.join(30)
    assert failure and isinstance(failure[0], psycopg.OperationalError)
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 30
    assert _count(conn, "SELECT count(*) FROM conversations") == 0

    report = inbox.drain(postgres.pool, LOCAL, batch_size=10)

    assert (report.stored, report.rejected, report.failed_attempts) == (30, 0, 0)
    stored = {
        r[0] for r in conn.execute("SELECT id FROM conversations WHERE embedding IS NOT NULL")
    }
    assert stored == set(ids)
    assert _count(conn, "SELECT stored_total FROM inbox_state") == 30


def test_two_drains_at_once_take_disjoint_items(conn, db_url):
    _client(conn)
    ids = _push(conn, 40)
    reports: list[inbox.DrainReport] = []
    resources = [PostgresResource(database_url=db_url) for _ in range(2)]

    def run(resource: PostgresResource) -> None:
        reports.append(inbox.drain(resource.pool, LOCAL, batch_size=10))

    try:
        with psycopg.connect(db_url, autocommit=True) as blocker:
            with blocker.transaction():
                # Both drains hold a batch at the same time before either commits.
                blocker.execute("SELECT 1 FROM inbox_state FOR UPDATE")
                workers = [threading.Thread(target=run, args=(r,)) for r in resources]
                for worker in workers:
                    worker.start()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    waiting = _count(
                        conn,
                        """SELECT count(*) FROM pg_stat_activity
                           WHERE wait_event_type = 'Lock'
                             AND query LIKE '%%that stored the batch%%'""",
                    )
                    if waiting == 2:
                        break
                    time.sleep(0.02)
                assert waiting == 2
            for worker in workers:
                worker.join(60)
    finally:
        for resource in resources:
            resource.close()
    assert len(reports) == 2 and all(r.stored for r in reports)
    assert sum(r.stored for r in reports) == 40  # an item taken twice would count twice
    assert {r[0] for r in conn.execute("SELECT id FROM conversations")} == set(ids)
    assert _count(conn, "SELECT stored_total FROM inbox_state") == 40


def test_one_drain_with_two_workers_stores_each_item_once(conn, postgres):
    _client(conn)
    ids = _push(conn, 25)
    report = inbox.drain(postgres.pool, LOCAL, batch_size=4, workers=2)
    assert (report.stored, report.batches, report.pending_left) == (25, 7, 0)
    assert {r[0] for r in conn.execute("SELECT id FROM conversations")} == set(ids)
    assert _count(conn, "SELECT stored_total FROM inbox_state") == 25


def test_a_poison_item_is_moved_aside_after_max_attempts(conn, postgres):
    _client(conn)
    good = _push(conn, 6)
    poison = queue_conversation_storage(conn, "poison", "web", TRANSCRIPT, client_code="acme")
    # A product trigger that refuses one row: the rest of each batch still lands.
    conn.execute(
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.user_id = 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF;
               RETURN NEW;
           END $$;
           CREATE TRIGGER refuse_poison BEFORE INSERT ON conversations
               FOR EACH ROW EXECUTE FUNCTION refuse_poison();"""
    )
    first = inbox.drain(postgres.pool, LOCAL, batch_size=4, max_attempts=3, workers=2)
    assert (first.stored, first.failed_attempts, first.rejected) == (6, 1, 0)
    assert conn.execute(
        "SELECT attempts, last_error FROM conversation_inbox WHERE id = %s", (poison,)
    ).fetchone() == (1, "RaiseException: poisoned row")
    assert inbox.drain(postgres.pool, LOCAL, max_attempts=3).failed_attempts == 1
    third = inbox.drain(postgres.pool, LOCAL, max_attempts=3)
    assert (third.rejected, third.failed_attempts) == (1, 0)
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 0
    row = conn.execute(
        "SELECT attempts, reason, full_conversation FROM conversation_inbox_rejects WHERE id = %s",
        (poison,),
    ).fetchone()
    assert row == (3, "failed 3 times; last error: RaiseException: poisoned row", TRANSCRIPT)
    assert {r[0] for r in conn.execute("SELECT id FROM conversations")} == set(good)
    assert conn.execute("SELECT stored_total, rejected_total FROM inbox_state").fetchone() == (6, 1)


def test_a_conversation_the_write_path_refuses_is_moved_aside_with_its_reason(conn, postgres):
    _client(conn)
    pushed = queue_conversation_storage(
        conn, "u", "web", TRANSCRIPT, client_code="acme", idempotency_key="k1"
    )
    # Another tenant's conversation already has that id: the write path keeps it.
    conn.execute(
        """INSERT INTO conversations (id, client_code, crew_code, session_id, user_id)
           VALUES (%s, 'evil', 'x', 'y', 'z')""",
        (pushed,),
    )
    report = inbox.drain(postgres.pool, LOCAL)
    assert (report.stored, report.rejected) == (0, 1)
    reason = conn.execute(
        "SELECT reason FROM conversation_inbox_rejects WHERE id = %s", (pushed,)
    ).fetchone()[0]
    assert "belongs to client 'evil'" in reason
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 0


PSQL = shutil.which("psql")


@pytest.mark.skipif(
    PSQL is None, reason="psql is not installed (apt-get install postgresql-client)"
)
@pytest.mark.parametrize("latency", ["-5000", "NaN", "Infinity"])
def test_a_latency_that_is_not_a_duration_is_refused(conn, latency):
    _client(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as refused:
        conn.execute(
            "SELECT queue_conversation_storage('u', 'web', 'User: hi', "
            "client_code => 'acme', client_latency_ms => %s::real)",
            (latency,),
        )
    assert refused.value.diag.column_name == "client_latency_ms"
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 0


def test_items_queued_with_metadata_no_reader_loads_fail_alone(conn, postgres):
    _client(conn)
    _client(conn, "globex")
    good = _push(conn, 3, client="globex")
    # Queued before the function refused such metadata: written to the table directly.
    for name, metadata in (
        ("bignum", '{"x": 1' + "0" * 5000 + "}"),
        ("deep", '{"a":' * 3000 + "1" + "}" * 3000),
    ):
        conn.execute(
            "INSERT INTO conversation_inbox (id, client_code, session_id, user_id, channel, "
            "full_conversation, metadata) VALUES (gen_random_uuid(), 'acme', %s, 'u', 'web', "
            "'User: hi', %s::jsonb)",
            (name, metadata),
        )
    good += _push(conn, 3, client="globex")

    first = inbox.drain(postgres.pool, LOCAL, max_attempts=2)
    second = inbox.drain(postgres.pool, LOCAL, max_attempts=2)

    assert (first.stored, first.failed_attempts) == (6, 2)
    assert (second.stored, second.rejected) == (0, 2)
    assert {r[0] for r in conn.execute("SELECT id FROM conversations")} == set(good)
    reasons = [r[0] for r in conn.execute("SELECT reason FROM conversation_inbox_rejects")]
    assert len(reasons) == 2
    assert all("ItemUnreadable: metadata cannot be read" in reason for reason in reasons)


def test_a_key_of_another_clients_conversation_is_queued_not_answered(conn, postgres):
    with pytest.raises(psycopg.errors.CheckViolation):
        add_crew(conn, "inbox:acme", "evil", "public.evil_histories", "n8n_created_at")
    # A crew that took the code before it was reserved.
    conn.execute("ALTER TABLE crews DROP CONSTRAINT crews_code_not_reserved")
    add_crew(conn, "inbox:acme", "evil", "public.evil_histories", "n8n_created_at")
    conn.execute(
        "ALTER TABLE crews ADD CONSTRAINT crews_code_not_reserved "
        "CHECK (crew_code !~ '^(inbox|messenger):') NOT VALID"
    )
    say(conn, "public.evil_histories", "order-7", "human", "evil's private chat")
    run_pipeline(postgres)
    (evil,) = conn.execute("SELECT id FROM conversations WHERE client_code = 'evil'").fetchone()
    _client(conn)

    pushed = queue_conversation_storage(
        conn, "u", "web", TRANSCRIPT, client_code="acme", idempotency_key="order-7"
    )

    assert pushed == evil  # the same natural key: the same id...
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 1  # ...but queued
    report = inbox.drain(postgres.pool, LOCAL)
    assert report.rejected == 1  # the write path never moves a conversation across clients
    assert conn.execute(
        "SELECT client_code, full_conversation FROM conversations WHERE id = %s", (evil,)
    ).fetchone() == ("evil", "User: evil's private chat")


@pytest.mark.parametrize("how", ["rolled back", "deleted"])
def test_ids_taken_by_calls_that_left_nothing_never_fill_the_inbox(conn, how):
    _client(conn)
    inbox.set_max_pending(conn, 5)
    for _ in range(5):
        if how == "rolled back":  # the app's own transaction failed after the call
            with pytest.raises(ZeroDivisionError), conn.transaction():
                queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="acme")
                1 / 0  # noqa: B018
        else:
            queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="acme")
    if how == "deleted":
        conn.execute("DELETE FROM conversation_inbox")  # an operator empties it by hand

    assert queue_conversation_storage(conn, "u", "web", TRANSCRIPT, client_code="acme")
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 1


def test_a_text_the_model_refuses_is_stored_without_a_vector(conn, postgres, model_server):
    model_server.max_text_chars = 4000  # a model's context limit, in characters here
    model_server.dimension = _count(
        conn,
        "SELECT atttypmod FROM pg_attribute WHERE attrelid = 'conversations'::regclass "
        "AND attname = 'embedding'",
    )
    remote = EmbeddingResource(backend="openai", base_url=model_server.url, max_retries=0)
    _client(conn)
    _client(conn, "globex")
    long = queue_conversation_storage(conn, "u", "web", "User: " + "漢" * 6000, client_code="acme")
    short = _push(conn, 3, client="globex")

    report = inbox.drain(postgres.pool, remote, max_attempts=1)

    assert (report.stored, report.rejected, report.refused) == (4, 0, 1)
    vectors = dict(conn.execute("SELECT id, embedding IS NOT NULL FROM conversations"))
    assert vectors == {long: False, **{i: True for i in short}}


def test_the_sql_function_is_callable_from_plain_psql(conn, db_url):
    _client(conn)
    script = """
        SELECT queue_conversation_storage(
            user_id => 'u-psql', channel => 'sms', transcript => 'User: hello from psql',
            metadata => '{"app": "php"}', client_code => 'acme', idempotency_key => 'p-1');
        SELECT queue_conversation_storage('u-psql', 'sms', 'User: positional', NULL, '{}', 'acme');
    """
    done = subprocess.run(
        [PSQL, db_url, "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(conversation_id("inbox:acme", "p-1"))
    refused = subprocess.run(
        [
            PSQL,
            db_url,
            "-X",
            "-At",
            "-c",
            "SELECT queue_conversation_storage('u', 'web', '', client_code => 'acme')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "transcript is empty" in refused.stderr
    assert _count(conn, "SELECT count(*) FROM conversation_inbox") == 2


def test_the_drain_asset_sensor_and_check(conn, postgres):
    from conversation_assets.assets.inbox import inbox_oldest_item_fresh, pushed_conversations
    from sensors import build_inbox_sensor

    sensor = build_inbox_sensor()
    instance = dg.DagsterInstance.ephemeral()
    resources = {"postgres": postgres}
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        assert isinstance(sensor(context), dg.SkipReason)  # empty inbox: no run
    _client(conn)
    _push(conn, 3)
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        request = sensor(context)
    assert isinstance(request, dg.RunRequest)
    result = dg.materialize(
        [pushed_conversations, inbox_oldest_item_fresh],
        resources={"postgres": postgres, "embeddings": LOCAL},
    )
    assert result.success
    metadata = result.asset_materializations_for_node("pushed_conversations")[-1].metadata
    assert metadata["stored"].value == 3 and metadata["pending_left"].value == 0
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]
    assert _count(conn, "SELECT count(*) FROM pipeline_runs WHERE asset = 'pushed_conversations'")
