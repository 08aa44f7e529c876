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


def _materialize(postgres, partition_key, config=None, assets=(discovered_sessions,)):
    return dg.materialize(
        list(assets),
        partition_key=partition_key,
        resources={"postgres": postgres},
        run_config=config or {},
    )


def test_incremental_run_announces_every_partition_it_changed(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    insert(conn, "histories", "n8n_created_at", [("a", "human", DAY), ("a", "ai", DAY)])
    later = DAY + timedelta(days=1)
    insert(conn, "histories", "n8n_created_at", [("b", "human", later)])

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
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    insert(conn, "histories", "n8n_created_at", [("a", "human", DAY), ("gone", "human", DAY)])
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
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    insert(conn, "histories", "n8n_created_at", [(f"s{i % 7}", "human", DAY) for i in range(30)])
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


# The shape with a varchar session id and an indexed created_at.
TIMED = "n8n_created_at"


def _sensor_context(postgres, cursor=None):
    return dg.build_sensor_context(
        cursor=cursor, resources={"postgres": postgres}, instance=dg.DagsterInstance.ephemeral()
    )


def test_sensor_requests_one_run_over_the_affected_partitions(conn, postgres):
    # Changed by design (issue 15): one run per tick over the span of the affected
    # days (a partition-range run), no longer one run per day.
    add_crew(conn, "crew", "acme", "histories", TIMED)
    add_crew(conn, "quiet", "beta", "quiet_histories", "n8n")
    sensor = build_new_histories_sensor()
    with _sensor_context(postgres) as context:
        first = sensor(context)  # crews never discovered: one run sets their baseline
    today = datetime.now(UTC).date().isoformat()
    assert [r.partition_key for r in first.run_requests] == [today]
    _materialize(postgres, today, INCREMENTAL_RUN_CONFIG)
    with _sensor_context(postgres) as context:
        assert not sensor(context).run_requests

    later = DAY + timedelta(days=3)
    insert(conn, "histories", TIMED, [("a", "human", DAY), ("b", "human", later)])
    with _sensor_context(postgres) as context:
        result = sensor(context)
    [request] = result.run_requests
    assert request.partition_key is None
    assert request.tags["dagster/asset_partition_range_start"] == DAY.date().isoformat()
    assert request.tags["dagster/asset_partition_range_end"] == later.date().isoformat()
    assert request.run_config["ops"]["discovered_sessions"]["config"]["mode"] == "incremental"
    assert json.loads(result.cursor)["seen"] == {"crew": 2}

    # The same rows are not requested twice while their run is queued.
    with _sensor_context(postgres, cursor=result.cursor) as ctx:
        assert not sensor(ctx).run_requests


def test_schedule_requests_an_incremental_run_for_the_tick_day(conn, postgres, monkeypatch):
    monkeypatch.setenv("CONVERSATION_DISCOVERY_CRON", "*/2 * * * *")
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("a", "human")])
    schedule = build_discovery_schedule()
    assert schedule.cron_schedule == "*/2 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    tick = datetime(2026, 11, 23, 23, 58, tzinfo=UTC)
    with dg.build_schedule_context(
        scheduled_execution_time=tick, resources={"postgres": postgres}
    ) as context:
        request = schedule(context)
    assert request.partition_key == "2026-11-23"
    assert request.run_config["ops"]["discovered_sessions"]["config"]["mode"] == "incremental"


def test_sensor_requests_a_run_when_rows_were_only_deleted(conn, postgres, monkeypatch):
    monkeypatch.setenv("DISCOVERY_RECONCILE_MINUTES", "0")
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("a", "human"), ("b", "human")])
    _materialize(postgres, DAY.date().isoformat(), INCREMENTAL_RUN_CONFIG)
    sensor = build_new_histories_sensor()
    with _sensor_context(postgres) as context:
        assert not sensor(context).run_requests

    conn.execute("DELETE FROM histories WHERE session_id = 'a'")  # n8n clear()
    conn.execute("SELECT pg_stat_force_next_flush()")
    with _sensor_context(postgres) as context:
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
