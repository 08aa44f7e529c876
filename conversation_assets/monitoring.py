"""Live figures: a Prometheus endpoint, a terminal dashboard and an alert webhook.

The in-memory queue this replaces kept its performance monitor (p50/p95/p99 per
operation) in the process that did the work, so a restart zeroed it and another
process could not see it. Here every figure is read from the database on each
scrape (`PipelineCollector`): the inbox and its counters, the queues' backlogs, the
latency histograms that the drain and the pipeline's run records feed
(`operation_latency`), each asset's last success, the pipeline's connections.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from psycopg_pool import ConnectionPool

from conversation_assets import settings
from conversation_assets.discovery import CrewSourceError, load_crews, probe_crew
from conversation_assets.queries import query

PREFIX = "conversation_pipeline"
OPERATIONS = (
    "enqueue",
    "drain_batch",
    "embedding",
    "discovery",
    "conversations_build",
    "enrichment_refresh",
    "metrics_refresh",
)
Health = Literal["healthy", "warning", "critical"]
_RANK: dict[str, int] = {"healthy": 0, "warning": 1, "critical": 2}


@dataclass
class Histogram:
    """One operation's latency histogram: bucket bounds (s), samples per bucket."""

    bounds: list[float]
    counts: list[int]  # len(bounds) + 1: the last is +Inf
    total_seconds: float = 0.0

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (le, samples at or below it), +Inf last."""
        running, out = 0, []
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            running += count
            out.append(("+Inf" if math.isinf(bound) else _le(bound), running))
        return out

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear within the bucket (None: no samples)."""
        total = self.samples
        if not total:
            return None
        rank = q * total
        running = 0
        for i, count in enumerate(self.counts):
            if running + count >= rank and count:
                if i >= len(self.bounds):  # +Inf bucket: the highest finite bound
                    return self.bounds[-1]
                lower = self.bounds[i - 1] if i else 0.0
                return lower + (self.bounds[i] - lower) * (rank - running) / count
            running += count
        return self.bounds[-1]


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass
class Snapshot:
    """Every figure of one scrape, read in one transaction."""

    taken_at: float
    inbox_depth: int
    inbox_oldest_age_seconds: float | None
    inbox_stored_total: int
    inbox_rejected_total: int
    inbox_refused_total: int
    inbox_max_pending: int
    backlogs: dict[str, int]
    latency: dict[str, Histogram]
    last_success: dict[str, float]
    connections: dict[str, int]
    max_connections: int
    discovery_crews_behind: int = 0
    discovery_crews_unreadable: int = 0

    @property
    def inbox_enqueued_total(self) -> int:
        """Every item enqueued is stored, rejected or still waiting."""
        return self.inbox_stored_total + self.inbox_rejected_total + self.inbox_depth


