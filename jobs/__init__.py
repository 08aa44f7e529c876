"""Jobs of the project."""

import dagster as dg

from conversation_assets.assets.conversations import conversations
from conversation_assets.assets.embeddings import conversation_embeddings
from conversation_assets.assets.search_indexes import conversation_search_indexes
from conversation_assets.assets.discovery import discovered_sessions
from conversation_assets.assets.enrichment import (
    conversation_metrics,
    enriched_conversations,
    performance_stats,
)

discovery_job = dg.define_asset_job(
    "discovery_job",
    selection=dg.AssetSelection.assets(discovered_sessions, conversations, enriched_conversations),
    description="Discover chat sessions, build their conversations and enrich them: "
    "incremental from the sensor and schedule, exact rebuild when launched for a "
    "partition or a backfill.",
)

metrics_job = dg.define_asset_job(
    "metrics_job",
    selection=dg.AssetSelection.assets(conversation_metrics),
    description="Replace days of conversation_metrics from the enriched conversations.",
)

performance_stats_job = dg.define_asset_job(
    "performance_stats_job",
    selection=dg.AssetSelection.assets(performance_stats),
    description="Replace hours of performance_stats (conversations and pipeline figures).",
)

embedding_job = dg.define_asset_job(
    "embedding_job",
    selection=dg.AssetSelection.assets(conversation_embeddings),
    description="Embed the conversations waiting for a vector (cache first, then the model).",
)

search_index_job = dg.define_asset_job(
    "search_index_job",
    selection=dg.AssetSelection.assets(conversation_search_indexes),
    description="Build (CONCURRENTLY) or drop the per-client HNSW indexes to match the "
    "clients' sizes.",
)

INCREMENTAL_RUN_CONFIG = dg.RunConfig(
    ops={
        "discovered_sessions": {"config": {"mode": "incremental"}},
        "conversations": {"config": {"mode": "incremental"}},
        "enriched_conversations": {"config": {"mode": "incremental"}},
    }
)
