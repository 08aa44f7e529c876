"""Messenger through Dagster: partitioned assets, metadata, tokens, sensors, reads.

The local Graph API (`graph_sim`) over real HTTP, a real PostgreSQL, assets through
`dg.materialize(..., partition_key=...)`, sensors through `dg.build_sensor_context`.
"""

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest

from conversation_assets import graph_sim, reads
from conversation_assets.assets.messenger import (
    messenger_pages_partitions,
    messenger_sync,
    messenger_transcripts,
)
from conversation_assets.graph_sim import GraphSim
from conversation_assets.messenger import crew_code
from jobs import messenger_sync_job
from resources.messenger import MessengerResource, messenger_resource
from resources.postgres import PostgresResource
from sensors.messenger import build_messenger_pages_sensor, build_messenger_sync_sensor

START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
ACME, GLOBEX, INITECH = "200000000000001", "200000000000002", "200000000000003"
TOKENS = {ACME: "tok-acme-SECRET-1111", GLOBEX: "tok-globex-SECRET-2222", INITECH: "tok-x-3333"}


@pytest.fixture
def sim() -> Iterator[GraphSim]:
    state = GraphSim(start=START)
    for page_id, name in ((ACME, "Acme"), (GLOBEX, "Globex"), (INITECH, "Initech")):
        state.add_page(page_id, name, TOKENS[page_id])
        graph_sim.fill_page(state, page_id, 6, 4, START - timedelta(days=3))
    with graph_sim.serve(state) as url:
        state.base = url  # type: ignore[attr-defined]
        yield state


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def register(conn, instance=None) -> None:
    for page_id, client in ((ACME, "acme"), (GLOBEX, "globex"), (INITECH, "initech")):
        conn.execute(
            "INSERT INTO messenger_pages (page_id, client_code, label) VALUES (%s, %s, %s)",
            (page_id, client, client.title()),
        )
    if instance is not None:
        instance.add_dynamic_partitions("messenger_pages", [ACME, GLOBEX, INITECH])


def resources(postgres, sim, tokens=None):
    return {
        "postgres": postgres,
        "messenger": MessengerResource(
            graph_url=sim.base, page_tokens=json.dumps(tokens or TOKENS), backoff_seconds=0
        ),
    }


def materialize(postgres, sim, instance, partition, *, config=None, tokens=None, tags=None):
    return dg.materialize(
        [messenger_sync, messenger_transcripts],
        partition_key=partition,
        instance=instance,
        resources=resources(postgres, sim, tokens),
        run_config=config or {},
        tags=tags,
        raise_on_error=False,
    )


def _materialized(result: dg.ExecuteInProcessResult) -> set[tuple[str, str | None]]:
    """(asset, partition) of every materialization the run recorded."""
    return {
        (m.asset_key.to_user_string(), m.partition)
        for m in (
            e.event_specific_data.materialization
            for e in result.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"
        )
    }


