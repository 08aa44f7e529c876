"""Every environment variable the project reads: one typed object, read in one place.

`load()` reads the environment into `Settings` (pydantic-settings): each variable has
its type, its default (or none) and its meaning, and a bad value fails with the
variable's name, the value and what is allowed. Resources, schedules, sensors,
partitions and the CLI all take their values from it; no other module reads
``os.environ`` for a setting. README's configuration table is checked against
`documented()` by a test.

Secrets (`DATABASE_URL`, the API keys) reach Dagster's resources as ``dg.EnvVar`` so
the UI shows the variable's name, never its value; every other value is passed as
the typed value itself, which Dagster shows and validates like any config.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import dagster as dg
from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingError(ValueError):
    """A setting has a value the project cannot use; the message names both."""


def _cron(value: str) -> str:
    """Dagster's own judgment of a cron string, through its public schedule API."""
    try:
        dg.ScheduleDefinition(name="cron_check", cron_schedule=value, job_name="cron_check")
    except dg.DagsterInvalidDefinitionError as error:
        raise ValueError(
            "not a valid 5-field cron expression (minute hour day-of-month month "
            "day-of-week), e.g. '*/5 * * * *'"
        ) from error
    return value


def _http_root(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return value


def _psycopg2_url(value: str | None) -> str | None:
    if value is not None and not value.startswith("postgresql+psycopg2://"):
        raise ValueError(
            "must start with postgresql+psycopg2:// (with a plain postgresql:// SQLAlchemy "
            "picks psycopg 3 and the webserver hangs)"
        )
    return value


Cron = Annotated[str, AfterValidator(_cron)]
HttpRoot = Annotated[str | None, AfterValidator(_http_root)]
Seconds = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    """The project's environment variables (field name = variable name, lower case)."""

    model_config = SettingsConfigDict(
        case_sensitive=False,
        env_ignore_empty=True,  # VAR= counts as unset
        str_strip_whitespace=True,
        extra="ignore",
        frozen=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, values: Any) -> Any:
        """A variable of only spaces counts as unset, like an empty one."""
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if not (isinstance(v, str) and not v.strip())}
        return values

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL 14+ with the `vector` extension holding the histories and "
        "output tables. Unset: `scripts/dev` starts an embedded PostgreSQL 18 with "
        "pgvector in `EMBEDDED_PGDATA`.",
    )
    conversation_discovery_cron: Cron = Field(
        default="*/5 * * * *",
        description="Cron (UTC) of `discovery_schedule`. An invalid value stops the "
        "definitions from loading with an error naming the variable and the value.",
    )
    search_index_cron: Cron = Field(
        default="15 2 * * *",
        description="Cron (UTC) of `search_index_schedule`, which gives each client with "
        "10,000 or more vectors an HNSW index of its own (see *Reading it back*). "
        "Validated like the one above.",
    )
    enable_background_jobs: bool = Field(
        default=True,
        description="`false` leaves every schedule and sensor stopped by default "
        "(`discovery_schedule`, `metrics_schedule`, `performance_stats_schedule`, "
        "`search_index_schedule`, `new_histories_sensor`, `embedding_backlog_sensor`, "
        "`enrichment_queue_sensor`, `metrics_sensor`, `inbox_sensor`, "
        "`messenger_pages_sensor`, `messenger_sync_sensor`, `alert_webhook_sensor`): start "
        "them in the UI when you want them.",
    )
    metrics_sensor_interval_seconds: Seconds = Field(
        default=10,
        description="How often `metrics_sensor` looks for days and hours whose metrics went "
        "stale (one indexed query; Dagster's sensor daemon ticks at most every 5 s).",
    )
    discovery_sensor_interval_seconds: Seconds = Field(
        default=5,
        description="How often `new_histories_sensor` probes the histories tables (a "
        "primary-key lookup per table: milliseconds; Dagster's sensor daemon ticks at most "
        "every 5 s).",
    )
    discovery_crew_failure_runs: int = Field(
        default=3,
        ge=1,
        description="A crew whose last this many discovery runs failed fails the "
        "`crews_discoverable` check with ERROR severity, naming the crew and its error "
        "(fewer failures: a warning).",
    )
    discovery_partitions_start: date = Field(
        default=date(2025, 1, 1),
        description="First day (UTC) of the daily partitions. Older sessions are still "
        "discovered, outside any partition's backfill range.",
    )
    discovery_reconcile_minutes: int = Field(
        default=15,
        ge=0,
        description="A crew whose table lost or changed rows (an n8n `clear()`) is "
        "recomputed whole, one scan of its table, at most this often; `0`: on the next "
        "run. TRUNCATE and a crew moving client are handled on the next run regardless.",
    )
    embedded_pgdata: Path | None = Field(
        default=None,
        description="Data directory of the embedded PostgreSQL, kept between runs; unset: "
        "`.pgdata` in the checkout. Its settings are `embedded.SERVER_SETTINGS` "
        "(`wal_buffers = 16MB`: PostgreSQL's own pick from 512 MB of `shared_buffers` up; "
        "at the default 4 MB, bulk upserts waited on WAL writes a tenth of their time); "
        "`ALTER SYSTEM` overrides them. A `DATABASE_URL` server keeps its own settings.",
    )
    pg_pool_min_size: int = Field(default=1, ge=0, description="Connections the pool keeps open.")
    pg_pool_max_size: int = Field(
        default=10,
        ge=3,
        description="Most connections the pool opens; at least 3 (a run holds a lock's "
        "connection and works on two more: the conversation builder's read and write, a "
        "Messenger page's writers).",
    )
    pg_pool_max_lifetime_seconds: Seconds = Field(
        default=3600, description="A pooled connection is replaced after this long."
    )
    pg_statement_timeout_ms: int = Field(
        default=300_000,
        ge=0,
        description="`statement_timeout` of every pooled connection (`0`: none).",
    )
    pg_idle_in_transaction_timeout_ms: int = Field(
        default=60_000,
        ge=0,
        description="`idle_in_transaction_session_timeout` of every pooled connection (`0`: none).",
    )
    pg_application_name: str = Field(
        default="conversation-pipeline",
        min_length=1,
        description="`application_name`, to find the pipeline in `pg_stat_activity`.",
    )
    embedding_backend: Literal["local", "ollama", "openai"] = Field(
        default="local",
        description="`local` (WordLlama's 256-d model bundled in its wheel, offline), "
        "`ollama` (`/api/embed`) or `openai` (any OpenAI-compatible `/v1/embeddings`).",
    )
    embedding_model: str | None = Field(
        default=None,
        description="Unset: `l2_supercat_256` (local), `nomic-embed-text` (ollama) or "
        "`text-embedding-3-small` (openai).",
    )
    embedding_base_url: HttpRoot = Field(
        default=None,
        description="Server root of an HTTP backend (no `/api` or `/v1`). Unset: "
        "`http://127.0.0.1:11434` (ollama), `https://api.openai.com` (openai).",
    )
    embedding_api_key: str | None = Field(
        default=None, description="Bearer token of the openai backend (a secret)."
    )
    embedding_dimension: int | None = Field(
        default=None,
        ge=1,
        le=2000,
        description="N of `conversations.embedding vector(N)` when `migrate` creates it; "
        "unset: asked of the configured model.",
    )
    embedding_sensor_interval_seconds: Seconds = Field(
        default=5,
        description="How often `embedding_backlog_sensor` looks for conversations waiting "
        "for a vector.",
    )
    enrichment_sensor_interval_seconds: Seconds = Field(
        default=5,
        description="How often `enrichment_queue_sensor` looks for conversation writes "
        "waiting for `enriched_conversations` (a vector, the product's own UPDATE; one "
        "index probe).",
    )
    summarizer_backend: Literal["extractive", "ollama", "openai"] = Field(
        default="extractive",
        description="`extractive` (deterministic, offline) or an LLM through `ollama` "
        "(`/api/chat`) or `openai` (`/v1/chat/completions`); a failing LLM leaves the "
        "extractive summaries and says so in the run.",
    )
    summarizer_model: str | None = Field(
        default=None, description="Unset: `llama3.2` (ollama) or `gpt-4o-mini` (openai)."
    )
    summarizer_base_url: HttpRoot = Field(
        default=None,
        description="Server root of the LLM summarizer. Unset: as for `EMBEDDING_BASE_URL`.",
    )
    summarizer_api_key: str | None = Field(
        default=None, description="Bearer token of the openai summarizer (a secret)."
    )
    dagster_pg_url: Annotated[str | None, AfterValidator(_psycopg2_url)] = Field(
        default=None,
        description="Dagster's own run/event/schedule storage (`dagster_home/dagster.yaml`). "
        "Must be `postgresql+psycopg2://…`: with a plain `postgresql://` URL SQLAlchemy 2.1 "
        "picks psycopg 3 and the webserver hangs. Unset: `scripts/dev` uses the embedded "
        "server's `dagster` database, or `DATABASE_URL`'s database.",
    )

    # --- messaging-platform sync (Messenger through the Graph API) ---------------------
    messenger_graph_url: HttpRoot = Field(
        default="https://graph.facebook.com/v23.0",
        description="Graph API root with its pinned version, where `messenger_conversations` "
        "reads each page's Messenger inbox. `scripts/dev` points it at the local simulator "
        "(`conversation-pipeline graph-sim`).",
    )
    messenger_page_tokens: str | None = Field(
        default=None,
        description="Page access tokens, a JSON object of page id to token (a secret; never "
        "stored in a table, shown in logs, metadata or errors).",
    )
    messenger_page_tokens_file: Path | None = Field(
        default=None,
        description="A mounted secret file holding the same JSON object (Docker or Kubernetes "
        "secrets); its tokens win over `MESSENGER_PAGE_TOKENS`.",
    )
    messenger_app_secret: str | None = Field(
        default=None,
        description="The Facebook app's secret: every call then carries `appsecret_proof` "
        "(a secret).",
    )
    messenger_timeout_seconds: Seconds = Field(
        default=30, description="Timeout of one Graph API request."
    )
    messenger_usage_threshold_percent: int = Field(
        default=75,
        gt=0,
        le=100,
        description="Past this usage in any of `X-App-Usage`, `X-Page-Usage` and "
        "`X-Business-Use-Case-Usage`, the sync paces its calls (longer the closer to 100%).",
    )
    messenger_max_throttle_wait_seconds: int = Field(
        default=900,
        ge=0,
        description="Longest pause a sync takes when throttled (the platform's "
        "`estimated_time_to_regain_access`); a longer one stops the page with its progress "
        "kept, and the sensor leaves it alone until then.",
    )
    messenger_overlap_seconds: int = Field(
        default=300,
        ge=0,
        description="An incremental sync lists threads down to the page's watermark minus "
        "this, so a thread stamped just before the watermark is not missed.",
    )
    messenger_reconcile_hours: int = Field(
        default=24,
        ge=0,
        description="An incremental sync of a page whose last full sync is older than this "
        "runs as a full sync (threads and messages gone at the source marked deleted); `0`: "
        "never.",
    )
    messenger_page_concurrency: int = Field(
        default=3,
        ge=1,
        le=32,
        description="Pages one `messenger_sync` run syncs at once (each has its own cursor, "
        "pacing and writers, and holds up to three of the pool's `PG_POOL_MAX_SIZE` "
        "connections: a run syncs at most `PG_POOL_MAX_SIZE / 3` pages at once, and says so; "
        "every page's calls count against the app's usage, which each page's pacing reads).",
    )
    messenger_sensor_interval_seconds: Seconds = Field(
        default=60,
        description="How often `messenger_sync_sensor` probes each enabled page (one light "
        "call) and `messenger_pages_sensor` mirrors `messenger_pages` into partitions.",
    )

    @field_validator("messenger_page_tokens")
    @classmethod
    def _page_tokens_are_an_object(cls, value: str | None) -> str | None:
        """A JSON object of page id to token; the error never repeats the value. An
        unusable entry fails its own page's sync (named there), not the settings."""
        if value is None:
            return value
        try:
            tokens = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON object of page id to token") from None
        if not isinstance(tokens, dict):
            raise ValueError("must be a JSON object of page id to token")
        return value

    # --- push ingestion (inbox) and live metrics ---------------------------------------

    inbox_max_pending: int = Field(
        default=100_000,
        gt=0,
        description="Most conversations the inbox holds: past it, `queue_conversation_storage` "
        "refuses the call (`InboxFullError`, SQLSTATE `CPQ01`) and nothing is stored. Kept in "
        "the database (`inbox_state`) by each drain run, where callers in any language read it.",
    )
    inbox_batch_size: int = Field(
        default=1000, gt=0, description="Inbox items a drain stores per transaction."
    )
    inbox_max_attempts: int = Field(
        default=5,
        gt=0,
        description="Drains an inbox item may fail alone before it moves to "
        "`conversation_inbox_rejects` with its error.",
    )
    inbox_sensor_interval_seconds: Seconds = Field(
        default=5,
        description="How often `inbox_sensor` looks for waiting inbox items (one drain run "
        "at a time).",
    )
    metrics_server_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address `conversation-pipeline metrics-server` listens on "
        "(`0.0.0.0`: every interface).",
    )
    metrics_server_port: int = Field(
        default=9464,
        ge=1,
        le=65535,
        description="Port of `conversation-pipeline metrics-server` (Prometheus text at "
        "`/metrics`).",
    )
    inbox_age_warning_seconds: Seconds = Field(
        default=60,
        description="Health turns `warning` when the inbox's oldest item waited this long "
        "(the `inbox_oldest_item_fresh` check warns too).",
    )
    inbox_age_critical_seconds: Seconds = Field(
        default=300,
        description="Health turns `critical` (and the check fails as an error) past this age.",
    )
    inbox_depth_warning: int = Field(
        default=10_000, gt=0, description="Health turns `warning` with this many items waiting."
    )
    inbox_depth_critical: int = Field(
        default=50_000, gt=0, description="Health turns `critical` with this many items waiting."
    )
    enqueue_p99_warning_ms: float = Field(
        default=5.0,
        gt=0,
        description="Health turns `warning` when the enqueue's p99 (its histogram) is above this.",
    )
    enqueue_p99_critical_ms: float = Field(
        default=50.0, gt=0, description="Health turns `critical` past this enqueue p99."
    )
    alert_webhook_url: HttpRoot = Field(
        default=None,
        description='Slack-compatible webhook (a secret): a JSON `{"text": ...}` is posted '
        "when an inbox check fails or a run fails (`alert_webhook_sensor`). Unset: no call, "
        "and that sensor starts stopped.",
    )

    @field_validator(
        "inbox_age_critical_seconds", "inbox_depth_critical", "enqueue_p99_critical_ms"
    )
    @classmethod
    def _critical_not_below_warning(cls, value: float, info: ValidationInfo) -> float:
        """A critical threshold below its warning would turn health critical while the
        check still passes."""
        warning_name = (info.field_name or "").replace("critical", "warning")
        warning = info.data.get(warning_name)
        if warning is not None and value < warning:
            raise ValueError(f"must not be below {warning_name.upper()} ({warning})")
        return value


