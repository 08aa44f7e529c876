"""Everything Dagster loads: assets, checks, jobs, schedules, sensors, resources."""

import dagster as dg

from conversation_assets import settings
from conversation_assets.assets.discovery import (
    crews_discoverable,
    discovered_sessions,
    discovered_sessions_match_source,
)
from jobs import discovery_job
from resources.postgres import PostgresResource
from schedules import discovery_schedule
from sensors import new_histories_sensor

postgres = PostgresResource(
    database_url=dg.EnvVar("DATABASE_URL"),
    pool_min_size=settings.env_int_or_default("PG_POOL_MIN_SIZE"),
    pool_max_size=settings.env_int_or_default("PG_POOL_MAX_SIZE"),
    pool_max_lifetime_seconds=settings.env_int_or_default("PG_POOL_MAX_LIFETIME_SECONDS"),
    statement_timeout_ms=settings.env_int_or_default("PG_STATEMENT_TIMEOUT_MS"),
    idle_in_transaction_timeout_ms=settings.env_int_or_default("PG_IDLE_IN_TRANSACTION_TIMEOUT_MS"),
    application_name=settings.env_or_default("PG_APPLICATION_NAME"),
)

defs = dg.Definitions(
    assets=[discovered_sessions],
    asset_checks=[discovered_sessions_match_source, crews_discoverable],
    jobs=[discovery_job],
    schedules=[discovery_schedule],
    sensors=[new_histories_sensor],
    resources={"postgres": postgres},
)
