"""The Dagster layer: definitions, partitions, runs, sensor, schedule, checks."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from conversation_assets.assets.discovery import (
    crews_discoverable,
    discovered_sessions,
    discovered_sessions_match_source,
)
from schedules import build_discovery_schedule
from sensors import build_new_histories_sensor
from tests.sources import add_crew, insert

ROOT = Path(__file__).resolve().parents[1]
DAY = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
# What the sensor and schedule send, for discovered_sessions alone.
INCREMENTAL_RUN_CONFIG = {"ops": {"discovered_sessions": {"config": {"mode": "incremental"}}}}


def test_definitions_load_with_the_expected_names():
    from conversation_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert sorted(key.to_user_string() for key in graph.get_all_asset_keys()) == [
        "conversation_embeddings",
        "conversation_metrics",
        "conversation_search_indexes",
        "conversations",
        "discovered_sessions",
        "enriched_conversations",
        "performance_stats",
    ]
    assert sorted(check.name for check in graph.asset_check_keys) == [
        "conversations_match_sessions",
        "crews_discoverable",
        "discovered_sessions_match_source",
        "embedding_backlog_small",
        "enriched_matches_conversations",
        "totals_match_recount",
    ]
    assert defs.resolve_job_def("discovery_job").partitions_def is not None
    assert defs.resolve_job_def("embedding_job").partitions_def is None
    assert defs.resolve_job_def("metrics_job").partitions_def is not None
    assert defs.resolve_job_def("performance_stats_job").partitions_def is not None
    assert defs.resolve_schedule_def("discovery_schedule").cron_schedule == "*/5 * * * *"
    assert defs.resolve_schedule_def("metrics_schedule").cron_schedule == "30 0 * * *"
    assert defs.resolve_schedule_def("performance_stats_schedule").cron_schedule == "5 * * * *"
    assert defs.resolve_schedule_def("search_index_schedule").cron_schedule == "15 2 * * *"
    assert defs.resolve_job_def("search_index_job").partitions_def is None
    assert {sensor.name for sensor in defs.sensors or []} == {
        "new_histories_sensor",
        "embedding_backlog_sensor",
        "metrics_sensor",
    }
    assert set(defs.resources or {}) == {"postgres", "embeddings", "summarizer"}


def _materialize(postgres, partition_key, config=None, assets=(discovered_sessions,)):
    return dg.materialize(
        list(assets),
        partition_key=partition_key,
        resources={"postgres": postgres},
        run_config=config or {},
    )


def test_incremental_run_announces_every_partition_it_changed(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    insert(conn, "histories", "seed000", [("a", "human", DAY), ("a", "ai", DAY)])
    later = DAY + timedelta(days=1)
    insert(conn, "histories", "seed000", [("b", "human", later)])

    result = _materialize(postgres, later.date().isoformat(), INCREMENTAL_RUN_CONFIG)

    assert result.success
    materialized = {
        event.event_specific_data.materialization.partition
        for event in result.get_asset_materialization_events()
    }
    assert materialized == {DAY.date().isoformat(), later.date().isoformat()}
    metadata = result.asset_materializations_for_node("discovered_sessions")[-1].metadata
    assert metadata["rows_scanned"].value == 3
    assert metadata["sessions_new"].value == 2
    assert metadata["crews_failed"].value == 0
    assert metadata["watermarks"].value == {"crew": [0, 3]}


def test_a_partition_run_recomputes_that_day_exactly(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    insert(conn, "histories", "seed000", [("a", "human", DAY), ("gone", "human", DAY)])
    assert _materialize(postgres, DAY.date().isoformat()).success
    conn.execute("DELETE FROM histories WHERE session_id = 'gone'")

    result = _materialize(postgres, DAY.date().isoformat())  # default mode: full

    metadata = result.asset_materializations_for_node("discovered_sessions")[-1].metadata
    assert metadata["sessions_deleted"].value == 1
    assert conn.execute(
        "SELECT session_id FROM discovered_sessions WHERE deleted_at IS NOT NULL"
    ).fetchall() == [("gone",)]


def test_run_fails_only_when_every_crew_fails(conn, postgres):
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES ('x', 'c', 'nope')"
    )
    with pytest.raises(dg.Failure, match="every crew"):
        _materialize(postgres, DAY.date().isoformat(), INCREMENTAL_RUN_CONFIG)
    add_crew(conn, "crew", "acme", "histories", "n8n")
    result = _materialize(postgres, DAY.date().isoformat(), INCREMENTAL_RUN_CONFIG)
    metadata = result.asset_materializations_for_node("discovered_sessions")[-1].metadata
    assert metadata["crews_failed"].value == 1
    assert "does not exist" in metadata["crew_errors"].value["x"]


def test_checks_pass_on_exact_data_and_fail_on_a_difference(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    insert(conn, "histories", "seed000", [(f"s{i % 7}", "human", DAY) for i in range(30)])
    assert _materialize(postgres, DAY.date().isoformat(), INCREMENTAL_RUN_CONFIG).success
    assert discovered_sessions_match_source(postgres=postgres).passed
    assert crews_discoverable(postgres=postgres).passed

    conn.execute("UPDATE discovered_sessions SET message_count = 99 WHERE session_id = 's3'")
    conn.execute("INSERT INTO crews VALUES ('broken', 'acme', 'no_such_table')")
    _materialize(postgres, DAY.date().isoformat(), INCREMENTAL_RUN_CONFIG)

    recount = discovered_sessions_match_source(postgres=postgres)
    assert not recount.passed
    assert recount.metadata["differences"].value == {"crew": ["s3"]}
    assert conn.execute(
        "SELECT message_count FROM discovered_sessions WHERE session_id = 's3'"
    ).fetchone() == (99,)  # the check only looks
    crews = crews_discoverable(postgres=postgres)
    assert not crews.passed and "no_such_table" in crews.metadata["crew_errors"].value["broken"]


def test_sensor_requests_exactly_the_affected_partitions(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "seed000")
    add_crew(conn, "quiet", "beta", "quiet_histories", "n8n")
    sensor = build_new_histories_sensor()
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        first = sensor(context)  # crews never discovered: one run sets their baseline
    today = datetime.now(UTC).date().isoformat()
    assert [r.partition_key for r in first.run_requests] == [today]
    _materialize(postgres, today, INCREMENTAL_RUN_CONFIG)
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        assert isinstance(sensor(context), dg.SkipReason)

    later = DAY + timedelta(days=3)
    insert(conn, "histories", "seed000", [("a", "human", DAY), ("b", "human", later)])
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        result = sensor(context)
    keys = sorted(r.partition_key for r in result.run_requests)
    assert keys == [DAY.date().isoformat(), later.date().isoformat()]
    assert len({r.run_key for r in result.run_requests}) == 2
    assert all(
        r.run_config["ops"]["discovered_sessions"]["config"]["mode"] == "incremental"
        for r in result.run_requests
    )
    assert json.loads(result.cursor) == {"crew": 2}

    # The same rows are not requested twice while their run is queued.
    with dg.build_sensor_context(cursor=result.cursor, resources={"postgres": postgres}) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)


def test_schedule_requests_an_incremental_run_for_the_tick_day(monkeypatch):
    monkeypatch.setenv("CONVERSATION_DISCOVERY_CRON", "*/2 * * * *")
    schedule = build_discovery_schedule()
    assert schedule.cron_schedule == "*/2 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    tick = datetime(2026, 11, 23, 23, 58, tzinfo=UTC)
    with dg.build_schedule_context(scheduled_execution_time=tick) as context:
        request = schedule(context)
    assert request.partition_key == "2026-11-23"
    assert request.run_config["ops"]["discovered_sessions"]["config"]["mode"] == "incremental"


def test_sensor_requests_a_run_when_rows_were_only_deleted(conn, postgres, monkeypatch):
    monkeypatch.setenv("DISCOVERY_RECONCILE_MINUTES", "0")
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("a", "human"), ("b", "human")])
    _materialize(postgres, DAY.date().isoformat(), INCREMENTAL_RUN_CONFIG)
    sensor = build_new_histories_sensor()
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        assert isinstance(sensor(context), dg.SkipReason)

    conn.execute("DELETE FROM histories WHERE session_id = 'a'")  # n8n clear()
    conn.execute("SELECT pg_stat_force_next_flush()")
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        result = sensor(context)
    today = datetime.now(UTC).date().isoformat()
    assert [r.partition_key for r in result.run_requests] == [today]


def test_a_backfill_offers_the_index_it_would_use_and_never_creates_it(conn, postgres):
    add_crew(conn, "n8n_crew", "acme", "n8n_histories", "n8n")
    add_crew(conn, "lc_crew", "acme", "lc_histories", "langchain")
    insert(conn, "n8n_histories", "n8n", [("a", "human")])
    insert(conn, "lc_histories", "langchain", [("0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0001", "ai", DAY)])

    result = _materialize(postgres, DAY.date().isoformat())  # full mode

    metadata = result.asset_materializations_for_node("discovered_sessions")[-1].metadata
    advice = metadata["index_advice"].value
    assert len(advice) == 1 and "n8n_histories" in advice[0]
    assert 'CREATE INDEX CONCURRENTLY ON "n8n_histories" (session_id);' in advice[0]
    indexes = conn.execute(
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'n8n_histories'"
    ).fetchone()
    assert indexes == (1,)  # the primary key only: the product's table is untouched
