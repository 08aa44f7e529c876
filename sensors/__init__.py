"""Sensors of the project."""

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from conversation_assets import settings
from conversation_assets.discovery import probe_new_work
from conversation_assets.embedding import backlog_size
from conversation_assets.enrichment import pending_dirty_periods
from conversation_assets.inbox import has_items
from conversation_assets.partitions import daily_partitions, partition_keys_for
from conversation_assets.queries import query
from jobs import (
    INCREMENTAL_RUN_CONFIG,
    discovery_job,
    embedding_job,
    enrichment_job,
    inbox_drain_job,
    messenger_sync_job,
    metrics_job,
    performance_stats_job,
)
from resources.postgres import PostgresResource
from sensors.alerts import alert_webhook_sensor as alert_webhook_sensor  # re-exported
from sensors.common import ACTIVE, NOT_STARTED, backlog_sensor, default_status, runs
from sensors.messenger import build_messenger_pages_sensor, build_messenger_sync_sensor

METRICS_PERIODS_PER_TICK = 2000  # stale days and hours read per tick (the rest next tick)


DISCOVERY_TRIGGERS = {"discovery/trigger": ["sensor", "schedule"]}


def discovery_cursor(raw: str | None) -> tuple[dict[str, int], dict[str, str], str]:
    """(ids requested per crew, state requested per crew, digest of the crews last
    reported unreadable)."""
    data = json.loads(raw) if raw else {}
    if isinstance(data.get("seen"), dict):
        seen = {k: int(v) for k, v in data["seen"].items()}
        return seen, dict(data.get("requested", {})), str(data.get("problems", ""))
    return {k: int(v) for k, v in data.items()}, {}, ""  # an earlier cursor: ids only


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha1(";".join(parts).encode()).hexdigest()


def _span_request(keys: list[str], **request: Any) -> dg.RunRequest:
    """One run over the span of ``keys`` (sorted partition keys): a partition run for
    one key, a partition-range run for more (never one run per partition)."""
    tags = dict(request.pop("tags", {}))
    if len(keys) == 1:
        return dg.RunRequest(partition_key=keys[0], tags=tags, **request)
    tags.update(
        {
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
            "pipeline/partitions_affected": str(len(keys)),
        }
    )
    return dg.RunRequest(tags=tags, **request)


def build_new_histories_sensor() -> dg.SensorDefinition:
    reconcile_after = timedelta(minutes=settings.load().discovery_reconcile_minutes)

    @dg.sensor(
        name="new_histories_sensor",
        job=discovery_job,
        minimum_interval_seconds=settings.load().discovery_sensor_interval_seconds,
        default_status=default_status(),
        description="One primary-key probe per histories table; when a crew got new rows "
        "(or lost rows, when a recompute is due), launches one incremental discovery run "
        "over the span of the affected partitions, in one process.",
    )
    def new_histories_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.SensorResult:
        # Cursor: the highest id already requested per crew (rows a queued run will
        # read are not requested again), the state of each crew last requested (a
        # table that lost rows, or a crew never discovered, is requested once per
        # state: the run settles it; the schedule retries what a run could not), and a
        # digest of the crews that could not be probed (their warning is logged when
        # that set changes, not every tick).
        seen, requested, logged_problems = discovery_cursor(context.cursor)
        with postgres.connection() as conn:
            work, problems = probe_new_work(conn, seen, reconcile_after)
        problem_state = _digest(problems) if problems else ""
        if problem_state != logged_problems:
            for problem in problems:
                context.log.warning(f"cannot probe crew {problem}")
            if not problems:
                context.log.info("every crew's histories table can be probed again")

        def cursor() -> str:
            state = {"seen": seen, "requested": requested, "problems": problem_state}
            return json.dumps(state, sort_keys=True)

        work = [item for item in work if item.fingerprint != requested.get(item.crew_code)]

        if not work:
            return dg.SensorResult(
                skip_reason=f"no new rows in {len(seen) or 'any'} crews' histories",
                cursor=cursor(),
            )
        for item in work:
            seen[item.crew_code] = item.max_id
            requested[item.crew_code] = item.fingerprint
        waiting = runs(context, discovery_job, NOT_STARTED, DISCOVERY_TRIGGERS)
        if waiting:
            # That run reads every crew past its watermark when it starts.
            return dg.SensorResult(
                skip_reason=f"new rows in {len(work)} crews; run {waiting[0]} has not "
                "started yet and will read them",
                cursor=cursor(),
            )
        days = set().union(*(item.days for item in work))
        fingerprint = _digest(w.fingerprint for w in work)[:16]
        # Days outside the partitions (a created_at in the future) or unknown (rows
        # deleted): today's partition; the run catches every crew up whatever its days.
        keys = partition_keys_for(days) or [datetime.now(UTC).date().isoformat()]
        return dg.SensorResult(
            run_requests=[
                _span_request(
                    keys,
                    run_key=f"{keys[0]}:{keys[-1]}:{fingerprint}",
                    run_config=INCREMENTAL_RUN_CONFIG,
                    tags={"discovery/trigger": "sensor"},
                )
            ],
            cursor=cursor(),
        )

    return new_histories_sensor


