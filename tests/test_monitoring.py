"""Live metrics against real PostgreSQL: /metrics, the dashboard, alerts, the webhook."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import dagster as dg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import ConnectionPool

from conversation_assets import cli, inbox, monitoring, settings
from conversation_assets.discovery import discover
from conversation_assets.inbox import queue_conversation_storage
from resources.embeddings import EmbeddingResource
from tests.sources import add_crew, insert

ROOT = Path(__file__).resolve().parents[1]
LOCAL = EmbeddingResource()
APP = "cp-test-discovery"  # the tests' PostgresResource application_name


def _scrape(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(family, suffix: str = "", **labels: str) -> float:
    for sample in family.samples:
        if sample.name == family.name + suffix and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            return sample.value
    raise AssertionError(f"no sample {family.name}{suffix} {labels}")


def _push(conn, n: int) -> None:
    for i in range(n):
        queue_conversation_storage(
            conn, f"u-{i}", "web", f"User: question {i}\nAI: answer {i}", client_code="acme"
        )


def test_metrics_endpoint_serves_every_family_from_the_database(conn, db_url, postgres):
    conn.execute("INSERT INTO inbox_clients (client_code) VALUES ('acme')")
    _push(conn, 5)
    report = inbox.drain(postgres.pool, LOCAL, batch_size=2)
    assert report.stored == 5
    _push(conn, 2)  # waiting
    conn.execute("UPDATE conversation_inbox SET enqueued_at = now() - interval '90 seconds'")
    conn.execute(
        """INSERT INTO pipeline_runs (run_id, asset, duration_ms, items)
           VALUES ('r1', 'discovered_sessions', 250, 10), ('r2', 'conversations', 4000, 3)"""
    )
    # Rewriting a run's row moves its last success, not its histogram.
    conn.execute("UPDATE pipeline_runs SET duration_ms = 300 WHERE run_id = 'r1'")
    inbox.set_max_pending(conn, 10)
    for _ in range(10):  # 8 more fill it to 10: the last 2 are refused
        try:
            queue_conversation_storage(conn, "u", "web", "User: more", client_code="acme")
        except inbox.InboxFullError:
            pass
    with postgres.connection():  # one of "the pipeline's" connections, idle in the pool
        stop, port = monitoring.serve_metrics(db_url, "127.0.0.1", 0, APP)
        try:
            families = _scrape(port)
        finally:
            stop()

    prefix = "conversation_pipeline_"
    assert _value(families[prefix + "inbox_depth"]) == 10
    assert _value(families[prefix + "inbox_max_pending"]) == 10
    assert 90 <= _value(families[prefix + "inbox_oldest_age_seconds"]) < 120
    assert families[prefix + "inbox_enqueued"].type == "counter"
    assert _value(families[prefix + "inbox_enqueued"], "_total") == 15
    assert _value(families[prefix + "inbox_stored"], "_total") == 5
    assert _value(families[prefix + "inbox_rejected"], "_total") == 0
    assert _value(families[prefix + "inbox_refused"], "_total") == 2
    backlog = families[prefix + "queue_backlog"]
    assert _value(backlog, queue="inbox") == 10
    assert _value(backlog, queue="enrichment_queue") == 5  # the stored ones, to enrich
    assert _value(backlog, queue="embedding_backlog") == 0  # embedded by the drain
    assert {s.labels["queue"] for s in backlog.samples} == {
        "inbox",
        "conversation_queue",
        "embedding_backlog",
        "enrichment_queue",
        "metrics_dirty_periods",
        "messenger_queue",
    }
    latency = families[prefix + "operation_duration_seconds"]
    assert latency.type == "histogram"
    assert {s.labels["operation"] for s in latency.samples} >= set(monitoring.OPERATIONS)
    assert _value(latency, "_count", operation="discovery") == 1
    assert _value(latency, "_sum", operation="discovery") == pytest.approx(0.25)
    assert _value(latency, "_bucket", operation="discovery", le="0.1") == 0
    assert _value(latency, "_bucket", operation="discovery", le="0.25") == 1
    assert _value(latency, "_count", operation="conversations_build") == 1
    assert _value(latency, "_count", operation="drain_batch") == 3
    assert _value(latency, "_count", operation="embedding") == 3
    # Each enqueue carries the round trip of the one before it (this thread's).
    assert _value(latency, "_count", operation="enqueue") in (4, 5)
    assert _value(latency, "_bucket", operation="enqueue", le="+Inf") in (4, 5)
    success = families[prefix + "asset_last_success_timestamp_seconds"]
    assert {s.labels["asset"] for s in success.samples} == {"discovered_sessions", "conversations"}
    assert _value(families[prefix + "db_connections"], state="idle") >= 1
    assert _value(families[prefix + "db_max_connections"]) >= 1
    assert _value(families[prefix + "scrape_error"]) == 0


def test_discovery_lag_rises_with_unread_rows_and_stays_quiet_when_idle(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n")
    assert monitoring.discovery_lag(conn) == (0, 0)  # nothing to read: idle, not behind
    insert(conn, "histories", "n8n", [("s1", "human"), ("s1", "ai")])
    assert monitoring.discovery_lag(conn) == (1, 0)
    discover(postgres.pool)
    assert monitoring.discovery_lag(conn) == (0, 0)
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES ('gone', 'b', 'nope')"
    )
    assert monitoring.discovery_lag(conn) == (0, 1)
    figures = monitoring.snapshot(conn, "test")
    families = {f.name: f for f in monitoring.metric_families(figures)}
    assert _value(families["conversation_pipeline_discovery_crews_behind"]) == 0
    assert _value(families["conversation_pipeline_discovery_crews_unreadable"]) == 1


def test_a_scrape_without_the_database_reports_the_error():
    pool = ConnectionPool("dbname=none", open=False)
    families = list(monitoring.PipelineCollector(pool, APP).collect())
    assert [(f.name, f.samples[0].value) for f in families] == [
        ("conversation_pipeline_scrape_error", 1)
    ]


def test_histogram_quantiles_interpolate_like_prometheus():
    histogram = monitoring.Histogram([0.001, 0.002, 0.005], [0, 50, 50, 0])
    assert histogram.quantile(0.5) == pytest.approx(0.002)
    assert histogram.quantile(0.99) == pytest.approx(0.002 + 0.003 * 49 / 50)
    assert monitoring.Histogram([1.0], [0, 0]).quantile(0.5) is None
    assert histogram.cumulative() == [("0.001", 0), ("0.002", 50), ("0.005", 100), ("+Inf", 100)]


def test_status_prints_the_dashboard_with_health_from_the_thresholds(conn, postgres):
    conn.execute("INSERT INTO inbox_clients (client_code) VALUES ('acme')")
    _push(conn, 3)
    inbox.drain(postgres.pool, LOCAL)
    _push(conn, 2)
    printed: list[str] = []
    current = settings.Settings(
        inbox_age_warning_seconds=30,
        inbox_age_critical_seconds=120,
        enqueue_p99_warning_ms=60_000,  # this test is about the age: no latency alert
        enqueue_p99_critical_ms=120_000,
    )
    healthy = monitoring.status(postgres.pool, current, out=printed.append)
    assert healthy.health == "healthy"
    text = printed[-1]
    for expected in ("inbox       2 waiting", "stored 3", "p50 ms", "p99 ms", "drain_batch"):
        assert expected in text
    assert "health: HEALTHY" in text and "alerts      none" in text

    conn.execute("UPDATE conversation_inbox SET enqueued_at = now() - interval '60 seconds'")
    assert monitoring.status(postgres.pool, current, out=printed.append).health == "warning"
    conn.execute("UPDATE conversation_inbox SET enqueued_at = now() - interval '10 minutes'")
    critical = monitoring.status(postgres.pool, current, out=printed.append, every=0.01, rounds=2)
    assert critical.health == "critical"
    assert "CRITICAL: inbox oldest item age" in printed[-1]
    assert "enqueued/s" in printed[-1]  # a refresh shows the rates between the two


def test_status_command_exits_with_the_health(conn, db_url, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("INBOX_AGE_WARNING_SECONDS", "1")
    monkeypatch.setenv("ENQUEUE_P99_WARNING_MS", "60000")
    monkeypatch.setenv("ENQUEUE_P99_CRITICAL_MS", "120000")
    assert cli.main(["status"]) == 0
    assert "conversation-pipeline status" in capsys.readouterr().out
    conn.execute("INSERT INTO inbox_clients (client_code) VALUES ('acme')")
    _push(conn, 1)
    conn.execute("UPDATE conversation_inbox SET enqueued_at = now() - interval '5 seconds'")
    assert cli.main(["status"]) == 1


class _Hook:
    """A local Slack-compatible webhook that records what it is sent."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append(json.loads(body))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[_Hook]:
    server = _Hook()
    yield server
    server.close()


