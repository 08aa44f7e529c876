"""Everything Dagster loads: assets, checks, jobs, schedules, sensors, resources."""

import dagster as dg

from conversation_assets import settings
from conversation_assets.assets.conversations import conversations, conversations_match_sessions
from conversation_assets.assets.discovery import (
    crews_discoverable,
    discovered_sessions,
    discovered_sessions_match_source,
)
from conversation_assets.assets.embeddings import conversation_embeddings, embedding_backlog_small
from conversation_assets.assets.enrichment import (
    conversation_metrics,
    enriched_conversations,
    enriched_matches_conversations,
    performance_stats,
)
from conversation_assets.assets.search_indexes import conversation_search_indexes
from jobs import (
    discovery_job,
    embedding_job,
    metrics_job,
    performance_stats_job,
    search_index_job,
)
from resources import embedding_resource, postgres_resource, summarizer_resource
from schedules import (
    discovery_schedule,
    metrics_schedule,
    performance_stats_schedule,
    search_index_schedule,
)
from sensors import embedding_backlog_sensor, metrics_sensor, new_histories_sensor

current = settings.load()


defs = dg.Definitions(
    assets=[
        discovered_sessions,
        conversations,
        conversation_embeddings,
        conversation_search_indexes,
        enriched_conversations,
        conversation_metrics,
        performance_stats,
    ],
    asset_checks=[
        discovered_sessions_match_source,
        crews_discoverable,
        conversations_match_sessions,
        embedding_backlog_small,
        enriched_matches_conversations,
    ],
    jobs=[
        discovery_job,
        embedding_job,
        metrics_job,
        performance_stats_job,
        search_index_job,
    ],
    schedules=[
        discovery_schedule,
        metrics_schedule,
        performance_stats_schedule,
        search_index_schedule,
    ],
    sensors=[
        new_histories_sensor,
        embedding_backlog_sensor,
        metrics_sensor,
    ],
    resources={
        "postgres": postgres_resource(current),
        "embeddings": embedding_resource(current, for_dagster=True),
        "summarizer": summarizer_resource(current, for_dagster=True),
    },
)
