"""The ``discovered_sessions`` asset and its checks."""

import warnings
from datetime import timedelta
from typing import Any, Literal

import dagster as dg
import psycopg
from pydantic import Field

from conversation_assets import settings
from conversation_assets.discovery import (
    CrewOutcome,
    CrewSourceError,
    DiscoveryReport,
    discover,
    load_crews,
    recount_sessions,
)
from conversation_assets.partition_figures import (
    database_now,
    split_for_partitions,
)
from conversation_assets.partitions import (
    announce_other_partitions,
    daily_partitions,
    partition_keys_for,
)
from conversation_assets.queries import query
from conversation_assets.runs import record_pipeline_run
from resources.postgres import PostgresResource

RECOUNT_SAMPLE_PER_CREW = 25
# The run's own figures: a run over several partitions keeps them in run_totals, and
# each partition gets its day's sessions (partition_figures.split_for_partitions).
RUN_FIGURES = [
    "rows_scanned",
    "rejected_rows",
    "sessions_new",
    "sessions_updated",
    "sessions_deleted",
    "duration_ms",
]


class DiscoveryConfig(dg.Config):
    mode: Literal["incremental", "full"] = Field(
        default="full",
        description=(
            "full: catch up, then recompute the partition's sessions exactly from the "
            "source (what a backfill wants). incremental: only read rows past each "
            "crew's watermark (what the sensor and the schedule launch)."
        ),
    )
    crews: list[str] = Field(
        default_factory=list, description="Only these crew codes (every enabled crew if empty)."
    )
    batch_rows: int = Field(default=200_000, gt=0, description="Source rows read per transaction.")
    reconcile_minutes: int = Field(
        default_factory=lambda: settings.load().discovery_reconcile_minutes,
        ge=0,
        description="Recompute a crew whose table lost rows at most this often "
        "(DISCOVERY_RECONCILE_MINUTES); 0: on the next run.",
    )


def _crew_metadata(outcome: CrewOutcome) -> dict[str, object]:
    figures = outcome.figures
    return {
        "client": outcome.client_code,
        "table": outcome.histories_table,
        "rows_scanned": figures.rows_scanned,
        "rejected_rows": figures.rejected_rows,
        "sessions_new": figures.sessions_new,
        "sessions_updated": figures.sessions_updated,
        "sessions_deleted": figures.sessions_deleted,
        "watermark_before": outcome.watermark_before,
        "watermark_after": outcome.watermark_after,
        "pending_ids": outcome.pending_after,
        "recomputed": outcome.reconciled,
        "ms": round(outcome.seconds * 1000, 1),
    }


def _report_metadata(report: DiscoveryReport) -> dict[str, Any]:
    return {
        "rows_scanned": report.total("rows_scanned"),
        "rejected_rows": report.total("rejected_rows"),
        "sessions_new": report.total("sessions_new"),
        "sessions_updated": report.total("sessions_updated"),
        "sessions_deleted": report.total("sessions_deleted"),
        "crews_succeeded": len(report.succeeded),
        "crews_failed": len(report.failed),
        "crews_idle": len(report.idle_crews),
        "crew_errors": dg.MetadataValue.json(report.errors),
        "watermarks": dg.MetadataValue.json(
            {o.crew_code: [o.watermark_before, o.watermark_after] for o in report.succeeded}
        ),
        "crews": dg.MetadataValue.json({o.crew_code: _crew_metadata(o) for o in report.succeeded}),
        "index_advice": dg.MetadataValue.json([o.advice for o in report.succeeded if o.advice]),
        "touched_partitions": dg.MetadataValue.json(partition_keys_for(report.touched_days)),
        "duration_ms": round(report.seconds * 1000, 1),
    }


# BackfillPolicy is beta in Dagster 1.13. We rely on it deliberately (a backfill of
# any range is one run, so one scan of each table) and keep the load quiet.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)