def test_a_failing_inbox_check_calls_the_webhook(conn, postgres, hook, monkeypatch):
    from conversation_assets.assets.inbox import inbox_oldest_item_fresh, pushed_conversations

    monkeypatch.setenv("ALERT_WEBHOOK_URL", hook.url)
    monkeypatch.setenv("INBOX_AGE_CRITICAL_SECONDS", "300")
    conn.execute("INSERT INTO inbox_clients (client_code) VALUES ('acme')")
    _push(conn, 2)
    conn.execute("UPDATE conversation_inbox SET enqueued_at = now() - interval '10 minutes'")
    result = dg.materialize(
        [pushed_conversations, inbox_oldest_item_fresh],
        resources={"postgres": postgres, "embeddings": LOCAL},
        selection=dg.AssetSelection.checks(inbox_oldest_item_fresh),  # the items stay old
        raise_on_error=False,
    )
    (outcome,) = result.get_asset_check_evaluations()
    assert not outcome.passed and outcome.severity == dg.AssetCheckSeverity.ERROR
    assert outcome.metadata["waiting"].value == 2
    assert len(hook.posts) == 1
    assert "inbox_oldest_item_fresh" in hook.posts[0]["text"]
    assert "2 waiting" in hook.posts[0]["text"]


def test_a_failed_run_calls_the_webhook(hook, monkeypatch):
    from sensors import alert_webhook_sensor

    monkeypatch.setenv("ALERT_WEBHOOK_URL", hook.url)

    @dg.op
    def boom() -> None:
        raise RuntimeError("the model is away")

    @dg.job
    def failing_job() -> None:
        boom()

    instance = dg.DagsterInstance.ephemeral()
    result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
    context = dg.build_run_status_sensor_context(
        sensor_name="alert_webhook_sensor",
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_failure_event(),
    ).for_run_failure()
    alert_webhook_sensor(context)
    assert len(hook.posts) == 1
    assert "failing_job" in hook.posts[0]["text"]
    assert monitoring.post_alert(None, "x") is False
    assert monitoring.post_alert("http://127.0.0.1:9/closed", "x", timeout=2) is False


