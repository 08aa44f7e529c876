"""The ``conversations``, ``conversation_embeddings`` and ``conversation_search_indexes``
assets and their checks."""

import warnings
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from conversation_assets.assets.discovery import (
    announce_other_partitions,
    discovered_sessions,
    partition_keys_for,
)
from conversation_assets.conversations import BuildReport, build_conversations
from conversation_assets.embedding import EmbedReport, backlog_size, embed_backlog
from conversation_assets.enrichment import record_pipeline_run
from conversation_assets.partitions import daily_partitions
from conversation_assets.queries import query
from conversation_assets.search_indexes import (
    BUILD_MEMORY_MB,
    MAX_INDEXES,
    MIN_VECTORS,
    SearchIndexError,
    SearchIndexReport,
    sync_search_indexes,
)
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource
from resources.summarizer import SummarizerResource

warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

EMBEDDING_BACKLOG_WARN = 10_000


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
    return dg.MaterializeResult(metadata=metadata)


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


class SearchIndexConfig(dg.Config):
    min_vectors: int = Field(
        default=MIN_VECTORS,
        ge=1,
        description="A client with this many live vectors gets an HNSW index of its own; "
        "under it, its index is dropped (reads.EXACT_BELOW ranks such a client exactly).",
    )
    max_indexes: int = Field(
        default=MAX_INDEXES, ge=0, description="At most this many, for the largest clients."
    )
    build_memory_mb: int = Field(
        default=BUILD_MEMORY_MB,
        ge=64,
        description="Most maintenance_work_mem given to one build (about 3 KB a 256-d "
        "vector holds the whole graph in memory; a larger graph builds slower on disk).",
    )


def _search_index_metadata(report: SearchIndexReport) -> dict[str, Any]:
    covered = report.vectors_covered / report.vectors_total if report.vectors_total else 0.0
    return {
        "built_for_clients": dg.MetadataValue.json(report.built),
        "dropped_indexes": dg.MetadataValue.json(report.dropped),
        "failed_builds": dg.MetadataValue.json(report.failed),
        "client_indexes": report.indexes,
        "vectors_in_client_indexes": report.vectors_covered,
        "live_vectors": report.vectors_total,
        "share_in_client_indexes": round(covered, 4),
        "index_mb": round(report.index_bytes / 2**20, 1),
        "duration_ms": round(report.seconds * 1000, 1),
    }


@dg.asset(
    deps=[conversation_embeddings],
    kinds={"postgres", "pgvector"},
    group_name="conversations",
)
def conversation_search_indexes(
    context: dg.AssetExecutionContext, config: SearchIndexConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    """One HNSW index per large client (predicate ``client_code = <client>``), built
    CONCURRENTLY: a client's semantic search then walks its own vectors only, instead
    of filtering the shared graph (slow for a client with a small share of the rows)."""
    try:
        with postgres.connection() as conn:
            report = sync_search_indexes(
                conn,
                min_vectors=config.min_vectors,
                max_indexes=config.max_indexes,
                build_memory_mb=config.build_memory_mb,
                progress=context.log.info,
            )
    except SearchIndexError as error:
        raise dg.Failure(
            description=str(error), metadata=_search_index_metadata(error.report)
        ) from error
    if report.skipped_reason:
        # Nothing was done: not a materialization (the run that holds the lock makes one).
        raise dg.Failure(description=f"skipped: {report.skipped_reason}")
    return dg.MaterializeResult(metadata=_search_index_metadata(report))