new_histories_sensor = build_new_histories_sensor()


def build_embedding_backlog_sensor() -> dg.SensorDefinition:
    return backlog_sensor(
        name="embedding_backlog_sensor",
        job=embedding_job,
        interval_seconds=settings.load().embedding_sensor_interval_seconds,
        description="Starts embedding_job when conversations wait for a vector and no "
        "embedding run is queued or running (one drain at a time).",
        waiting=backlog_size,
        idle="no conversation waits for a vector",
        busy=lambda n: f"{n} waiting; an embedding run is already under way",
        tags=lambda n: {"embedding/backlog": str(n)},
    )


embedding_backlog_sensor = build_embedding_backlog_sensor()


def build_enrichment_queue_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="enrichment_queue_sensor",
        job=enrichment_job,
        minimum_interval_seconds=settings.load().enrichment_sensor_interval_seconds,
        default_status=default_status(),
        description="Refreshes enriched_conversations as soon as a conversation write waits "
        "in its queue (a vector from embedding_job, the product's own UPDATE), unless a "
        "discovery or enrichment run that will take the queue is already under way.",
    )
    def enrichment_queue_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.RunRequest | dg.SkipReason:
        with postgres.connection() as conn:
            row = conn.execute(query("enrichment_queue_waiting")).fetchone()
        if not (row and row[0]):
            return dg.SkipReason("no conversation write waits for enrichment")
        # A discovery run that has not reached its enrichment step takes the queue too.
        for job, statuses in (
            (enrichment_job, ACTIVE),
            (discovery_job, [*NOT_STARTED, dg.DagsterRunStatus.STARTING]),
        ):
            active = runs(context, job, statuses)
            if active:
                return dg.SkipReason(f"writes wait; run {active[0]} of {job.name} will take them")
        return dg.RunRequest(
            partition_key=datetime.now(UTC).date().isoformat(),
            tags={"enrichment/trigger": "sensor"},
        )

    return enrichment_queue_sensor


enrichment_queue_sensor = build_enrichment_queue_sensor()


def build_metrics_sensor() -> dg.SensorDefinition:
    first = daily_partitions.start

    @dg.sensor(
        name="metrics_sensor",
        jobs=[metrics_job, performance_stats_job],
        minimum_interval_seconds=settings.load().metrics_sensor_interval_seconds,
        default_status=default_status(),
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
            stale = pending_dirty_periods(
                conn, since=first, before=now, limit=METRICS_PERIODS_PER_TICK
            )
        marks: dict[str, list[tuple[datetime, str]]] = {"day": [], "hour": []}
        for kind, start, version in stale:
            start = start.astimezone(UTC)
            if not (kind == "hour" and start >= this_hour):
                marks[kind].append((start, version))  # else the hour is not over
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


def build_inbox_sensor() -> dg.SensorDefinition:
    return backlog_sensor(
        name="inbox_sensor",
        job=inbox_drain_job,
        interval_seconds=settings.load().inbox_sensor_interval_seconds,
        description="Starts inbox_drain_job when conversations wait in the inbox and no drain "
        "run is queued or running: at most one run per tick, none for an empty inbox.",
        waiting=has_items,  # one index probe
        idle="the inbox is empty",
        busy=lambda _n: "conversations wait in the inbox; a drain run is under way",
        tags=lambda _n: {"inbox/trigger": "sensor"},
    )


inbox_sensor = build_inbox_sensor()

messenger_pages_sensor = build_messenger_pages_sensor()
messenger_sync_sensor = build_messenger_sync_sensor(messenger_sync_job)
