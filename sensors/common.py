"""What every sensor of the project shares: its default status and the look at runs."""

from typing import Any

import dagster as dg

from conversation_assets import settings

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