def _ranges(tick) -> list[tuple[str, str]]:
    """The partition range of each run a sensor tick requested (none for a skip)."""
    requests = getattr(tick, "run_requests", None) or []
    return [
        (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
        for r in requests
    ]


def synced_with_sensor(conn, postgres, sim, instance) -> dg.SensorDefinition:
    """The three pages registered and fully synced; the sync sensor to tick."""
    register(conn, instance)
    for page_id in (ACME, GLOBEX, INITECH):
        assert materialize(postgres, sim, instance, page_id).success
    return build_messenger_sync_sensor(messenger_sync_job)


def _texts(result: dg.ExecuteInProcessResult, instance: dg.DagsterInstance) -> str:
    """Every log line, message and metadata value the run wrote to its event log."""
    parts = []
    for entry in instance.all_logs(result.run_id):
        parts.append(entry.user_message or "")
        parts.append(repr(entry.dagster_event) if entry.dagster_event else "")
    return "\n".join(parts)


def test_a_launched_partition_syncs_that_page_fully_into_conversations(
    conn, postgres, sim, instance
):
    register(conn, instance)

    result = materialize(postgres, sim, instance, ACME)

    assert result.success
    (materialization, *_) = result.asset_materializations_for_node("messenger_sync")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["mode"] == "full" and metadata["threads_new"] == 6
    assert metadata["messages_new"] == 24 and metadata["list_calls"] == 1
    assert metadata["watermark_before"] == "" and metadata["watermark_after"]
    pages = conn.execute("SELECT DISTINCT page_id FROM messenger_conversations").fetchall()
    assert pages == [(ACME,)]
    rows = conn.execute(
        "SELECT client_code, channel, count(*) FROM conversations GROUP BY 1, 2"
    ).fetchall()
    assert rows == [("acme", "messenger", 6)]
    # Recorded like every asset's run: the metrics server's last success covers them.
    runs = conn.execute("SELECT asset, partition_key, items FROM pipeline_runs ORDER BY 1")
    assert runs.fetchall() == [
        ("messenger_conversations", ACME, 6),
        ("messenger_transcripts", ACME, 6),
    ]
    assert {row[0] for row in conn.execute("SELECT asset FROM asset_last_success")} == {
        "messenger_conversations",
        "messenger_transcripts",
    }


def test_a_run_covering_pages_syncs_each_and_an_invalid_token_fails_only_its_page(
    conn, postgres, sim, instance, caplog
):
    register(conn, instance)
    tokens = {**TOKENS, GLOBEX: "expired-token-XYZ-9999"}
    caplog.set_level(logging.DEBUG)

    result = materialize(
        postgres,
        sim,
        instance,
        None,
        tokens=tokens,
        tags={
            "dagster/asset_partition_range_start": ACME,
            "dagster/asset_partition_range_end": INITECH,
        },
    )

    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert GLOBEX in failure.message or GLOBEX in repr(failure.event_specific_data)
    synced = dict(
        conn.execute("SELECT page_id, count(*) FROM messenger_conversations GROUP BY 1").fetchall()
    )
    assert synced == {ACME: 6, INITECH: 6}
    recorded = _materialized(result)
    assert ("messenger_conversations", ACME) in recorded
    assert ("messenger_conversations", GLOBEX) not in recorded
    text = _texts(result, instance) + caplog.text
    for token in (*TOKENS.values(), "expired-token-XYZ-9999"):
        assert token not in text


def test_a_run_covering_pages_syncs_them_side_by_side(conn, postgres, sim, instance):
    register(conn, instance)
    sim.latency = 1.0  # each call answers a second after it came in
    span = {
        "dagster/asset_partition_range_start": ACME,
        "dagster/asset_partition_range_end": INITECH,
    }

    result = materialize(postgres, sim, instance, None, tags=span)

    assert result.success
    first_call = {}
    for request in sim.requests:
        first_call.setdefault(request["path"].split("/")[-2], request["at"])
    assert set(first_call) == {ACME, GLOBEX, INITECH}
    # Every page asked before any answer came back: the pages did not wait for each other.
    assert max(first_call.values()) - min(first_call.values()) < sim.latency
    synced = dict(
        conn.execute("SELECT page_id, count(*) FROM messenger_conversations GROUP BY 1").fetchall()
    )
    assert synced == {ACME: 6, GLOBEX: 6, INITECH: 6}
    (materialization, *_) = result.asset_materializations_for_node("messenger_sync")
    assert list(materialization.metadata["pages"].value) == [ACME, GLOBEX, INITECH]


def test_tokens_never_reach_logs_or_metadata_even_in_urls(conn, postgres, sim, instance, caplog):
    register(conn, instance)
    caplog.set_level(logging.DEBUG)
    # The platform echoes a URL with the token in an error (as `next` links carry it).
    leak = f"{sim.base}/{ACME}/conversations?access_token={TOKENS[ACME]}&after=x"
    sim.fail_next(
        graph_sim.Scripted(500, {"error": {"code": 1, "message": f"retry {leak}"}}),
    )

    result = materialize(postgres, sim, instance, ACME)

    assert result.success
    text = _texts(result, instance) + caplog.text
    assert "access_token=***" in text
    for token in TOKENS.values():
        assert token not in text


def test_incremental_runs_equal_a_full_run_and_cost_what_changed(
    conn, postgres, sim, instance, other_db_url
):
    register(conn, instance)
    assert materialize(postgres, sim, instance, ACME).success
    incremental = {
        "ops": {
            "messenger_sync": {"config": {"mode": "incremental"}},
            "messenger_transcripts": {"config": {"mode": "incremental"}},
        }
    }
    for round_number in range(3):
        sim.advance(600)
        threads = sorted(sim.pages[ACME].threads.values(), key=lambda t: t.id)
        sim.add_message(threads[round_number], f"news {round_number} ✨")
        sim.add_thread(ACME, f"Newcomer {round_number}")
        result = materialize(postgres, sim, instance, ACME, config=incremental)
        assert result.success
        (mat, *_) = result.asset_materializations_for_node("messenger_sync")
        assert mat.metadata["mode"].value == "incremental"
        assert mat.metadata["list_calls"].value == 1 and mat.metadata["message_calls"].value == 0

    from resources.postgres import PostgresResource

    fresh = PostgresResource(database_url=other_db_url)
    try:
        import psycopg

        with psycopg.connect(other_db_url, autocommit=True) as other:
            register(other)
            assert materialize(fresh, sim, instance, ACME).success
            query = """SELECT crew_code, session_id, client_code, user_id, channel,
                              full_conversation, message_count, created_at, last_message_at
                       FROM conversations ORDER BY 1, 2"""
            assert conn.execute(query).fetchall() == other.execute(query).fetchall()
            events = "SELECT message_id, text FROM contact_interaction_events ORDER BY 1"
            assert conn.execute(events).fetchall() == other.execute(events).fetchall()
    finally:
        fresh.close()


def test_messenger_threads_are_listed_searched_and_filtered_by_tags(conn, postgres, sim, instance):
    register(conn, instance)
    assert materialize(postgres, sim, instance, ACME).success
    page = reads.list_conversations(conn, "acme", channel="messenger", page_size=100)
    assert page.total == 6
    first, second = page.items[0], page.items[1]
    reads.add_tags(conn, "acme", first.id, ["vip"])
    reads.add_tags(conn, "acme", second.id, ["spam"])

    vip = reads.list_conversations(conn, "acme", include_tags=["vip"])
    clean = reads.list_conversations(conn, "acme", channel="messenger", exclude_tags=["spam"])

    assert [c.id for c in vip.items] == [first.id]
    assert clean.total == 5 and second.id not in {c.id for c in clean.items}
    assert reads.list_conversations(conn, "globex").total == 0  # tenants never mix
    assert all(c.crew_code == crew_code(ACME) for c in page.items)


def test_pages_sensor_keeps_partitions_in_step_with_the_table(conn, postgres, instance):
    sensor = build_messenger_pages_sensor()
    register(conn)

    def tick():
        with dg.build_sensor_context(
            instance=instance, resources={"postgres": postgres}
        ) as context:
            return sensor(context)

    result = tick()
    (request,) = result.dynamic_partitions_requests
    assert request.partition_keys == [ACME, GLOBEX, INITECH]
    instance.add_dynamic_partitions("messenger_pages", request.partition_keys)

    conn.execute("DELETE FROM messenger_pages WHERE page_id = %s", (GLOBEX,))
    result = tick()
    (request,) = result.dynamic_partitions_requests
    assert isinstance(request, dg.DeleteDynamicPartitionsRequest)
    assert request.partition_keys == [GLOBEX]
    instance.delete_dynamic_partition("messenger_pages", GLOBEX)
    again = tick()
    assert isinstance(again, dg.SkipReason)


@pytest.mark.parametrize("page_id", [".", "..", "a b", "../me", "x" * 65])
def test_a_page_id_that_is_no_safe_path_segment_is_refused(conn, page_id):
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO messenger_pages (page_id, client_code) VALUES (%s, 'acme')", (page_id,)
        )
    conn.execute("INSERT INTO messenger_pages (page_id, client_code) VALUES ('1...2', 'acme')")


