"""Schedules of the project."""

from datetime import UTC

import dagster as dg
from dagster._utils.schedules import is_valid_cron_string

from conversation_assets import settings
from jobs import INCREMENTAL_RUN_CONFIG, discovery_job


def discovery_cron() -> str:
    """CONVERSATION_DISCOVERY_CRON, validated: a bad value is an error, never a fallback."""
    value = settings.raw("CONVERSATION_DISCOVERY_CRON")
    if not is_valid_cron_string(value):
        raise settings.SettingError(
            f"CONVERSATION_DISCOVERY_CRON={value!r} is not a valid 5-field cron expression "
            "(minute hour day-of-month month day-of-week), e.g. '*/5 * * * *'."
        )
    return value


def build_discovery_schedule() -> dg.ScheduleDefinition:
    @dg.schedule(
        name="discovery_schedule",
        cron_schedule=discovery_cron(),
        execution_timezone="UTC",
        job=discovery_job,
        default_status=dg.DefaultScheduleStatus.RUNNING
        if settings.background_jobs_enabled()
        else dg.DefaultScheduleStatus.STOPPED,
        description="Incremental discovery of every crew on a cron (seed 000's background job).",
    )
    def discovery_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        tick = context.scheduled_execution_time.astimezone(UTC)
        return dg.RunRequest(
            partition_key=tick.date().isoformat(),
            run_config=INCREMENTAL_RUN_CONFIG,
            tags={"discovery/trigger": "schedule"},
        )

    return discovery_schedule


discovery_schedule = build_discovery_schedule()