def snapshot(conn: psycopg.Connection, application_name: str) -> Snapshot:
    """Read every figure in one REPEATABLE READ snapshot, so they agree."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            inbox_row = conn.execute(query("monitoring_inbox")).fetchone()
            assert inbox_row is not None, "inbox_state has its row (migration 0009)"
            backlogs = {q: int(n) for q, n in conn.execute(query("monitoring_backlogs"))}
            bounds_row = conn.execute(query("monitoring_bounds")).fetchone()
            bounds = [float(b) for b in (bounds_row[0] if bounds_row else [])]
            latency = {op: Histogram(bounds, [0] * (len(bounds) + 1)) for op in OPERATIONS}
            for operation, bucket, _le_value, samples, seconds in conn.execute(
                query("monitoring_latency")
            ):
                histogram = latency.setdefault(
                    operation, Histogram(bounds, [0] * (len(bounds) + 1))
                )
                histogram.counts[min(int(bucket), len(bounds) + 1) - 1] += int(samples)
                histogram.total_seconds += float(seconds)
            last_success = {
                asset: float(at) for asset, at in conn.execute(query("monitoring_last_success"))
            }
            connections = {
                state: int(n)
                for state, n in conn.execute(
                    query("monitoring_connections"), {"application_name": application_name}
                )
            }
    finally:
        conn.isolation_level = None
    behind, unreadable = discovery_lag(conn)
    depth, oldest, stored, rejected, max_pending, refused = inbox_row
    max_connections = connections.pop("max_connections", 0)
    return Snapshot(
        taken_at=time.time(),
        inbox_depth=int(depth),
        inbox_oldest_age_seconds=None if oldest is None else float(oldest),
        inbox_stored_total=int(stored),
        inbox_rejected_total=int(rejected),
        inbox_refused_total=int(refused),
        inbox_max_pending=int(max_pending),
        backlogs=backlogs,
        latency=latency,
        last_success=last_success,
        connections=connections,
        max_connections=max_connections,
        discovery_crews_behind=behind,
        discovery_crews_unreadable=unreadable,
    )


def discovery_lag(conn: psycopg.Connection) -> tuple[int, int]:
    """Crews whose histories hold rows discovery has not read yet, and crews whose
    table cannot be probed: the sensor's probe (a few index lookups per crew).

    Unlike the time of the last discovery run, this stays quiet while nothing changes
    (an idle pipeline launches no run) and rises when discovery falls behind."""
    behind = unreadable = 0
    for crew in load_crews(conn):
        try:
            if probe_crew(conn, crew).has_rows_past(crew.high_water_id):
                behind += 1
        except (CrewSourceError, psycopg.Error):
            unreadable += 1
    return behind, unreadable


class PipelineCollector(Collector):
    """A prometheus_client collector that reads the database on each scrape.

    Names follow Prometheus' conventions: base units (seconds), `_total` counters,
    labels only of small fixed sets (operation, queue, asset, state). A scrape that
    cannot reach the database exports `conversation_pipeline_scrape_error 1` alone.
    """

    def __init__(self, pool: ConnectionPool, application_name: str) -> None:
        self.pool = pool
        self.application_name = application_name

    def describe(self) -> list[Metric]:
        return []  # figures are read at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            with self.pool.connection(timeout=10) as conn:
                figures = snapshot(conn, self.application_name)
        except Exception:  # noqa: BLE001 - a scrape reports the failure, it does not raise
            yield GaugeMetricFamily(
                f"{PREFIX}_scrape_error", "1 when the last scrape could not read the database.", 1
            )
            return
        yield from metric_families(figures)
        yield GaugeMetricFamily(
            f"{PREFIX}_scrape_error", "1 when the last scrape could not read the database.", 0
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_scrape_duration_seconds",
            "Time this scrape spent reading the database.",
            time.perf_counter() - started,
        )
        stats = self.pool.get_stats()
        pool = GaugeMetricFamily(
            f"{PREFIX}_exporter_pool_connections",
            "Connections of the metrics server's own pool.",
            labels=["state"],
        )
        pool.add_metric(["open"], stats.get("pool_size", 0))
        pool.add_metric(["idle"], stats.get("pool_available", 0))
        yield pool


def metric_families(figures: Snapshot) -> Iterator[Metric]:
    """The Prometheus families of a snapshot."""
    yield GaugeMetricFamily(
        f"{PREFIX}_inbox_depth", "Conversations waiting in the inbox.", figures.inbox_depth
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_inbox_oldest_age_seconds",
        "How long the oldest waiting inbox item has waited (0 when empty).",
        figures.inbox_oldest_age_seconds or 0.0,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_inbox_max_pending",
        "The inbox's bound (INBOX_MAX_PENDING): past it enqueues are refused.",
        figures.inbox_max_pending,
    )
    for name, doc, value in (
        ("inbox_enqueued", "Conversations handed off to the inbox.", figures.inbox_enqueued_total),
        ("inbox_stored", "Inbox items stored in conversations.", figures.inbox_stored_total),
        (
            "inbox_rejected",
            "Inbox items moved to conversation_inbox_rejects.",
            figures.inbox_rejected_total,
        ),
        (
            "inbox_refused",
            "Enqueue calls refused because the inbox was full (backpressure).",
            figures.inbox_refused_total,
        ),
    ):
        yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value)
    yield _labelled_gauge(
        "queue_backlog",
        "Items waiting in each of the pipeline's queues.",
        "queue",
        figures.backlogs,
    )
    latency = HistogramMetricFamily(
        f"{PREFIX}_operation_duration_seconds",
        "How long each operation took: enqueue (the caller's round trip), drain batch, "
        "embedding, and the pipeline's runs.",
        labels=["operation"],
    )
    for operation, histogram in sorted(figures.latency.items()):
        latency.add_metric([operation], histogram.cumulative(), histogram.total_seconds)
    yield latency
    yield GaugeMetricFamily(
        f"{PREFIX}_discovery_crews_behind",
        "Crews whose histories table holds rows discovery has not read yet.",
        figures.discovery_crews_behind,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_discovery_crews_unreadable",
        "Crews whose histories table cannot be probed (missing, renamed, no permission).",
        figures.discovery_crews_unreadable,
    )
    yield _labelled_gauge(
        "asset_last_success_timestamp_seconds",
        "Unix time of each asset's last successful materialization.",
        "asset",
        figures.last_success,
    )
    yield _labelled_gauge(
        "db_connections",
        "The pipeline's connections to the database (all its processes' pools), by state.",
        "state",
        {state.replace(" ", "_"): count for state, count in figures.connections.items()},
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_db_max_connections", "The server's max_connections.", figures.max_connections
    )


def _labelled_gauge(name: str, doc: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    """One gauge family with a sample per label value, in label order."""
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def registry(pool: ConnectionPool, application_name: str) -> CollectorRegistry:
    """A registry holding only the pipeline's collector."""
    registry_ = CollectorRegistry(auto_describe=False)
    registry_.register(PipelineCollector(pool, application_name))
    return registry_