def test_sync_sensor_requests_runs_for_exactly_the_pages_that_changed(
    conn, postgres, sim, instance
):
    sensor = synced_with_sensor(conn, postgres, sim, instance)

    def tick():
        with dg.build_sensor_context(
            instance=instance, resources=resources(postgres, sim)
        ) as context:
            return sensor(context)

    calls_before = len(sim.requests)
    assert isinstance(tick(), dg.SkipReason)  # nothing changed: no run
    assert len(sim.requests) - calls_before == 3  # one light probe per page
    sim.advance(60)
    sim.add_message(next(iter(sim.pages[ACME].threads.values())), "hello again")
    sim.add_thread(INITECH, "Someone new")

    result = tick()

    # GLOBEX, between the two, did not change: one run per block of due pages, so no
    # run covers a page it does not sync.
    assert _ranges(result) == [(ACME, ACME), (INITECH, INITECH)]
    for request in result.run_requests:
        config = request.run_config["ops"]["messenger_sync"]["config"]
        assert config["mode"] == "incremental"
        run = dg.materialize(
            [messenger_sync, messenger_transcripts],
            instance=instance,
            resources=resources(postgres, sim),
            run_config=request.run_config,
            tags=request.tags,
        )
        assert run.success
    assert isinstance(tick(), dg.SkipReason)


