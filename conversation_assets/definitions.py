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
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource
from resources.summarizer import SummarizerResource
from schedules import (
    discovery_schedule,
    metrics_schedule,
    performance_stats_schedule,
    search_index_schedule,
)
from sensors import embedding_backlog_sensor, metrics_sensor, new_histories_sensor

postgres = PostgresResource(
    database_url=dg.EnvVar("DATABASE_URL"),
    pool_min_size=settings.env_int_or_default("PG_POOL_MIN_SIZE"),
    pool_max_size=settings.env_int_or_default("PG_POOL_MAX_SIZE"),
    pool_max_lifetime_seconds=settings.env_int_or_default("PG_POOL_MAX_LIFETIME_SECONDS"),
    statement_timeout_ms=settings.env_int_or_default("PG_STATEMENT_TIMEOUT_MS"),
    idle_in_transaction_timeout_ms=settings.env_int_or_default("PG_IDLE_IN_TRANSACTION_TIMEOUT_MS"),
    application_name=settings.env_or_default("PG_APPLICATION_NAME"),
)

embeddings = EmbeddingResource(
    backend=settings.env_or_default("EMBEDDING_BACKEND"),
    model=settings.env_or_none("EMBEDDING_MODEL"),
    base_url=settings.env_or_none("EMBEDDING_BASE_URL"),
    api_key=settings.env_or_none("EMBEDDING_API_KEY"),
)

summarizer = SummarizerResource(
    backend=settings.env_or_default("SUMMARIZER_BACKEND"),
    model=settings.env_or_none("SUMMARIZER_MODEL"),
    base_url=settings.env_or_none("SUMMARIZER_BASE_URL"),
    api_key=settings.env_or_none("SUMMARIZER_API_KEY"),
)

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
    jobs=[discovery_job, embedding_job, metrics_job, performance_stats_job, search_index_job],
    schedules=[
        discovery_schedule,
        metrics_schedule,
        performance_stats_schedule,
        search_index_schedule,
    ],
    sensors=[new_histories_sensor, embedding_backlog_sensor, metrics_sensor],
    resources={"postgres": postgres, "embeddings": embeddings, "summarizer": summarizer},
)
