"""Schedules of the project."""

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any

import dagster as dg

from conversation_assets import settings
from conversation_assets.discovery import probe_new_work
from conversation_assets.partitions import daily_partitions
from conversation_assets.queries import query
from jobs import (
    INCREMENTAL_RUN_CONFIG,
    discovery_job,
    metrics_job,
    performance_stats_job,
    search_index_job,
)
from resources.postgres import PostgresResource


def _default_status() -> dg.DefaultScheduleStatus:
    """ENABLE_BACKGROUND_JOBS decides whether schedules start running."""
    if settings.load().enable_background_jobs:
        return dg.DefaultScheduleStatus.RUNNING
    return dg.DefaultScheduleStatus.STOPPED


def build_discovery_schedule() -> dg.ScheduleDefinition:
    reconcile_after = timedelta(minutes=settings.load().discovery_reconcile_minutes)

    @dg.schedule(
        name="discovery_schedule",
        cron_schedule=settings.load().conversation_discovery_cron,
        execution_timezone="UTC",
        job=discovery_job,
        default_status=_default_status(),
        description="On a cron, whether or not the sensor is on: probes every crew as the "
        "sensor does and launches one incremental discovery run (in one process) only when "
        "there is work: new rows, a due recompute of a table that lost rows, pending ids "
        "to let go, or sessions still queued for their conversation. Skips otherwise.",
    )
    def discovery_schedule(
        context: dg.ScheduleEvaluationContext, postgres: PostgresResource
    ) -> dg.RunRequest | dg.SkipReason:
        with postgres.connection() as conn:
            work, problems = probe_new_work(conn, {}, reconcile_after)
            row = conn.execute(query("conversation_queue_waiting")).fetchone()
        queued = bool(row and row[0])
        if not work and not problems and not queued:
            return dg.SkipReason("nothing changed in any crew's histories; nothing is queued")
        tick = context.scheduled_execution_time.astimezone(UTC)
        reasons = [f"{len(work)} crews with work"] if work else []
        if problems:
            reasons.append(f"{len(problems)} crews unreadable")  # the run records why
        if queued:
            reasons.append("sessions queued for their conversation")
        return dg.RunRequest(
            partition_key=tick.date().isoformat(),
            run_config=INCREMENTAL_RUN_CONFIG,
            tags={"discovery/trigger": "schedule", "discovery/reason": "; ".join(reasons)},
        )

    return discovery_schedule


discovery_schedule = build_discovery_schedule()


def _refresh_schedule(
    *,
    name: str,
    cron: str,
    job: Any,  # a job definition (define_asset_job)
    description: str,
    period: Callable[[datetime], tuple[datetime, str]],
    block: str,
) -> dg.ScheduleDefinition:
    """A refresh of the period that just ended (``period(tick)``: its start and its
    partition key), skipped with a reason when ``block`` finds its figures current."""

    @dg.schedule(
        name=name,
        cron_schedule=cron,
        execution_timezone="UTC",
        job=job,
        default_status=_default_status(),
        description=description,
    )
    def refresh_schedule(
        context: dg.ScheduleEvaluationContext, postgres: PostgresResource
    ) -> dg.RunRequest | dg.SkipReason:
        start, key = period(context.scheduled_execution_time.astimezone(UTC))
        if start < daily_partitions.start:  # hours and days start together
            return dg.SkipReason(f"{key} is before the partitions' first day")
        with postgres.connection() as conn:
            row = conn.execute(query(block), {"start": start}).fetchone()
        if row and row[0]:
            return dg.SkipReason(f"{key} is current: nothing changed since its last refresh")
        return dg.RunRequest(partition_key=key, tags={"metrics/trigger": "schedule"})

    return refresh_schedule


def _yesterday(tick: datetime) -> tuple[datetime, str]:
    day = tick.date() - timedelta(days=1)
    return datetime.combine(day, time(), UTC), day.isoformat()


def _last_hour(tick: datetime) -> tuple[datetime, str]:
    hour = tick.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    return hour, hour.strftime("%Y-%m-%d-%H:%M")


def build_metrics_schedule() -> dg.ScheduleDefinition:
    """Yesterday's metrics once the day is over, unless they are current already (days
    also refresh whenever their enriched rows change, through metrics_sensor)."""
    return _refresh_schedule(
        name="metrics_schedule",
        cron="30 0 * * *",
        job=metrics_job,
        description="Daily at 00:30 UTC: replace the metrics of the day that just ended, "
        "unless nothing in it changed since they were last replaced.",
        period=_yesterday,
        block="metrics_day_is_current",
    )


metrics_schedule = build_metrics_schedule()


def build_performance_stats_schedule() -> dg.ScheduleDefinition:
    """The hour that just ended, five minutes past, unless its figures are current."""
    return _refresh_schedule(
        name="performance_stats_schedule",
        cron="5 * * * *",
        job=performance_stats_job,
        description="Hourly: replace performance_stats for the hour that just ended, unless "
        "nothing in it changed and no pipeline run finished in it since it was replaced.",
        period=_last_hour,
        block="performance_hour_is_current",
    )


performance_stats_schedule = build_performance_stats_schedule()


def build_search_index_schedule() -> dg.ScheduleDefinition:
    """Daily by default: a client crosses the size threshold slowly, and until its own
    index is built its searches use the shared one."""
    return dg.ScheduleDefinition(
        name="search_index_schedule",
        cron_schedule=settings.load().search_index_cron,
        execution_timezone="UTC",
        job=search_index_job,
        default_status=_default_status(),
        description="Give each client with enough vectors an HNSW index of its own "
        "(built CONCURRENTLY) and drop those of clients that shrank.",
    )


search_index_schedule = build_search_index_schedule()
