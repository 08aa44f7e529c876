"""How the pipeline is run: one run per tick, small runs in one process, nothing when
idle, downstream following upstream, failures where users look, per-partition figures."""

import json
import logging
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from conversation_assets.assets.conversations import conversations
from conversation_assets.assets.discovery import crews_discoverable, discovered_sessions
from conversation_assets.assets.enrichment import enriched_conversations, performance_stats
from conversation_assets.definitions import defs
from conversation_assets.embedding import column_dimension
from jobs import LANE_TAG, discovery_job
from schedules import build_discovery_schedule
from sensors import build_enrichment_queue_sensor, build_new_histories_sensor
from tests.sources import add_crew, insert, stats_flush

# The shape with a varchar session id and an indexed created_at.
TIMED = "n8n_created_at"
DAY = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


class Summarizer(dg.ConfigurableResource):
    """The extractive summarizer, as the conversations asset asks for it."""

    backend: str = "extractive"
    name: str = "extractive"

    def summarize(self, transcripts):  # pragma: no cover - never called (extractive)
        raise AssertionError


def _run(postgres, *, key=None, span=None, config=None, assets=(discovered_sessions,)):
    tags = {RANGE_START: span[0], RANGE_END: span[1]} if span else None
    return dg.materialize(
        list(assets),
        partition_key=key,
        tags=tags,
        resources={"postgres": postgres, "summarizer": Summarizer()},
        run_config=config or {},
        raise_on_error=False,
    )


def _incremental(*assets) -> dict:
    return {"ops": {a.key.path[-1]: {"config": {"mode": "incremental"}} for a in assets}}


class Lines(logging.Handler):
    """What a sensor logged, as text."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _tick(sensor, postgres, instance, cursor=None, log=None):
    with dg.build_sensor_context(
        resources={"postgres": postgres}, instance=instance, cursor=cursor
    ) as context:
        if log is not None:
            context.log.addHandler(log)
        return sensor(context)


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


# --- One run per tick --------------------------------------------------------------


def test_one_run_request_per_tick_whatever_the_number_of_days(conn, postgres, instance):
    add_crew(conn, "crew", "acme", "histories", TIMED)
    sensor = build_new_histories_sensor()
    first = _tick(sensor, postgres, instance)  # never discovered: one run sets the baseline
    assert len(first.run_requests) == 1
    _run(
        postgres, key=datetime.now(UTC).date().isoformat(), config=_incremental(discovered_sessions)
    )

    days = [DAY + timedelta(days=n) for n in (0, 3, 5, 11)]
    insert(conn, "histories", TIMED, [(f"s{n}", "human", day) for n, day in enumerate(days)])
    result = _tick(sensor, postgres, instance)

    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == ("2026-11-02", "2026-11-13")
    assert request.tags["pipeline/partitions_affected"] == "4"
    # Small runs are small: the whole run in one process.
    assert request.run_config["execution"] == {"config": {"in_process": {}}}
    assert request.run_config["ops"]["discovered_sessions"]["config"]["mode"] == "incremental"
    assert json.loads(result.cursor)["seen"] == {"crew": 4}

    # The same rows are not requested twice while their run is queued.
    assert not _tick(sensor, postgres, instance, cursor=result.cursor).run_requests


def test_the_first_start_makes_one_discovery_run(conn, postgres, instance):
    add_crew(conn, "crew", "acme", "histories", TIMED)
    add_crew(conn, "other", "acme", "other_histories", "n8n")
    insert(
        conn, "histories", TIMED, [(f"s{n}", "human", DAY + timedelta(days=n)) for n in range(15)]
    )
    sensor = build_new_histories_sensor()
    first = _tick(sensor, postgres, instance)
    [request] = first.run_requests  # 15 days, two crews never discovered: one run
    assert (request.tags[RANGE_START], request.tags[RANGE_END]) == ("2026-11-02", "2026-11-16")
    # While that run is under way (started: no longer waiting in the queue), the
    # crews still look undiscovered; the state was requested once, so no second run.
    second = _tick(sensor, postgres, instance, cursor=first.cursor)
    assert not second.run_requests
    insert(conn, "histories", TIMED, [("late", "human", DAY)])
    assert len(_tick(sensor, postgres, instance, cursor=second.cursor).run_requests) == 1


def test_a_burst_while_a_run_waits_to_start_makes_no_second_run(
    conn, postgres, instance, db_url, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL", db_url)  # the loaded definitions' resources read it
    add_crew(conn, "crew", "acme", "histories", TIMED)
    _run(postgres, key=DAY.date().isoformat(), config=_incremental(discovered_sessions))
    # A run the sensor requested that has not started yet (created, not launched).
    instance.create_run_for_job(
        job_def=defs.resolve_job_def(discovery_job.name), tags={"discovery/trigger": "sensor"}
    )
    insert(conn, "histories", TIMED, [("a", "human", DAY)])
    result = _tick(build_new_histories_sensor(), postgres, instance)
    assert not result.run_requests
    assert "has not started yet" in result.skip_reason.skip_message


def test_an_unreadable_crew_is_reported_once_per_change_of_state(conn, postgres, instance):
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES ('x', 'c', 'bad-name')"
    )
    sensor = build_new_histories_sensor()
    log = Lines()
    first = _tick(sensor, postgres, instance, log=log)
    assert [line for line in log.lines if "cannot probe crew x" in line]
    log.lines.clear()
    second = _tick(sensor, postgres, instance, cursor=first.cursor, log=log)
    assert log.lines == []  # the same state: said once
    conn.execute("DELETE FROM crews WHERE crew_code = 'x'")
    _tick(sensor, postgres, instance, cursor=second.cursor, log=log)
    assert [line for line in log.lines if "can be probed again" in line]


# --- Idle costs nothing ------------------------------------------------------------


def test_the_schedule_skips_when_nothing_changed_and_runs_when_a_recompute_is_due(
    conn, postgres, monkeypatch
):
    monkeypatch.setenv("DISCOVERY_RECONCILE_MINUTES", "15")
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("a", "human"), ("b", "human")])
    schedule = build_discovery_schedule()
    tick = datetime(2026, 11, 23, 23, 55, tzinfo=UTC)

    def evaluate():
        with dg.build_schedule_context(
            scheduled_execution_time=tick, resources={"postgres": postgres}
        ) as context:
            return schedule(context)

    first = evaluate()  # new rows: a run
    assert isinstance(first, dg.RunRequest)
    assert first.run_config["execution"] == {"config": {"in_process": {}}}
    assert first.partition_key == "2026-11-23"
    _run(
        postgres,
        key=DAY.date().isoformat(),
        config=_incremental(discovered_sessions, conversations),
        assets=(discovered_sessions, conversations),
    )
    assert isinstance(evaluate(), dg.SkipReason)  # nothing changed: no run

    conn.execute("DELETE FROM histories WHERE session_id = 'a'")  # n8n clear()
    stats_flush(conn)
    assert isinstance(evaluate(), dg.SkipReason)  # the recompute is not due yet
    conn.execute("UPDATE crew_discovery_state SET reconciled_at = now() - interval '16 minutes'")
    due = evaluate()
    assert isinstance(due, dg.RunRequest)
    assert "1 crews with work" in due.tags["discovery/reason"]


# --- Downstream follows upstream ---------------------------------------------------


def test_an_embedding_write_reaches_enriched_conversations_without_a_discovery_run(
    conn, postgres, instance
):
    add_crew(conn, "crew", "acme", "histories", TIMED)
    insert(conn, "histories", TIMED, [("a", "human", DAY), ("a", "ai", DAY)])
    every = (discovered_sessions, conversations, enriched_conversations)
    assert _run(
        postgres, key=DAY.date().isoformat(), config=_incremental(*every), assets=every
    ).success
    sensor = build_enrichment_queue_sensor()
    assert isinstance(_tick(sensor, postgres, instance), dg.SkipReason)  # nothing waits
    assert conn.execute("SELECT has_embedding FROM enriched_conversations").fetchone() == (False,)

    # What conversation_embeddings writes (a vector and the hash it was made from).
    dimension = column_dimension(conn)
    conn.execute(
        "UPDATE conversations SET embedding = array_fill(0.5, ARRAY[%s])::real[]::vector, "
        "embedding_hash = content_hash",
        (dimension,),
    )
    request = _tick(sensor, postgres, instance)
    assert isinstance(request, dg.RunRequest)
    assert request.partition_key == datetime.now(UTC).date().isoformat()
    from conversation_assets.definitions import defs

    job = defs.resolve_job_def(sensor.job_name)
    assert job.executor_def.name == "in_process"
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} == {
        "enriched_conversations"
    }
    # The run enrichment_job makes (its config: incremental).
    assert _run(
        postgres,
        key=request.partition_key,
        config=_incremental(enriched_conversations),
        assets=(enriched_conversations,),
    ).success
    assert conn.execute("SELECT has_embedding FROM enriched_conversations").fetchone() == (True,)
    assert conn.execute("SELECT count(*) FROM metrics_dirty_periods").fetchone()[0] > 0
    assert isinstance(_tick(sensor, postgres, instance), dg.SkipReason)


# --- Failures are visible ----------------------------------------------------------


def test_all_crews_failed_fails_the_run_and_one_broken_crew_beside_others_does_not(conn, postgres):
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES ('x', 'c', 'nope')"
    )
    result = _run(postgres, key=DAY.date().isoformat(), config=_incremental(discovered_sessions))
    assert not result.success  # every crew failed
    failure = result.failure_data_for_node("discovered_sessions")
    assert "'x'" in failure.error.message and "does not exist" in failure.error.message
    # Beside a healthy crew the run stays green, so its checks run and report the crew.
    add_crew(conn, "crew", "acme", "histories", "n8n")
    assert _run(
        postgres, key=DAY.date().isoformat(), config=_incremental(discovered_sessions)
    ).success


def test_a_crew_failing_its_last_runs_fails_the_error_check_and_one_success_clears_it(
    conn, postgres, monkeypatch
):
    monkeypatch.setenv("DISCOVERY_CREW_FAILURE_RUNS", "3")
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES ('x', 'c', 'gone')"
    )
    for attempt in range(1, 4):
        assert not _run(
            postgres, key=DAY.date().isoformat(), config=_incremental(discovered_sessions)
        ).success
        check = crews_discoverable(postgres=postgres)
        assert not check.passed
        assert check.metadata["consecutive_failures"].value == {"x": attempt}
        if attempt < 3:
            assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.severity == dg.AssetCheckSeverity.ERROR
    assert "crew x failed its last 3 discovery runs" in check.description
    assert "'gone' does not exist" in check.description

    # In a run beside a healthy crew (so the run itself succeeds), the check's ERROR
    # failure is recorded against the asset. (A run where every crew failed fails
    # itself, and its checks are skipped.)
    add_crew(conn, "healthy", "c", "histories", "n8n")
    job = dg.define_asset_job("job", selection=[discovered_sessions])
    defs = dg.Definitions(
        assets=[discovered_sessions],
        asset_checks=[crews_discoverable],
        jobs=[job],
        resources={"postgres": postgres},
    )
    result = defs.resolve_job_def("job").execute_in_process(
        partition_key=DAY.date().isoformat(),
        run_config=_incremental(discovered_sessions),
        raise_on_error=False,
    )
    evaluations = result.get_asset_check_evaluations()
    assert [(e.passed, e.severity) for e in evaluations] == [(False, dg.AssetCheckSeverity.ERROR)]

    assert result.success
    conn.execute("CREATE TABLE gone (LIKE histories INCLUDING ALL)")  # the table now exists
    assert _run(
        postgres, key=DAY.date().isoformat(), config=_incremental(discovered_sessions)
    ).success
    assert crews_discoverable(postgres=postgres).passed


# --- Per-partition figures ---------------------------------------------------------


def test_a_two_day_range_run_gives_each_partition_its_own_figures(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", TIMED)
    second = DAY + timedelta(days=1)
    insert(
        conn,
        "histories",
        TIMED,
        [("a", "human", DAY), ("a", "ai", DAY), ("b", "human", DAY)] + [("c", "human", second)] * 4,
    )
    every = (discovered_sessions, conversations, enriched_conversations)
    result = _run(postgres, span=("2026-11-02", "2026-11-03"), assets=every)  # full mode
    assert result.success

    def by_partition(asset):
        return {
            event.event_specific_data.materialization.partition: (
                event.event_specific_data.materialization.metadata
            )
            for event in result.get_asset_materialization_events()
            if event.asset_key == asset.key
        }

    sessions = by_partition(discovered_sessions)
    assert set(sessions) == {"2026-11-02", "2026-11-03"}
    first, last = sessions["2026-11-02"], sessions["2026-11-03"]
    assert (first["live_sessions"].value, first["messages"].value) == (2, 3)
    assert (last["live_sessions"].value, last["messages"].value) == (1, 4)
    assert (first["sessions_new"].value, last["sessions_new"].value) == (2, 1)
    # The run's own totals are labelled as such, never shown as a partition's.
    assert "rows_scanned" not in first
    assert first["run_totals"].value["rows_scanned"] >= 7  # catch-up and recompute
    assert first["run_partitions"].value == 2

    built = by_partition(conversations)
    assert built["2026-11-02"]["live_conversations"].value == 2
    assert built["2026-11-03"]["live_conversations"].value == 1
    enriched = by_partition(enriched_conversations)
    assert enriched["2026-11-02"]["enriched_rows"].value == 2
    assert enriched["2026-11-03"]["enriched_rows"].value == 1


def test_a_two_hour_range_run_gives_each_hour_its_own_performance_figures(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", TIMED)
    later = DAY + timedelta(hours=1, minutes=5)
    insert(
        conn,
        "histories",
        TIMED,
        [("a", "human", DAY), ("a", "ai", DAY), ("b", "human", later), ("c", "human", later)],
    )
    built = _run(
        postgres,
        key=DAY.date().isoformat(),
        assets=(discovered_sessions, conversations, enriched_conversations),
    )
    assert built.success
    result = _run(
        postgres, span=("2026-11-02-09:00", "2026-11-02-10:00"), assets=[performance_stats]
    )
    assert result.success
    hours = {
        event.event_specific_data.materialization.partition: (
            event.event_specific_data.materialization.metadata
        )
        for event in result.get_asset_materialization_events()
    }
    assert set(hours) == {"2026-11-02-09:00", "2026-11-02-10:00"}
    nine, ten = hours["2026-11-02-09:00"], hours["2026-11-02-10:00"]
    assert (nine["conversations"].value, nine["messages"].value) == (1, 2)
    assert (ten["conversations"].value, ten["messages"].value) == (2, 2)
    assert nine["run_totals"].value["hours"] == 2  # the run's own figure, labelled so
    assert "hours" not in nine


def test_every_job_says_which_executor_it_uses():
    from conversation_assets.definitions import defs

    executors = {
        name: defs.resolve_job_def(name).executor_def.name
        for name in (
            "discovery_job",
            "enrichment_job",
            "embedding_job",
            "metrics_job",
            "performance_stats_job",
            "search_index_job",
        )
    }
    assert executors == {
        "discovery_job": "multi_or_in_process_executor",  # backfills; sensor runs: in process
        "enrichment_job": "in_process",
        "embedding_job": "in_process",
        "metrics_job": "in_process",
        "performance_stats_job": "in_process",
        "search_index_job": "in_process",
    }
    assert defs.resolve_job_def("discovery_job").run_tags[LANE_TAG] == "discovery_job"
    sensors = {sensor.name for sensor in defs.sensors or []}
    assert {"new_histories_sensor", "enrichment_queue_sensor", "metrics_sensor"} <= sensors