def test_one_pages_bad_answer_or_bad_rows_never_stop_the_sensor_for_the_others(
    conn, postgres, sim, instance
):
    sensor = synced_with_sensor(conn, postgres, sim, instance)
    sim.advance(60)
    sim.add_message(next(iter(sim.pages[GLOBEX].threads.values())), "hello from globex")
    # acme's probe answers with `data` of the wrong type; initech holds a row no reader
    # can load back (written before times were checked).
    sim.fail_next(graph_sim.Scripted(200, {"data": 5}, match=f"/{ACME}/conversations"))
    conn.execute(
        "UPDATE messenger_conversations SET updated_time = '10000-01-01 00:00Z' "
        "WHERE page_id = %s AND sender_id = (SELECT min(sender_id) FROM messenger_conversations "
        "WHERE page_id = %s)",
        (INITECH, INITECH),
    )

    with dg.build_sensor_context(instance=instance, resources=resources(postgres, sim)) as context:
        result = sensor(context)

    assert _ranges(result) == [(GLOBEX, GLOBEX)]


def test_an_unusable_token_entry_fails_its_own_page_and_never_shows(
    conn, postgres, sim, instance, tmp_path, caplog
):
    register(conn, instance)
    path = tmp_path / "pages.json"
    broken = "EAABleak1234\nSECRETPART5678"  # a newline inside: no header can carry it
    path.write_text(json.dumps({ACME: TOKENS[ACME], GLOBEX: broken, INITECH: None}))
    caplog.set_level(logging.DEBUG)
    messenger = MessengerResource(graph_url=sim.base, page_tokens_file=str(path))
    span = {
        "dagster/asset_partition_range_start": ACME,
        "dagster/asset_partition_range_end": INITECH,
    }

    result = dg.materialize(
        [messenger_sync],
        instance=instance,
        resources={"postgres": postgres, "messenger": messenger},
        tags=span,
        raise_on_error=False,
    )

    assert not result.success
    synced = dict(
        conn.execute("SELECT page_id, count(*) FROM messenger_conversations GROUP BY 1").fetchall()
    )
    assert synced == {ACME: 6}
    text = _texts(result, instance) + caplog.text
    assert f"page {GLOBEX}: its token in MESSENGER_PAGE_TOKENS_FILE" in text
    assert f"page {INITECH}: its token in MESSENGER_PAGE_TOKENS_FILE" in text
    assert "EAABleak1234" not in text and "SECRETPART5678" not in text


def test_more_pages_at_once_than_the_pool_serves_are_synced_in_turn(conn, instance, db_url):
    sim = GraphSim(start=START)
    pages = [f"30000000000{n:04d}" for n in range(6)]
    tokens = {page_id: f"tok-{page_id}" for page_id in pages}
    for page_id in pages:
        sim.add_page(page_id, page_id, tokens[page_id])
        graph_sim.fill_page(sim, page_id, 3, 2, START - timedelta(days=1))
        conn.execute(
            "INSERT INTO messenger_pages (page_id, client_code) VALUES (%s, 'acme')", (page_id,)
        )
    instance.add_dynamic_partitions("messenger_pages", pages)
    small = PostgresResource(database_url=db_url, pool_max_size=4)  # one page at a time
    config = {"ops": {"messenger_sync": {"config": {"mode": "full", "page_concurrency": 6}}}}
    span = {
        "dagster/asset_partition_range_start": pages[0],
        "dagster/asset_partition_range_end": pages[-1],
    }
    try:
        with graph_sim.serve(sim) as url:
            sim.latency = 0.05
            result = dg.materialize(
                [messenger_sync],
                instance=instance,
                resources={
                    "postgres": small,
                    "messenger": MessengerResource(graph_url=url, page_tokens=json.dumps(tokens)),
                },
                run_config=config,
                tags=span,
                raise_on_error=False,
            )
    finally:
        small.close()

    assert result.success
    warning = "6 pages at once would need 18 database connections; the pool has 4"
    assert warning in _texts(result, instance)
    assert conn.execute("SELECT count(*) FROM messenger_conversations").fetchone() == (18,)


