"""The ``conversations`` asset (transcript, summary, metadata per session) and its check."""

import warnings
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from conversation_assets.assets.discovery import discovered_sessions
from conversation_assets.conversations import BuildReport, build_conversations
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
from resources.summarizer import SummarizerResource

warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)


# The run's own figures (a run over several partitions keeps them in run_totals).
RUN_FIGURES = [
    "sessions",
    "inserted",
    "updated",
    "unchanged",
    "soft_deleted",
    "rejected",
    "sessions_without_messages",
    "batches",
    "queue_left",
    "read_ms",
    "build_ms",
    "write_ms",
    "rows_written_per_second",
    "duration_ms",
]


class ConversationsConfig(dg.Config):
    mode: Literal["incremental", "full"] = Field(
        default="full",
        description="full: rebuild every session filed under the partition(s) (what a "
        "backfill wants; unchanged rows are not rewritten). incremental: build the "
        "sessions discovery queued as changed, whatever their day (sensor and schedule).",
    )
    batch_sessions: int = Field(
        default=1000, gt=0, description="Sessions read, built and written per transaction."
    )
    max_batches: int | None = Field(
        default=None, gt=0, description="Incremental: stop after this many batches (all if unset)."
    )


def _build_metadata(report: BuildReport) -> dict[str, Any]:
    written = report.written
    write_rate = (
        (written.inserted + written.updated + written.unchanged) / report.write_seconds
        if report.write_seconds
        else 0.0
    )
    return {
        "mode": report.mode,
        "sessions": report.sessions,
        "inserted": written.inserted,
        "updated": written.updated,
        "unchanged": written.unchanged,
        "soft_deleted": report.soft_deleted,
        "rejected": written.rejected,
        "reject_reasons": dg.MetadataValue.json(report.reject_reasons),
        "sessions_without_messages": report.without_messages,
        "crew_errors": dg.MetadataValue.json(report.crew_errors),
        "summarizer_errors": dg.MetadataValue.json(report.summarizer_errors),
        "batches": report.batches,
        "queue_left": report.queue_left,
        "read_ms": round(report.read_seconds * 1000, 1),
        "build_ms": round(report.build_seconds * 1000, 1),
        "write_ms": round(report.write_seconds * 1000, 1),
        "rows_written_per_second": round(write_rate),
        "duration_ms": round(report.seconds * 1000, 1),
        "touched_partitions": dg.MetadataValue.json(partition_keys_for(report.touched_days)),
    }


@dg.asset(
    partitions_def=daily_partitions,
    deps=[discovered_sessions],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="conversation_db",
    kinds={"postgres"},
    group_name="conversations",
)
def conversations(
    context: dg.AssetExecutionContext,
    config: ConversationsConfig,
    postgres: PostgresResource,
    summarizer: SummarizerResource,
) -> dg.MaterializeResult:
    """One row per discovered session: transcript, summary, metadata (sentiment,
    language, counts), soft-deleted when the session's rows are gone.

    Filed by the UTC day the session started. Embeddings come from
    ``conversation_embeddings`` so a slow model never holds this step.
    """
    window = context.partition_time_window
    since = database_now(postgres.pool)
    use_llm = summarizer.backend != "extractive"
    report = build_conversations(
        postgres.pool,
        mode=config.mode,
        window=(window.start, window.end),
        batch_sessions=config.batch_sessions,
        max_batches=config.max_batches,
        summarize=summarizer.summarize if use_llm else None,
        summarizer_name=summarizer.name,
        progress=context.log.info,
    )
    for crew_code, error in report.crew_errors.items():
        context.log.error(f"crew {crew_code}: {error}")
    for reject in report.written.rejects[:20]:
        context.log.warning(f"rejected {reject.record_key}: {reject.reason}")
    if report.crew_errors and report.batches == 0:
        raise dg.Failure(
            description="conversations could not be built for any crew",
            metadata={"crew_errors": dg.MetadataValue.json(report.crew_errors)},
        )
    announce_other_partitions(context, report.touched_days, "conversations", config.mode)
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset="conversations",
        partition_key=context.partition_key_range.start,
        duration_ms=report.seconds * 1000,
        items=report.sessions,
        batches=report.batches,
    )
    metadata = _build_metadata(report)
    metadata["summarizer"] = summarizer.name
    return dg.MaterializeResult(
        metadata=split_for_partitions(
            context,
            metadata,
            RUN_FIGURES,
            pool=postgres.pool,
            block="conversations_by_day",
            since=since,
        )
    )


@dg.asset_check(
    asset=conversations,
    description="Every live discovered session has a live conversation with its message "
    "count, unless it is still queued to be built.",
)
def conversations_match_sessions(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        row = conn.execute(query("conversations_vs_sessions")).fetchone()
    missing, stale, orphaned, examples = row if row else (0, 0, 0, [])
    return dg.AssetCheckResult(
        passed=missing == 0 and stale == 0 and orphaned == 0,
        metadata={
            "sessions_without_conversation": missing,
            "conversations_with_other_counts": stale,
            "live_conversations_of_deleted_sessions": orphaned,
            "examples": dg.MetadataValue.json(examples or []),
        },
    )
