"""The project's Dagster resources, and the one place they are built from the settings."""

from __future__ import annotations

import dagster as dg

from conversation_assets import settings
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource
from resources.summarizer import SummarizerResource

__all__ = [
    "EmbeddingResource",
    "PostgresResource",
    "SummarizerResource",
    "embedding_resource",
    "postgres_resource",
    "summarizer_resource",
]


def _secret(current: settings.Settings, name: str, for_dagster: bool) -> str | None:
    """Dagster gets the variable's name (shown in the UI instead of the value)."""
    value = getattr(current, name.lower())
    if value is None or not for_dagster:
        return value
    return settings.secret(name)


def postgres_resource(current: settings.Settings) -> PostgresResource:
    return PostgresResource(
        # Always the variable: `scripts/dev` sets it for Dagster's processes, and a run
        # without it fails naming DATABASE_URL rather than connecting somewhere else.
        database_url=dg.EnvVar("DATABASE_URL"),
        pool_min_size=current.pg_pool_min_size,
        pool_max_size=current.pg_pool_max_size,
        pool_max_lifetime_seconds=current.pg_pool_max_lifetime_seconds,
        statement_timeout_ms=current.pg_statement_timeout_ms,
        idle_in_transaction_timeout_ms=current.pg_idle_in_transaction_timeout_ms,
        application_name=current.pg_application_name,
    )


def embedding_resource(current: settings.Settings, *, for_dagster: bool) -> EmbeddingResource:
    """`for_dagster=False`: secrets as values, for code that calls the resource directly."""
    return EmbeddingResource(
        backend=current.embedding_backend,
        model=current.embedding_model,
        base_url=current.embedding_base_url,
        api_key=_secret(current, "EMBEDDING_API_KEY", for_dagster),
    )


def summarizer_resource(current: settings.Settings, *, for_dagster: bool) -> SummarizerResource:
    return SummarizerResource(
        backend=current.summarizer_backend,
        model=current.summarizer_model,
        base_url=current.summarizer_base_url,
        api_key=_secret(current, "SUMMARIZER_API_KEY", for_dagster),
    )