# --- health and the terminal dashboard ----------------------------------------------


@dataclass
class Assessment:
    health: Health
    alerts: list[str] = field(default_factory=list)


def _grade(value: float | None, warning: float, critical: float) -> Health:
    if value is None:
        return "healthy"
    if value >= critical:
        return "critical"
    if value >= warning:
        return "warning"
    return "healthy"


def assess(figures: Snapshot, current: settings.Settings) -> Assessment:
    """Health against the thresholds of the settings (each an environment variable)."""
    enqueue_p99 = figures.latency.get("enqueue")
    p99_ms = None
    if enqueue_p99 is not None:
        p99 = enqueue_p99.quantile(0.99)
        p99_ms = None if p99 is None else p99 * 1000
    checks = [
        (
            "inbox oldest item age",
            figures.inbox_oldest_age_seconds,
            current.inbox_age_warning_seconds,
            current.inbox_age_critical_seconds,
            "s",
        ),
        (
            "inbox depth",
            figures.inbox_depth,
            current.inbox_depth_warning,
            current.inbox_depth_critical,
            "",
        ),
        (
            "enqueue p99",
            p99_ms,
            current.enqueue_p99_warning_ms,
            current.enqueue_p99_critical_ms,
            " ms",
        ),
    ]
    result = Assessment("healthy")
    for name, value, warning, critical, unit in checks:
        grade = _grade(value, warning, critical)
        if grade != "healthy":
            limit = critical if grade == "critical" else warning
            result.alerts.append(f"{grade.upper()}: {name} {value:,.1f}{unit} >= {limit:,}{unit}")
            if _RANK[grade] > _RANK[result.health]:
                result.health = grade
    if figures.inbox_depth >= figures.inbox_max_pending:
        result.health = "critical"
        result.alerts.append(
            f"CRITICAL: inbox full ({figures.inbox_depth:,} >= {figures.inbox_max_pending:,}): "
            "enqueues are refused"
        )
    return result


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f}"


