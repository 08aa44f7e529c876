"""The ``conversation_search_indexes`` asset: an HNSW index of its own per large client."""

from typing import Any

import dagster as dg
from pydantic import Field

from conversation_assets.assets.embeddings import conversation_embeddings
from conversation_assets.search_indexes import (
    BUILD_MEMORY_MB,
    MAX_INDEXES,
    MIN_VECTORS,
    SearchIndexError,
    SearchIndexReport,
    sync_search_indexes,
)
from resources.postgres import PostgresResource


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