# No freshness policy: an idle pipeline launches no run (nothing changed), so the time
# since the last materialization says nothing about its health. What does: a run in
# which every crew it worked on failed fails, and crews_discoverable fails with ERROR
# severity for a crew that failed its last DISCOVERY_CREW_FAILURE_RUNS runs (and a run
# in which every crew failed fails).
@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="conversation_db",
    kinds={"postgres"},
    group_name="discovery",
)
def discovered_sessions(
    context: dg.AssetExecutionContext, config: DiscoveryConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Chat sessions found in every crew's histories table, by the UTC day they started.

    Incremental runs read only rows past each crew's watermark and are exact under
    concurrent writers; full runs (backfills) recompute the partition's sessions from
    the source, soft-deleting those whose rows are gone.
    """
    window = context.partition_time_window
    since = database_now(postgres.pool)
    report = discover(
        postgres.pool,
        mode=config.mode,
        window=(window.start, window.end),
        crew_codes=config.crews or None,
        batch_rows=config.batch_rows,
        reconcile_after=timedelta(minutes=config.reconcile_minutes),
        progress=context.log.info,
    )
    for outcome in report.failed:
        context.log.error(outcome.error)
    # Every crew failed: the run fails. One broken crew beside healthy ones (idle or
    # not) leaves the run green so that its checks run: crews_discoverable turns to
    # ERROR once the crew failed its last DISCOVERY_CREW_FAILURE_RUNS runs.
    if report.failed and not report.succeeded and not report.idle_crews:
        raise dg.Failure(
            description=f"discovery failed for every crew ({len(report.failed)}): "
            + "; ".join(report.errors.values()),
            metadata={"crew_errors": dg.MetadataValue.json(report.errors)},
        )
    metadata = _report_metadata(report)
    metadata["pool"] = dg.MetadataValue.json(postgres.pool_stats())
    announce_other_partitions(context, report.touched_days, "sessions", config.mode)
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset="discovered_sessions",
        partition_key=context.partition_key_range.start,
        duration_ms=report.seconds * 1000,
        rows_scanned=report.total("rows_scanned"),
        items=sum(report.total(f"sessions_{kind}") for kind in ("new", "updated", "deleted")),
    )
    return dg.MaterializeResult(
        metadata=split_for_partitions(
            context,
            {"mode": config.mode, **metadata},
            RUN_FIGURES,
            pool=postgres.pool,
            block="discovered_sessions_by_day",
            since=since,
        )
    )


def _crew_problem(crew_code: str, error: Exception) -> str:
    """A crew's failure as one line for a check's metadata (never raised)."""
    message = str(error).strip() or type(error).__name__
    return message if isinstance(error, CrewSourceError) else f"crew {crew_code!r}: {message}"


@dg.asset_check(asset=discovered_sessions, description="Recount sampled sessions from the source.")
def discovered_sessions_match_source(postgres: PostgresResource) -> dg.AssetCheckResult:
    """Recompute a random sample of each crew's sessions exactly, in a transaction
    that is rolled back: any session the recompute would change is a difference.

    A crew whose table cannot be read is a finding (failed, crew and reason in
    ``crew_errors``), not an exception: the other crews are still checked, and the
    run that launched the check stays green."""
    differences: dict[str, list[str]] = {}
    crew_errors: dict[str, str] = {}
    sampled = 0
    try:
        with postgres.connection() as conn:
            crews = load_crews(conn)
    except psycopg.Error as error:
        crews, crew_errors["*"] = [], f"the crews could not be listed: {error}".strip()
    for crew in crews:
        try:
            with postgres.connection() as conn:
                sample = [
                    row[0]
                    for row in conn.execute(
                        query("sample_sessions"),
                        {"crew_code": crew.crew_code, "sample_size": RECOUNT_SAMPLE_PER_CREW},
                    )
                ]
                changed = recount_sessions(conn, crew, sample) if sample else []
        except (CrewSourceError, psycopg.Error) as error:
            crew_errors[crew.crew_code] = _crew_problem(crew.crew_code, error)
            continue
        sampled += len(sample)
        if changed:
            differences[crew.crew_code] = changed
    return dg.AssetCheckResult(
        passed=not differences and not crew_errors,
        metadata={
            "sessions_sampled": sampled,
            "sessions_differing": sum(len(v) for v in differences.values()),
            "differences": dg.MetadataValue.json(differences),
            "crew_errors": dg.MetadataValue.json(crew_errors),
        },
    )


@dg.asset_check(
    asset=discovered_sessions,
    description="Every enabled crew's table is readable: fails (ERROR) for a crew whose last "
    "DISCOVERY_CREW_FAILURE_RUNS discovery runs failed, warns for one that failed fewer.",
    blocking=False,
)
def crews_discoverable(postgres: PostgresResource) -> dg.AssetCheckResult:
    """Each failing crew with its last error and how many runs in a row it failed;
    reports, never raises. One successful run of the crew clears it."""
    threshold = settings.load().discovery_crew_failure_runs
    try:
        with postgres.connection() as conn:
            rows = conn.execute(query("crew_failure_streaks")).fetchall()
    except psycopg.Error as error:
        rows = [("*", threshold, f"the crews' status could not be read: {error}".strip())]
    broken = {crew: error for crew, streak, error in rows if streak >= threshold}
    severity = dg.AssetCheckSeverity.ERROR if broken else dg.AssetCheckSeverity.WARN
    description = None
    if broken:
        description = "; ".join(
            f"crew {crew} failed its last {streak} discovery runs: {error}"
            for crew, streak, error in rows
            if crew in broken
        )
    return dg.AssetCheckResult(
        passed=not rows,
        severity=severity,
        description=description,
        metadata={
            "crew_errors": dg.MetadataValue.json({crew: error for crew, _, error in rows}),
            "consecutive_failures": dg.MetadataValue.json({crew: n for crew, n, _ in rows}),
            "failing_crews_over_threshold": dg.MetadataValue.json(sorted(broken)),
            "threshold_runs": threshold,
        },
    )
