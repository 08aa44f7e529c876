"""Jobs of the project."""

import dagster as dg

from conversation_assets.assets.conversations import conversation_embeddings, conversations
from conversation_assets.assets.discovery import discovered_sessions

discovery_job = dg.define_asset_job(
    "discovery_job",
    selection=dg.AssetSelection.assets(discovered_sessions, conversations),
    description="Discover chat sessions and build their conversations: incremental from "
    "the sensor and schedule, exact rebuild when launched for a partition or a backfill.",
)

embedding_job = dg.define_asset_job(
    "embedding_job",
    selection=dg.AssetSelection.assets(conversation_embeddings),
    description="Embed the conversations waiting for a vector (cache first, then the model).",
)

INCREMENTAL_RUN_CONFIG = dg.RunConfig(
    ops={
        "discovered_sessions": {"config": {"mode": "incremental"}},
        "conversations": {"config": {"mode": "incremental"}},
    }
)
