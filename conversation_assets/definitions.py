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
from conversation_assets.assets.inbox import inbox_oldest_item_fresh, pushed_conversations
from conversation_assets.assets.messenger import messenger_sync, messenger_transcripts
from conversation_assets.assets.search_indexes import conversation_search_indexes
from jobs import (
    discovery_job,
    embedding_job,
    enrichment_job,
    inbox_drain_job,
    messenger_sync_job,
    metrics_job,
    performance_stats_job,
    search_index_job,
)
from resources import embedding_resource, postgres_resource, summarizer_resource
from resources.messenger import messenger_resource
from schedules import (
    discovery_schedule,
    metrics_schedule,
    performance_stats_schedule,
    search_index_schedule,
)
from sensors import (
    alert_webhook_sensor,
    embedding_backlog_sensor,
    enrichment_queue_sensor,
    inbox_sensor,
    messenger_pages_sensor,
    messenger_sync_sensor,
    metrics_sensor,
    new_histories_sensor,
)

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
        pushed_conversations,
        messenger_sync,
        messenger_transcripts,
    ],
    asset_checks=[
        discovered_sessions_match_source,
        crews_discoverable,
        conversations_match_sessions,
        embedding_backlog_small,
        enriched_matches_conversations,
        inbox_oldest_item_fresh,
    ],
    jobs=[
        discovery_job,
        embedding_job,
        enrichment_job,
        metrics_job,
        performance_stats_job,
        search_index_job,
        inbox_drain_job,
        messenger_sync_job,
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
        enrichment_queue_sensor,
        metrics_sensor,
        inbox_sensor,
        alert_webhook_sensor,
        messenger_pages_sensor,
        messenger_sync_sensor,
    ],
    resources={
        "postgres": postgres_resource(current),
        "embeddings": embedding_resource(current, for_dagster=True),
        "summarizer": summarizer_resource(current, for_dagster=True),
        "messenger": messenger_resource(current, for_dagster=True),
    },
)
