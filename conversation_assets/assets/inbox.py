"""``pushed_conversations``: the inbox drained into ``conversations``, and its checks."""

from typing import Any

import dagster as dg
from pydantic import Field

from conversation_assets import monitoring, settings
from conversation_assets.inbox import DrainReport, drain, oldest_age
from conversation_assets.runs import record_pipeline_run
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource


class InboxDrainConfig(dg.Config):
    batch_size: int | None = Field(
        default=None, gt=0, description="Items per transaction (INBOX_BATCH_SIZE if unset)."
    )
    max_batches: int | None = Field(
        default=None, gt=0, description="Stop after this many batches (drain all if unset)."
    )
    workers: int = Field(
        default=2,
        gt=0,
        description="Connections draining side by side (disjoint items): one analyses and "
        "embeds while another waits on the database.",
    )
    max_attempts: int | None = Field(
        default=None,
        gt=0,
        description="Failures alone before an item moves to the rejects (INBOX_MAX_ATTEMPTS).",
    )


def _metadata(report: DrainReport) -> dict[str, Any]:
    return {
        "stored": report.stored,
        "rejected": report.rejected,
        "failed_attempts": report.failed_attempts,
        "batches": report.batches,
        "embedded": report.embedded,
        "cache_hits": report.cache_hits,
        "texts_sent_to_model": report.texts_sent,
        "refused_texts": report.refused,
        "embed_ms": round(report.embed_seconds * 1000, 1),
        "pending_left": report.pending_left,
        "conversations_per_second": round(report.per_second),
        "duration_ms": round(report.seconds * 1000, 1),
        "rejects": dg.MetadataValue.json(report.rejects[:20]),
    }


@dg.asset(
    pool="conversation_db",
    kinds={"postgres", "pgvector"},
    group_name="conversations",
)
def pushed_conversations(
    context: dg.AssetExecutionContext,
    config: InboxDrainConfig,
    postgres: PostgresResource,
    embeddings: EmbeddingResource,
) -> dg.MaterializeResult:
    """Conversations apps handed off with ``queue_conversation_storage``: taken from the
    inbox in batches (``FOR UPDATE SKIP LOCKED``), embedded (cache first) and stored in
    ``conversations`` in the transaction that removes them from the inbox."""
    current = settings.load()
    report = drain(
        postgres.pool,
        embeddings,
        batch_size=config.batch_size or current.inbox_batch_size,
        max_batches=config.max_batches,
        max_attempts=config.max_attempts or current.inbox_max_attempts,
        max_pending=current.inbox_max_pending,
        workers=config.workers,
        progress=context.log.info,
    )
    if report.refused:
        context.log.warning(f"the model refused {report.refused} texts: stored without a vector")
    for key, reason in report.rejects[:20]:
        context.log.warning(f"inbox item {key} moved to conversation_inbox_rejects: {reason}")
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset="pushed_conversations",
        partition_key=None,
        duration_ms=report.seconds * 1000,
        items=report.stored,
        batches=report.batches,
        model_ms=report.embed_seconds * 1000,
    )
    return dg.MaterializeResult(metadata=_metadata(report))


@dg.asset_check(
    asset=pushed_conversations,
    description="The inbox's oldest item waited less than INBOX_AGE_WARNING_SECONDS (an "
    "error past INBOX_AGE_CRITICAL_SECONDS); a failure calls ALERT_WEBHOOK_URL.",
)
def inbox_oldest_item_fresh(postgres: PostgresResource) -> dg.AssetCheckResult:
    current = settings.load()
    with postgres.connection() as conn:
        age, waiting = oldest_age(conn)
    passed = age is None or age < current.inbox_age_warning_seconds
    critical = age is not None and age >= current.inbox_age_critical_seconds
    metadata = {"oldest_age_seconds": round(age or 0.0, 1), "waiting": waiting}
    if not passed:
        monitoring.post_alert(
            current.alert_webhook_url,
            monitoring.describe_failure(
                "check",
                "inbox_oldest_item_fresh",
                f"the inbox's oldest item waited {age:,.0f} s ({waiting:,} waiting)",
            ),
        )
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR if critical else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )
