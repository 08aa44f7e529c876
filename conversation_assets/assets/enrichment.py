"""``enriched_conversations``, ``conversation_metrics`` and ``performance_stats``."""

import warnings
from datetime import datetime
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from conversation_assets.assets.conversations import conversations
from conversation_assets.enrichment import (
    EXCERPT_CHARS,
    ReplaceReport,
    enrich,
    metrics_vs_recount,
    refresh_metrics,
    refresh_performance,
)
from conversation_assets.partition_figures import (
    database_now,
    split_for_partitions,
)
from conversation_assets.partitions import (
    announce_other_partitions,
    daily_partitions,
    hourly_partitions,
    partition_keys_for,
)
from conversation_assets.queries import query
from conversation_assets.runs import record_pipeline_run
from resources.postgres import PostgresResource

warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)


# The run's own figures (a run over several partitions keeps them in run_totals).
ENRICHED_RUN_FIGURES = [
    "conversations_compared",
    "written",
    "removed",
    "queued_for_user_insights",
    "queued_for_tickets",
    "batches",
    "queue_left",
    "duration_ms",
]


class EnrichmentConfig(dg.Config):
    mode: Literal["incremental", "full"] = Field(
        default="full",
        description="full: compare every conversation filed under the partition(s) and "
        "rewrite only what changed (what a backfill wants). incremental: the queued "
        "conversations of any day, plus those whose user insights or ticket changed "
        "(sensor and schedule).",
    )
    batch_size: int = Field(default=5000, gt=0, description="Conversations per transaction.")
    max_batches: int | None = Field(
        default=None, gt=0, description="Incremental: stop after this many batches (all if unset)."
    )
    excerpt_chars: int = Field(
        default=EXCERPT_CHARS,
        gt=0,
        description="Characters of the transcript's end kept as the latest messages.",
    )
    workers: int = Field(
        default=2,
        gt=0,
        description="Connections a large batch is split over (one transaction each); "
        "more than the database's cores gains nothing.",
    )


@dg.asset(
    partitions_def=daily_partitions,
    deps=[conversations],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="conversation_db",
    kinds={"postgres"},
    group_name="enrichment",
)
def enriched_conversations(
    context: dg.AssetExecutionContext, config: EnrichmentConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    """One row per live conversation with its message aggregates, a bounded excerpt
    of the latest messages, the user's insights and the linked ticket.

    Only conversations whose inputs changed are rewritten, in set-based batches;
    readers see the old row or the new one, never a lock.
    """
    window = context.partition_time_window
    since = database_now(postgres.pool)
    report = enrich(
        postgres.pool,
        mode=config.mode,
        window=(window.start, window.end),
        batch_size=config.batch_size,
        max_batches=config.max_batches,
        excerpt_chars=config.excerpt_chars,
        workers=config.workers,
        progress=context.log.info,
    )
    if report.skipped_reason:
        context.log.info(f"skipped: {report.skipped_reason}")
    for name in report.missing_tables:
        context.log.warning(
            f"table {name} does not exist: its columns stay empty until the product creates it"
        )
    announce_other_partitions(context, report.touched_days, "enriched rows", config.mode)
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset="enriched_conversations",
        partition_key=context.partition_key_range.start,
        duration_ms=report.seconds * 1000,
        items=report.written + report.removed,
        batches=report.batches,
    )
    return dg.MaterializeResult(
        metadata=split_for_partitions(
            context,
            {
                "mode": report.mode,
                "conversations_compared": report.conversations,
                "written": report.written,
                "removed": report.removed,
                "queued_for_user_insights": report.queued_for_insights,
                "queued_for_tickets": report.queued_for_tickets,
                "batches": report.batches,
                "queue_left": report.queue_left,
                "missing_tables": dg.MetadataValue.json(report.missing_tables),
                "skipped": report.skipped_reason or "",
                "touched_partitions": dg.MetadataValue.json(
                    partition_keys_for(report.touched_days)
                ),
                "duration_ms": round(report.seconds * 1000, 1),
            },
            ENRICHED_RUN_FIGURES,
            pool=postgres.pool,
            block="enriched_by_day",
            since=since,
        )
    )


@dg.asset_check(
    asset=enriched_conversations,
    description="Exactly one enriched row per live conversation, unless it is still queued.",
)
def enriched_matches_conversations(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        row = conn.execute(query("enriched_vs_conversations")).fetchone()
    missing, orphaned, queued, missing_examples, orphaned_examples = row or (0, 0, 0, [], [])
    return dg.AssetCheckResult(
        passed=missing == 0 and orphaned == 0,
        metadata={
            "live_conversations_without_row": missing,
            "rows_without_live_conversation": orphaned,
            "queued": queued,
            "examples_missing": dg.MetadataValue.json(missing_examples),
            "examples_orphaned": dg.MetadataValue.json(orphaned_examples),
        },
    )


@dg.asset(
    partitions_def=daily_partitions,
    deps=[enriched_conversations],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="conversation_db",
    kinds={"postgres"},
    group_name="enrichment",
    check_specs=[
        dg.AssetCheckSpec(
            "totals_match_recount",
            asset="conversation_metrics",
            description="The refreshed days' conversations and messages per client, "
            "channel and status equal a recount from conversations.",
        )
    ],
)
def conversation_metrics(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Per client, UTC day, channel and status: conversations, messages, average and
    p95 duration, with embeddings, handed off, average sentiment. A refresh replaces
    exactly its days in one transaction."""
    window = context.partition_time_window
    since = database_now(postgres.pool)
    replaced = refresh_metrics(postgres.pool, (window.start, window.end))
    with postgres.connection() as conn:
        recount = metrics_vs_recount(conn, (window.start, window.end))
    if recount.mismatches:
        context.log.error(
            f"{recount.mismatches} metrics rows differ from a recount: {recount.examples[:3]}"
        )
    return dg.MaterializeResult(
        metadata=_replaced(
            context, postgres, "conversation_metrics", replaced, "rows", "metrics_by_day", since
        ),
        check_results=[
            dg.AssetCheckResult(
                check_name="totals_match_recount",
                passed=recount.mismatches == 0,
                metadata={
                    "mismatched_rows": recount.mismatches,
                    "conversations_recounted": recount.conversations,
                    "examples": dg.MetadataValue.json(recount.examples),
                },
            )
        ],
    )


@dg.asset(
    partitions_def=hourly_partitions,
    deps=[conversations],
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="conversation_db",
    kinds={"postgres"},
    group_name="enrichment",
)
def performance_stats(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Per UTC hour: conversations started (in all and per client) and the pipeline's
    own figures from ``pipeline_runs`` (discovery duration, rows scanned, batch sizes,
    embedding time). A refresh replaces exactly its hours."""
    window = context.partition_time_window
    replaced = refresh_performance(postgres.pool, (window.start, window.end))
    return dg.MaterializeResult(
        metadata=_replaced(
            context, postgres, "performance_stats", replaced, "hours", "performance_by_hour"
        )
    )


def _replaced(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    asset: str,
    replaced: ReplaceReport,
    unit: str,
    block: str,
    since: datetime | None = None,
) -> dict[str, Any]:
    """A table refreshed by replacing its periods: the run recorded, and its metadata
    (`unit`: what a row is), split per partition in a range run."""
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset=asset,
        partition_key=context.partition_key_range.start,
        duration_ms=replaced.seconds * 1000,
        items=replaced.rows,
    )
    return split_for_partitions(
        context,
        {unit: replaced.rows, "duration_ms": round(replaced.seconds * 1000, 1)},
        [unit, "duration_ms"],
        pool=postgres.pool,
        block=block,
        since=since,
    )
