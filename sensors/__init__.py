"""Sensors of the project."""

import hashlib
import json
from datetime import UTC, datetime, time, timedelta

import dagster as dg

from conversation_assets import settings
from conversation_assets.discovery import probe_new_work
from conversation_assets.embedding import backlog_size
from conversation_assets.enrichment import pending_dirty_periods
from conversation_assets.partitions import partition_keys_for
from jobs import (
    INCREMENTAL_RUN_CONFIG,
    discovery_job,
    embedding_job,
    metrics_job,
    performance_stats_job,
)
from resources.postgres import PostgresResource

METRICS_PERIODS_PER_TICK = 2000  # stale days and hours read per tick (the rest next tick)


def _default_status() -> dg.DefaultSensorStatus:
    """ENABLE_BACKGROUND_JOBS decides whether sensors start running."""
    if settings.load().enable_background_jobs:
        return dg.DefaultSensorStatus.RUNNING
    return dg.DefaultSensorStatus.STOPPED


def build_new_histories_sensor() -> dg.SensorDefinition:
    reconcile_after = timedelta(minutes=settings.load().discovery_reconcile_minutes)

    @dg.sensor(
        name="new_histories_sensor",
        job=discovery_job,
        minimum_interval_seconds=settings.load().discovery_sensor_interval_seconds,
        default_status=_default_status(),
        description="One primary-key probe per histories table; runs incremental "
        "discovery for exactly the partitions whose sessions got new rows.",
    )
    def new_histories_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.SensorResult | dg.SkipReason:
        # Cursor: the highest id already requested per crew, so rows a queued run
        # will read are not requested again.
        cursor: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
        with postgres.connection() as conn:
            work, problems = probe_new_work(conn, cursor, reconcile_after)
        for problem in problems:
            context.log.warning(f"cannot probe crew {problem}")
        if not work:
            return dg.SkipReason(f"no new rows in {len(cursor) or 'any'} crews' histories")
        days = set().union(*(item.days for item in work))
        fingerprint = hashlib.sha1(";".join(w.fingerprint for w in work).encode()).hexdigest()
        for item in work:
            cursor[item.crew_code] = item.max_id
        # Days outside the partitions (a created_at in the future) or unknown (rows
        # deleted): today's run still catches every crew up.
        keys = partition_keys_for(days) or [datetime.now(UTC).date().isoformat()]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{key}:{fingerprint[:16]}",
                    partition_key=key,
                    run_config=INCREMENTAL_RUN_CONFIG,
                    tags={"discovery/trigger": "sensor"},
                )
                for key in keys
            ],
            cursor=json.dumps(cursor, sort_keys=True),
        )

    return new_histories_sensor


new_histories_sensor = build_new_histories_sensor()

_ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def build_embedding_backlog_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="embedding_backlog_sensor",
        job=embedding_job,
        minimum_interval_seconds=settings.load().embedding_sensor_interval_seconds,
        default_status=_default_status(),
        description="Starts embedding_job when conversations wait for a vector and no "
        "embedding run is queued or running (one drain at a time).",
    )
    def embedding_backlog_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.RunRequest | dg.SkipReason:
        with postgres.connection() as conn:
            waiting = backlog_size(conn)
        if not waiting:
            return dg.SkipReason("no conversation waits for a vector")
        active = context.instance.get_run_records(
            filters=dg.RunsFilter(job_name=embedding_job.name, statuses=_ACTIVE_RUN_STATUSES),
            limit=1,
        )
        if active:
            return dg.SkipReason(f"{waiting} waiting; an embedding run is already under way")
        return dg.RunRequest(tags={"embedding/backlog": str(waiting)})

    return embedding_backlog_sensor


embedding_backlog_sensor = build_embedding_backlog_sensor()


def build_metrics_sensor() -> dg.SensorDefinition:
    first = datetime.combine(settings.load().discovery_partitions_start, time(), UTC)
    @dg.sensor(
        name="metrics_sensor",
        jobs=[metrics_job, performance_stats_job],
        minimum_interval_seconds=settings.load().metrics_sensor_interval_seconds,
        default_status=_default_status(),
        description="Refreshes the days of conversation_metrics and the past hours of "
        "performance_stats whose enriched rows changed (marked in the same transaction): "
        "one run over their span for each.",
    )
    def metrics_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.SensorResult | dg.SkipReason:
        now = datetime.now(UTC)
        this_hour = now.replace(minute=0, second=0, microsecond=0)
        with postgres.connection() as conn:
            stale = pending_dirty_periods(conn, before=now, limit=METRICS_PERIODS_PER_TICK)
        marks: dict[str, list[tuple[datetime, int]]] = {"day": [], "hour": []}
        for kind, start, version in stale:
            start = start.astimezone(UTC)
            if start >= first and not (kind == "hour" and start >= this_hour):
                marks[kind].append((start, version))  # else outside the partitions, or not over
        requests = []
        for kind, job, key_format in (
            ("day", metrics_job, "%Y-%m-%d"),
            ("hour", performance_stats_job, "%Y-%m-%d-%H:%M"),
        ):
            if not marks[kind]:
                continue
            # One run over the span of the stale periods: replacing a fresh period in
            # between costs little, and a burst of changes makes one run, not hundreds.
            keys = [start.strftime(key_format) for start, _ in marks[kind]]
            fingerprint = hashlib.sha1(
                ";".join(
                    f"{key}:{version}" for key, (_, version) in zip(keys, marks[kind], strict=True)
                ).encode()
            ).hexdigest()[:16]
            requests.append(
                dg.RunRequest(
                    job_name=job.name,
                    run_key=f"{kind}:{keys[0]}:{keys[-1]}:{fingerprint}",
                    tags={
                        "dagster/asset_partition_range_start": keys[0],
                        "dagster/asset_partition_range_end": keys[-1],
                        "metrics/stale_periods": str(len(keys)),
                    },
                )
            )
        if not requests:
            return dg.SkipReason("no day or hour has stale metrics")
        return dg.SensorResult(run_requests=requests)

    return metrics_sensor


metrics_sensor = build_metrics_sensor()
