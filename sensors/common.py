"""What every sensor of the project shares: its default status and the look at runs."""

from collections.abc import Callable
from typing import Any

import dagster as dg
import psycopg

from conversation_assets import settings
from resources.postgres import PostgresResource

NOT_STARTED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]
ACTIVE = [*NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


def default_status() -> dg.DefaultSensorStatus:
    """ENABLE_BACKGROUND_JOBS decides whether sensors start running."""
    if settings.load().enable_background_jobs:
        return dg.DefaultSensorStatus.RUNNING
    return dg.DefaultSensorStatus.STOPPED


def runs(
    context: dg.SensorEvaluationContext,
    job: Any,  # a job definition (define_asset_job), by its name
    statuses: list[dg.DagsterRunStatus],
    tags: dict[str, list[str]] | None = None,
) -> list[str]:
    """Ids of the job's runs in one of ``statuses`` (at most one)."""
    records = context.instance.get_run_records(
        filters=dg.RunsFilter(job_name=job.name, statuses=statuses, tags=tags or {}), limit=1
    )
    return [record.dagster_run.run_id for record in records]


def backlog_sensor(
    *,
    name: str,
    job: Any,
    interval_seconds: int,
    description: str,
    waiting: Callable[[psycopg.Connection], int],
    idle: str,
    busy: Callable[[int], str],
    tags: Callable[[int], dict[str, str]],
) -> dg.SensorDefinition:
    """A sensor that starts `job` when `waiting` finds work (one cheap query) and no run
    of `job` is queued or running: one drain at a time, none for an empty backlog."""

    @dg.sensor(
        name=name,
        job=job,
        minimum_interval_seconds=interval_seconds,
        default_status=default_status(),
        description=description,
    )
    def backlog(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.RunRequest | dg.SkipReason:
        with postgres.connection() as conn:
            count = waiting(conn)
        if not count:
            return dg.SkipReason(idle)
        if runs(context, job, ACTIVE):
            return dg.SkipReason(busy(count))
        return dg.RunRequest(tags=tags(count))

    return backlog
