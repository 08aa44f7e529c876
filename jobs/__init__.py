"""Jobs of the project."""

import dagster as dg

from conversation_assets.assets.conversations import conversations
from conversation_assets.assets.discovery import discovered_sessions
from conversation_assets.assets.embeddings import conversation_embeddings
from conversation_assets.assets.enrichment import (
    conversation_metrics,
    enriched_conversations,
    performance_stats,
)
from conversation_assets.assets.inbox import pushed_conversations
from conversation_assets.assets.messenger import messenger_sync, messenger_transcripts
from conversation_assets.assets.search_indexes import conversation_search_indexes

# Executors. A run's steps here form a chain (discovery -> conversations -> enrichment)
# or are a single step, so a process per step buys no parallelism; it costs each step
# and check a new process that loads Dagster and the project (seconds on 2 cores).
# - discovery_job keeps Dagster's default (multiprocess unless the run config says
#   otherwise) for what a user launches: a partition or a backfill, heavy and rare,
#   where each step in its own process frees its memory when it ends and its checks
#   run beside the next step. Its sensor and schedule runs, small and frequent, ask
#   for the in-process executor in their run config (INCREMENTAL_RUN_CONFIG).
# - every other job of the pipeline is one asset (and its checks): in process always.
# Each job's runs carry the tag LANE_TAG = the job's name: dagster.yaml lets one run
# per lane run at a time, so a burst of requests queues instead of loading the machine.
LANE_TAG = "conversation-pipeline/lane"


def _lane(name: str) -> dict[str, str]:
    return {LANE_TAG: name}


discovery_job = dg.define_asset_job(
    "discovery_job",
    selection=dg.AssetSelection.assets(discovered_sessions, conversations, enriched_conversations),
    description="Discover chat sessions, build their conversations and enrich them: "
    "incremental from the sensor and schedule (in one process), exact rebuild when "
    "launched for a partition or a backfill.",
    run_tags=_lane("discovery_job"),
)

enrichment_job = dg.define_asset_job(
    "enrichment_job",
    selection=dg.AssetSelection.assets(enriched_conversations),
    description="Incremental refresh of enriched_conversations from its queue, for writes "
    "no discovery run brings (a vector, the product's own UPDATE): started by "
    "enrichment_queue_sensor.",
    executor_def=dg.in_process_executor,
    config=dg.RunConfig(ops={"enriched_conversations": {"config": {"mode": "incremental"}}}),
    run_tags=_lane("enrichment_job"),
)

metrics_job = dg.define_asset_job(
    "metrics_job",
    selection=dg.AssetSelection.assets(conversation_metrics),
    description="Replace days of conversation_metrics from the enriched conversations.",
    executor_def=dg.in_process_executor,
    run_tags=_lane("metrics_job"),
)

performance_stats_job = dg.define_asset_job(
    "performance_stats_job",
    selection=dg.AssetSelection.assets(performance_stats),
    description="Replace hours of performance_stats (conversations and pipeline figures).",
    executor_def=dg.in_process_executor,
    run_tags=_lane("performance_stats_job"),
)

embedding_job = dg.define_asset_job(
    "embedding_job",
    selection=dg.AssetSelection.assets(conversation_embeddings),
    description="Embed the conversations waiting for a vector (cache first, then the model).",
    executor_def=dg.in_process_executor,
    run_tags=_lane("embedding_job"),
)

search_index_job = dg.define_asset_job(
    "search_index_job",
    selection=dg.AssetSelection.assets(conversation_search_indexes),
    description="Build (CONCURRENTLY) or drop the per-client HNSW indexes to match the "
    "clients' sizes.",
    executor_def=dg.in_process_executor,
    run_tags=_lane("search_index_job"),
)

inbox_drain_job = dg.define_asset_job(
    "inbox_drain_job",
    selection=dg.AssetSelection.assets(pushed_conversations),
    description="Store the conversations apps pushed (queue_conversation_storage): the inbox "
    "drained in batches, embedded and written through the usual write path.",
)

messenger_sync_job = dg.define_asset_job(
    "messenger_sync_job",
    selection=dg.AssetSelection.assets(messenger_sync, messenger_transcripts),
    description="Sync Messenger pages through the Graph API (messenger_conversations, "
    "contact_interaction_events) and write their threads into conversations: incremental "
    "from messenger_sync_sensor, full when launched for a page or a backfill.",
)

INCREMENTAL_RUN_CONFIG = dg.RunConfig(
    ops={
        "discovered_sessions": {"config": {"mode": "incremental"}},
        "conversations": {"config": {"mode": "incremental"}},
        "enriched_conversations": {"config": {"mode": "incremental"}},
    },
    # One process for the whole run: its steps take well under a second.
    execution={"config": {"in_process": {}}},
)
