"""The ``conversation_embeddings`` asset (a vector per changed text) and its check."""

from typing import Any

import dagster as dg
from pydantic import Field

from conversation_assets.assets.conversations import conversations
from conversation_assets.embedding import EmbedReport, backlog_size, embed_backlog
from conversation_assets.runs import record_pipeline_run
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource

EMBEDDING_BACKLOG_WARN = 10_000


class EmbeddingConfig(dg.Config):
    batch_size: int = Field(default=512, gt=0, description="Conversations per batch.")
    max_batches: int | None = Field(
        default=None, gt=0, description="Stop after this many batches (drain all if unset)."
    )
    max_input_chars: int = Field(
        default=8000, gt=0, description="Characters of a transcript sent to the model."
    )


def _embed_metadata(report: EmbedReport) -> dict[str, Any]:
    return {
        "model": report.model,
        "dimension": report.dimension,
        "embedded": report.embedded,
        "cache_hits": report.cache_hits,
        "texts_sent_to_model": report.texts_sent,
        "empty_texts": report.empty,
        "refused_texts": report.refused,
        "batches": report.batches,
        "requeued_for_model_change": report.requeued_for_model_change,
        "backlog_left": report.backlog_left,
        "embed_ms": round(report.embed_seconds * 1000, 1),
        "texts_per_second": round(report.texts_per_second),
        "duration_ms": round(report.seconds * 1000, 1),
        "skipped": report.skipped_reason or "",
    }


@dg.asset(
    deps=[conversations],
    pool="embedding_model",
    kinds={"postgres", "pgvector"},
    group_name="conversations",
)
def conversation_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingConfig,
    postgres: PostgresResource,
    embeddings: EmbeddingResource,
) -> dg.MaterializeResult:
    """Vectors for conversations whose text changed, from the embedding cache or the
    model, in batches until the backlog is empty; stored in conversations.embedding
    (HNSW-indexed for semantic search)."""
    report = embed_backlog(
        postgres.pool,
        embeddings,
        batch_size=config.batch_size,
        max_batches=config.max_batches,
        max_input_chars=config.max_input_chars,
        progress=context.log.info,
    )
    if report.refused:
        context.log.warning(
            f"the model refused {report.refused} texts (stored without a vector); "
            f"last: {report.last_refusal}"
        )
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset="conversation_embeddings",
        partition_key=None,
        duration_ms=report.seconds * 1000,
        items=report.embedded,
        batches=report.batches,
        model_ms=report.embed_seconds * 1000,
    )
    return dg.MaterializeResult(metadata=_embed_metadata(report))


@dg.asset_check(
    asset=conversation_embeddings,
    description=f"Fewer than {EMBEDDING_BACKLOG_WARN:,} conversations wait for a vector.",
)
def embedding_backlog_small(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.connection() as conn:
        waiting = backlog_size(conn)
    return dg.AssetCheckResult(
        passed=waiting < EMBEDDING_BACKLOG_WARN,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"backlog": waiting},
    )