def test_the_run_failure_alert_runs_only_with_a_webhook_to_post_to(monkeypatch):
    from sensors.alerts import build_alert_webhook_sensor

    monkeypatch.delenv("ALERT_WEBHOOK_URL", raising=False)
    monkeypatch.setenv("ENABLE_BACKGROUND_JOBS", "true")
    assert build_alert_webhook_sensor().default_status == dg.DefaultSensorStatus.STOPPED
    monkeypatch.setenv("ALERT_WEBHOOK_URL", "http://127.0.0.1:9/hook")
    assert build_alert_webhook_sensor().default_status == dg.DefaultSensorStatus.RUNNING
    monkeypatch.setenv("ENABLE_BACKGROUND_JOBS", "false")
    assert build_alert_webhook_sensor().default_status == dg.DefaultSensorStatus.STOPPED


def _exported_names() -> set[str]:
    names = {
        f"conversation_pipeline_{n}"
        for n in (
            "inbox_depth",
            "inbox_oldest_age_seconds",
            "inbox_max_pending",
            "queue_backlog",
            "asset_last_success_timestamp_seconds",
            "discovery_crews_behind",
            "discovery_crews_unreadable",
            "db_connections",
            "db_max_connections",
            "scrape_error",
            "scrape_duration_seconds",
        )
    }
    names |= {
        f"conversation_pipeline_inbox_{n}_total"
        for n in ("enqueued", "stored", "rejected", "refused")
    }
    base = "conversation_pipeline_operation_duration_seconds"
    return names | {f"{base}_bucket", f"{base}_sum", f"{base}_count"}


def test_alerting_rules_parse_and_name_only_exported_metrics():
    rules_file = ROOT / "monitoring" / "alerts.yml"
    document = yaml.safe_load(rules_file.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules) >= 8
    exported = _exported_names()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        for name in re.findall(r"conversation_pipeline_\w+", rule["expr"]):
            assert name in exported, f"{rule['alert']} reads {name}, which is not exported"
    promtool = shutil.which("promtool")
    if promtool:
        checked = subprocess.run(
            [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metrics_server_command_serves_and_stops_on_sigint(db_url):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, DATABASE_URL=db_url, METRICS_SERVER_PORT=str(port))
    child = subprocess.Popen(
        [sys.executable, "-m", "conversation_assets.cli", "metrics-server"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}/metrics" in line, line
        families = _scrape(port)
        assert families["conversation_pipeline_inbox_depth"].samples[0].value == 0
        child.send_signal(signal.SIGINT)
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
