"""Jobs of the project."""

import dagster as dg

from conversation_assets.assets.discovery import discovered_sessions

discovery_job = dg.define_asset_job(
    "discovery_job",
    selection=dg.AssetSelection.assets(discovered_sessions),
    description="Discover chat sessions: incremental from the sensor and schedule, "
    "exact recompute when launched for a partition or a backfill.",
)

INCREMENTAL_RUN_CONFIG = dg.RunConfig(
    ops={"discovered_sessions": {"config": {"mode": "incremental"}}}
)