def render(
    figures: Snapshot,
    current: settings.Settings,
    *,
    previous: Snapshot | None = None,
    recent_stored: int | None = None,
    recent_seconds: float = 300.0,
) -> str:
    """The dashboard: queue depth, throughput, p50/p95/p99 per operation, health."""
    verdict = assess(figures, current)
    at = datetime.fromtimestamp(figures.taken_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    oldest = figures.inbox_oldest_age_seconds
    lines = [
        f"conversation-pipeline status  {at}  health: {verdict.health.upper()}",
        "",
        f"inbox       {figures.inbox_depth:,} waiting (bound {figures.inbox_max_pending:,}), "
        f"oldest {'-' if oldest is None else f'{oldest:,.1f} s'}",
        f"            enqueued {figures.inbox_enqueued_total:,}  stored "
        f"{figures.inbox_stored_total:,}  rejected {figures.inbox_rejected_total:,}  refused "
        f"{figures.inbox_refused_total:,}",
    ]
    if previous is not None and figures.taken_at > previous.taken_at:
        span = figures.taken_at - previous.taken_at
        stored = (figures.inbox_stored_total - previous.inbox_stored_total) / span
        enqueued = (figures.inbox_enqueued_total - previous.inbox_enqueued_total) / span
        lines.append(
            f"throughput  {enqueued:,.1f} enqueued/s, {stored:,.1f} stored/s (last {span:.0f} s)"
        )
    elif recent_stored is not None:
        lines.append(
            f"throughput  {recent_stored / recent_seconds:,.1f} stored/s "
            f"(drain runs of the last {recent_seconds / 60:.0f} min)"
        )
    lines.append(
        "backlogs    "
        + "  ".join(f"{name} {items:,}" for name, items in sorted(figures.backlogs.items()))
    )
    lines += ["", f"{'operation':<22}{'samples':>10}{'p50 ms':>12}{'p95 ms':>12}{'p99 ms':>12}"]
    for operation in OPERATIONS:
        histogram = figures.latency.get(operation)
        if histogram is None:
            continue
        lines.append(
            f"{operation:<22}{histogram.samples:>10,}"
            f"{_ms(histogram.quantile(0.5)):>12}{_ms(histogram.quantile(0.95)):>12}"
            f"{_ms(histogram.quantile(0.99)):>12}"
        )
    if figures.last_success:
        lines.append("")
        lines.append("last success")
        for asset, stamp in sorted(figures.last_success.items()):
            ago = figures.taken_at - stamp
            lines.append(f"  {asset:<34}{ago:>10,.0f} s ago")
    connected = sum(figures.connections.values())
    lines += [
        "",
        f"database    {connected} pipeline connections "
        + (
            "(" + ", ".join(f"{s} {n}" for s, n in sorted(figures.connections.items())) + ")"
            if figures.connections
            else ""
        )
        + f", max_connections {figures.max_connections}",
        "",
        "alerts      " + ("none" if not verdict.alerts else verdict.alerts[0]),
        *[f"            {alert}" for alert in verdict.alerts[1:]],
    ]
    return "\n".join(lines)


def status(
    pool: ConnectionPool,
    current: settings.Settings,
    *,
    every: float | None = None,
    out: Callable[[str], None] = print,
    rounds: int | None = None,
) -> Assessment:
    """Print the dashboard once, or every `every` seconds (until interrupted or
    `rounds` prints); the last assessment."""
    previous: Snapshot | None = None
    printed = 0
    while True:
        with pool.connection() as conn:
            figures = snapshot(conn, current.pg_application_name)
            row = conn.execute(query("monitoring_throughput"), {"seconds": 300}).fetchone()
        recent = int(row[0]) if row else 0
        text = render(figures, current, previous=previous, recent_stored=recent)
        if every is not None and printed:
            out("\x1b[2J\x1b[H" + text)  # clear the screen, like `watch`
        else:
            out(text)
        printed += 1
        verdict = assess(figures, current)
        if every is None or (rounds is not None and printed >= rounds):
            return verdict
        previous = figures
        time.sleep(every)


# --- the alert webhook ---------------------------------------------------------------


def post_alert(url: str | None, text: str, *, timeout: float = 10.0) -> bool:
    """Post a Slack-compatible `{"text": ...}`; False (never raising) when it fails or no
    URL is set: an alert must not fail the run or check that sends it."""
    if not url:
        return False
    try:
        response = requests.post(url, json={"text": text}, timeout=timeout)
    except requests.RequestException:
        return False
    return response.ok


def webhook_url() -> str | None:
    return settings.load().alert_webhook_url


def describe_failure(kind: str, name: str, details: dict[str, Any] | str) -> str:
    """One alert line: what failed and why."""
    if isinstance(details, dict):
        details = ", ".join(f"{key}={value}" for key, value in details.items())
    return f":rotating_light: conversation-pipeline {kind} `{name}` failed: {details}"


# --- the metrics server ----------------------------------------------------------------


def serve_metrics(
    database_url: str, host: str, port: int, application_name: str
) -> tuple[Callable[[], None], int]:
    """Start serving `/metrics` in a background thread; (stop, the port bound).

    Its own small pool, named `<application_name>-metrics` so that its connection is
    not counted among the pipeline's.
    """
    from prometheus_client import start_http_server

    from resources.postgres import PostgresResource

    resource = PostgresResource(
        database_url=database_url,
        pool_min_size=1,
        pool_max_size=2,
        statement_timeout_ms=10_000,
        application_name=f"{application_name}-metrics",
    )
    server, thread = start_http_server(
        port, addr=host, registry=registry(resource.pool, application_name)
    )

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
        resource.close()

    return stop, int(server.server_address[1])
