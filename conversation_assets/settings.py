"""Every environment variable the project reads, with its default and meaning.

One table serves the resources (as ``dg.EnvVar`` when set, the default when not),
the schedule and sensor definitions, the dev launcher, and the README's
configuration table (a test keeps the README in step with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date

import dagster as dg


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "DATABASE_URL",
        "(embedded)",
        "PostgreSQL 14+ with the `vector` extension holding the histories and output "
        "tables. Unset: `conversation-pipeline dev` starts an embedded PostgreSQL 18 "
        "with pgvector in `.pgdata/`.",
    ),
    Setting(
        "CONVERSATION_DISCOVERY_CRON",
        "*/5 * * * *",
        "Cron expression (UTC) of `discovery_schedule`. An invalid value stops the "
        "definitions from loading with an error naming it.",
    ),
    Setting(
        "SEARCH_INDEX_CRON",
        "15 2 * * *",
        "Cron expression (UTC) of `search_index_schedule`, which gives each client with "
        "10,000 or more vectors an HNSW index of its own. Validated like the one above.",
    ),
    Setting(
        "ENABLE_BACKGROUND_JOBS",
        "true",
        "`false` leaves every schedule and sensor stopped by default (start them in "
        "the UI when you want them).",
    ),
    Setting(
        "METRICS_SENSOR_INTERVAL_SECONDS",
        "60",
        "How often `metrics_sensor` looks for days and hours whose metrics went stale.",
    ),
    Setting(
        "DISCOVERY_SENSOR_INTERVAL_SECONDS",
        "30",
        "How often `new_histories_sensor` probes the histories tables.",
    ),
    Setting(
        "DISCOVERY_PARTITIONS_START",
        "2025-01-01",
        "First day (UTC) of the daily partitions. Sessions that started earlier are "
        "still discovered, in no partition's backfill range.",
    ),
    Setting(
        "DISCOVERY_RECONCILE_MINUTES",
        "15",
        "A crew whose table lost or changed rows (an n8n `clear()`) is recomputed "
        "whole, one scan of its table, at most this often; `0`: on the next run. "
        "TRUNCATE and a crew moving client are always handled on the next run.",
    ),
    Setting(
        "EMBEDDED_PGDATA",
        ".pgdata",
        "Data directory of the embedded PostgreSQL (used when DATABASE_URL is unset); "
        "kept between runs.",
    ),
    Setting("PG_POOL_MIN_SIZE", "1", "Connections the pool keeps open."),
    Setting("PG_POOL_MAX_SIZE", "10", "Most connections the pool opens."),
    Setting(
        "PG_POOL_MAX_LIFETIME_SECONDS",
        "3600",
        "A pooled connection is replaced after this long (seed 001's maxUses).",
    ),
    Setting(
        "PG_STATEMENT_TIMEOUT_MS",
        "300000",
        "`statement_timeout` of every pooled connection: a stuck query is cancelled.",
    ),
    Setting(
        "PG_IDLE_IN_TRANSACTION_TIMEOUT_MS",
        "60000",
        "`idle_in_transaction_session_timeout`: a transaction left open is ended.",
    ),
    Setting(
        "PG_APPLICATION_NAME",
        "conversation-pipeline",
        "`application_name`, to find the pipeline's sessions in `pg_stat_activity`.",
    ),
    Setting(
        "EMBEDDING_BACKEND",
        "local",
        "`local` (WordLlama's 256-d model bundled in its wheel, offline), `ollama` "
        "(`/api/embed`) or `openai` (any OpenAI-compatible `/v1/embeddings`).",
    ),
    Setting(
        "EMBEDDING_MODEL",
        "(by backend)",
        "Embedding model: `l2_supercat_256`, `nomic-embed-text` or `text-embedding-3-small` "
        "by backend when unset.",
    ),
    Setting(
        "EMBEDDING_BASE_URL",
        "(by backend)",
        "Server root of an HTTP embedding backend (no `/api` or `/v1`): "
        "`http://127.0.0.1:11434` for ollama, `https://api.openai.com` for openai.",
    ),
    Setting("EMBEDDING_API_KEY", "(none)", "Bearer token of the openai backend."),
    Setting(
        "EMBEDDING_DIMENSION",
        "(from the model)",
        "Size N of `conversations.embedding vector(N)` when `migrate` creates it; unset: "
        "asked of the configured model. A later mismatch stops the embedding step before "
        "any write, printing the command that migrates the column.",
    ),
    Setting(
        "EMBEDDING_SENSOR_INTERVAL_SECONDS",
        "30",
        "How often `embedding_backlog_sensor` looks for conversations waiting for a vector.",
    ),
    Setting(
        "SUMMARIZER_BACKEND",
        "extractive",
        "`extractive` (deterministic, no network), or an LLM through `ollama` "
        "(`/api/chat`) or `openai` (`/v1/chat/completions`).",
    ),
    Setting(
        "SUMMARIZER_MODEL",
        "(by backend)",
        "LLM for summaries: `llama3.2` (ollama) or `gpt-4o-mini` (openai) when unset.",
    ),
    Setting("SUMMARIZER_BASE_URL", "(by backend)", "Server root of the LLM summarizer."),
    Setting("SUMMARIZER_API_KEY", "(none)", "Bearer token of the openai summarizer."),
    Setting(
        "DAGSTER_PG_URL",
        "(set by dev)",
        "Dagster's own run/event/schedule storage. Must be `postgresql+psycopg2://...`. "
        "`conversation-pipeline dev` points it at the same server as DATABASE_URL.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def raw(name: str) -> str:
    """The value in force: the environment's, else the table's default."""
    value = os.environ.get(name, "").strip()
    return value or _BY_NAME[name].default


def env_or_default(name: str) -> str | dg.EnvVar:
    """For resource fields: a ``dg.EnvVar`` (resolved at run time) when set."""
    return dg.EnvVar(name) if os.environ.get(name, "").strip() else _BY_NAME[name].default


def env_or_none(name: str) -> dg.EnvVar | None:
    """For optional resource fields whose default is the resource's own."""
    return dg.EnvVar(name) if os.environ.get(name, "").strip() else None


def env_int_or_default(name: str) -> int | dg.EnvVar:
    if os.environ.get(name, "").strip():
        return dg.EnvVar.int(name)
    return int(_BY_NAME[name].default)


class SettingError(ValueError):
    """A setting has a value the project cannot use; the message names both."""


def background_jobs_enabled() -> bool:
    value = raw("ENABLE_BACKGROUND_JOBS").lower()
    if value in {"true", "1", "yes", "on"}:
        return True
    if value in {"false", "0", "no", "off"}:
        return False
    raise SettingError(f"ENABLE_BACKGROUND_JOBS={value!r} is not a boolean; use true or false.")


def positive_int(name: str) -> int:
    value = raw(name)
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise SettingError(f"{name}={value!r} must be a positive integer.")
    return number


def reconcile_minutes() -> int:
    value = raw("DISCOVERY_RECONCILE_MINUTES")
    if not value.isdigit():
        raise SettingError(f"DISCOVERY_RECONCILE_MINUTES={value!r} must be a whole number >= 0.")
    return int(value)


def partitions_start() -> str:
    value = raw("DISCOVERY_PARTITIONS_START")
    try:
        date.fromisoformat(value)
    except ValueError as error:
        raise SettingError(
            f"DISCOVERY_PARTITIONS_START={value!r} is not a date (YYYY-MM-DD)."
        ) from error
    return value