@pytest.mark.parametrize(
    ("left_out", "why"),
    [("disabled", "disabled in messenger_pages"), ("config", "not among the run's `pages`")],
)
def test_a_range_run_marks_materialized_only_the_pages_it_synced(
    conn, postgres, sim, instance, left_out, why
):
    register(conn, instance)
    config = None
    if left_out == "disabled":
        conn.execute("UPDATE messenger_pages SET enabled = false WHERE page_id = %s", (GLOBEX,))
    else:
        config = {"ops": {"messenger_sync": {"config": {"pages": [ACME, INITECH]}}}}
    span = {
        "dagster/asset_partition_range_start": ACME,
        "dagster/asset_partition_range_end": INITECH,
    }

    result = materialize(postgres, sim, instance, None, config=config, tags=span)

    assert not result.success  # GLOBEX is a partition of the run it did not sync
    assert f"page {GLOBEX}: {why}" in _texts(result, instance)
    recorded = _materialized(result)
    assert recorded == {
        (key, page)
        for key in ("messenger_conversations", "contact_interaction_events")
        for page in (ACME, INITECH)
    }


def test_a_throttled_page_is_left_alone_until_it_may_call_again(conn, postgres, sim, instance):
    register(conn, instance)
    assert materialize(postgres, sim, instance, ACME).success
    sim.advance(60)
    sim.add_message(next(iter(sim.pages[ACME].threads.values())), "hi")
    sim.throttle_next("business", regain_minutes=45)
    config = {"ops": {"messenger_sync": {"config": {"mode": "incremental"}}}}

    result = materialize(postgres, sim, instance, ACME, config=config)

    assert not result.success
    (until,) = conn.execute(
        "SELECT throttled_until FROM messenger_sync_state WHERE page_id = %s", (ACME,)
    ).fetchone()
    assert until is not None
    sensor = build_messenger_sync_sensor(messenger_sync_job)
    with dg.build_sensor_context(instance=instance, resources=resources(postgres, sim)) as context:
        tick = sensor(context)
    assert all(ACME not in (start, end) for start, end in _ranges(tick))


def test_the_resource_reads_tokens_from_a_mounted_file(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({ACME: "from-file"}))
    resource = MessengerResource(
        page_tokens=json.dumps({ACME: "env", GLOBEX: "g"}), page_tokens_file=str(path)
    )
    assert resource.tokens() == {ACME: "from-file", GLOBEX: "g"}
    broken = MessengerResource(page_tokens="{not json SECRET}")
    with pytest.raises(ValueError) as error:
        broken.tokens()
    assert "SECRET" not in str(error.value)


def test_definitions_hide_the_token_variables(monkeypatch):
    from conversation_assets import settings

    monkeypatch.setenv("MESSENGER_PAGE_TOKENS", json.dumps({ACME: "hidden-123"}))
    resource = messenger_resource(settings.load(), for_dagster=True)
    assert isinstance(resource.page_tokens, dg.EnvVar) or "hidden-123" not in repr(resource)
    assert messenger_pages_partitions.name == "messenger_pages"


def test_the_demo_pages_flow_with_nothing_to_configure(conn, postgres, instance):
    demo = graph_sim.demo_sim()
    assert graph_sim.register_demo_pages(conn) == 3
    assert graph_sim.register_demo_pages(conn) == 0  # idempotent
    page_id = graph_sim.DEMO_PAGES[0][0]
    instance.add_dynamic_partitions("messenger_pages", [page_id])
    with graph_sim.serve(demo) as url:
        result = dg.materialize(
            [messenger_sync, messenger_transcripts],
            partition_key=page_id,
            instance=instance,
            resources={
                "postgres": postgres,
                "messenger": MessengerResource(
                    graph_url=url, page_tokens=graph_sim.demo_tokens_json()
                ),
            },
        )
    assert result.success
    (count,) = conn.execute(
        "SELECT count(*) FROM conversations WHERE channel = 'messenger' AND client_code = 'acme'"
    ).fetchone()
    assert count == graph_sim.DEMO_PAGES[0][3]