SECRETS = frozenset(
    {
        "DATABASE_URL",
        "EMBEDDING_API_KEY",
        "SUMMARIZER_API_KEY",
        "ALERT_WEBHOOK_URL",
        "MESSENGER_PAGE_TOKENS",
        "MESSENGER_APP_SECRET",
    }
)


def load() -> Settings:
    """The settings in force now; a bad value raises SettingError naming it."""
    try:
        return Settings()
    except ValidationError as error:
        from resources.http import redact_url  # here: resources build from this module

        problems = []
        for item in error.errors():
            name = str(item["loc"][0]).upper() if item["loc"] else "?"
            value = item.get("input")
            if name in SECRETS:
                shown = "(hidden)"
            elif isinstance(value, str) and "://" in value:
                shown = repr(redact_url(value))
            else:
                shown = repr(value)
            problems.append(f"{name}={shown}: {item['msg']}")
        raise SettingError("; ".join(problems)) from None


def names() -> list[str]:
    """The environment variables, in the order README documents them."""
    return [name.upper() for name in Settings.model_fields]


def documented() -> dict[str, tuple[str, str]]:
    """Each variable's README default cell and meaning."""
    rows = {}
    for field_name, field in Settings.model_fields.items():
        default = field.default
        cell = "(none)" if default is None else f"`{_shown(default)}`"
        rows[field_name.upper()] = (cell, field.description or "")
    return rows


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def secret(name: str) -> dg.EnvVar | None:
    """A secret for a Dagster resource: the variable's name (resolved at run time)."""
    if name not in SECRETS:
        raise KeyError(f"{name} is not a secret setting")
    return dg.EnvVar(name) if getattr(load(), name.lower()) is not None else None
