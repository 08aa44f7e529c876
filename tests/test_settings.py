"""Every environment variable: each allowed value loads and runs, a bad one names itself."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from conversation_assets import settings
from jobs import INCREMENTAL_RUN_CONFIG
from schedules import build_discovery_schedule, build_search_index_schedule
from sensors import build_new_histories_sensor
from tests.fakes import ModelServer, fake_summary
from tests.sources import add_crew, insert

ROOT = Path(__file__).resolve().parents[1]

# Per variable: values it must accept, and one it must refuse (None: any text is valid).
VALUES: dict[str, tuple[list[str], str | None]] = {
    "DATABASE_URL": (["postgresql://u@db.example/app", "host=/tmp dbname=x"], None),
    "CONVERSATION_DISCOVERY_CRON": (["*/5 * * * *", "0 */2 * * 1-5"], "every 5 minutes"),
    "SEARCH_INDEX_CRON": (["15 2 * * *", "@daily"], "61 * * * *"),
    "ENABLE_BACKGROUND_JOBS": (["true", "false", "1", "0", "yes", "off"], "maybe"),
    "METRICS_SENSOR_INTERVAL_SECONDS": (["60", "1"], "0"),
    "DISCOVERY_CREW_FAILURE_RUNS": (["3", "1"], "0"),
    "ENRICHMENT_SENSOR_INTERVAL_SECONDS": (["5", "60"], "0"),
    "DISCOVERY_SENSOR_INTERVAL_SECONDS": (["30", "5"], "-3"),
    "DISCOVERY_PARTITIONS_START": (["2025-01-01", "2020-02-29"], "2025-13-01"),
    "DISCOVERY_RECONCILE_MINUTES": (["15", "0"], "soon"),
    "EMBEDDED_PGDATA": (["/var/lib/cp", "data/pg"], None),
    "PG_POOL_MIN_SIZE": (["1", "0"], "-1"),
    "PG_POOL_MAX_SIZE": (["10", "3"], "2"),
    "PG_POOL_MAX_LIFETIME_SECONDS": (["3600"], "0"),
    "PG_STATEMENT_TIMEOUT_MS": (["300000", "0"], "5s"),
    "PG_IDLE_IN_TRANSACTION_TIMEOUT_MS": (["60000", "0"], "1.5"),
    "PG_APPLICATION_NAME": (["conversation-pipeline", "etl"], None),
    "EMBEDDING_BACKEND": (["local", "ollama", "openai"], "huggingface"),
    "EMBEDDING_MODEL": (["nomic-embed-text"], None),
    "EMBEDDING_BASE_URL": (["http://127.0.0.1:11434", "https://api.example"], "127.0.0.1:11434"),
    "EMBEDDING_API_KEY": (["sk-123"], None),
    "EMBEDDING_DIMENSION": (["256", "2000"], "2001"),
    "EMBEDDING_SENSOR_INTERVAL_SECONDS": (["30"], "x"),
    "SUMMARIZER_BACKEND": (["extractive", "ollama", "openai"], "llm"),
    "SUMMARIZER_MODEL": (["llama3.2"], None),
    "SUMMARIZER_BASE_URL": (["http://127.0.0.1:11434"], "ftp://models"),
    "SUMMARIZER_API_KEY": (["sk-456"], None),
    "DAGSTER_PG_URL": (["postgresql+psycopg2://u@h/dagster"], "postgresql://h/dagster"),
    "MESSENGER_GRAPH_URL": (
        ["https://graph.facebook.com/v23.0", "http://127.0.0.1:8765/v23.0"],
        "graph.facebook.com",
    ),
    "MESSENGER_PAGE_TOKENS": (['{"104200000000001": "EAAB"}'], '["not", "an object"]'),
    "MESSENGER_PAGE_TOKENS_FILE": (["/run/secrets/pages.json"], None),
    "MESSENGER_APP_SECRET": (["abc123"], None),
    "MESSENGER_TIMEOUT_SECONDS": (["30"], "0"),
    "MESSENGER_USAGE_THRESHOLD_PERCENT": (["75", "100"], "101"),
    "MESSENGER_MAX_THROTTLE_WAIT_SECONDS": (["900", "0"], "-1"),
    "MESSENGER_OVERLAP_SECONDS": (["300", "0"], "-5"),
    "MESSENGER_RECONCILE_HOURS": (["24", "0"], "daily"),
    "MESSENGER_PAGE_CONCURRENCY": (["3", "1", "32"], "0"),
    "MESSENGER_SENSOR_INTERVAL_SECONDS": (["60"], "0"),
    "INBOX_MAX_PENDING": (["100000", "1"], "0"),
    "INBOX_BATCH_SIZE": (["1000"], "0"),
    "INBOX_MAX_ATTEMPTS": (["5", "1"], "0"),
    "INBOX_SENSOR_INTERVAL_SECONDS": (["5"], "0"),
    "METRICS_SERVER_HOST": (["127.0.0.1", "0.0.0.0"], None),
    "METRICS_SERVER_PORT": (["9464", "1"], "70000"),
    "INBOX_AGE_WARNING_SECONDS": (["60"], "0"),
    "INBOX_AGE_CRITICAL_SECONDS": (["300"], "-1"),
    "INBOX_DEPTH_WARNING": (["10000"], "0"),
    "INBOX_DEPTH_CRITICAL": (["50000"], "many"),
    "ENQUEUE_P99_WARNING_MS": (["5", "2.5"], "0"),
    "ENQUEUE_P99_CRITICAL_MS": (["50"], "-1"),
    "ALERT_WEBHOOK_URL": (["https://hooks.slack.com/services/T/B/X"], None),
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in settings.names():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_variable_has_cases_here():
    assert set(VALUES) == set(settings.names())


@pytest.mark.parametrize(
    ("name", "value"), [(n, v) for n, (good, _) in VALUES.items() for v in good]
)
def test_each_allowed_value_loads(clean_env, name, value):
    clean_env.setenv(name, value)
    assert getattr(settings.load(), name.lower()) is not None


@pytest.mark.parametrize(
    ("name", "value"), [(n, bad) for n, (_, bad) in VALUES.items() if bad is not None]
)
def test_a_bad_value_fails_naming_the_variable_the_value_and_what_is_allowed(
    clean_env, name, value
):
    clean_env.setenv(name, value)
    with pytest.raises(settings.SettingError) as error:
        settings.load()
    message = str(error.value)
    shown = "(hidden)" if name in settings.SECRETS else repr(value)  # a secret is never shown
    assert message.startswith(f"{name}={shown}: ")
    if name.endswith("_BACKEND"):
        allowed = {"EMBEDDING_BACKEND": "'local', 'ollama' or 'openai'"}
        assert allowed.get(name, "'extractive', 'ollama' or 'openai'") in message


def test_an_empty_variable_counts_as_unset(clean_env):
    clean_env.setenv("EMBEDDING_BACKEND", "")
    clean_env.setenv("PG_POOL_MAX_SIZE", "  ")
    loaded = settings.load()
    assert (loaded.embedding_backend, loaded.pg_pool_max_size) == ("local", 10)


def test_a_bad_secret_is_named_but_never_shown(clean_env):
    clean_env.setenv("DAGSTER_PG_URL", "postgresql://admin:hunter2@db/dagster")
    with pytest.raises(settings.SettingError) as error:
        settings.load()
    assert "DAGSTER_PG_URL" in str(error.value) and "hunter2" not in str(error.value)


def test_schedules_and_sensors_take_their_settings(clean_env):
    clean_env.setenv("CONVERSATION_DISCOVERY_CRON", "*/2 * * * *")
    clean_env.setenv("SEARCH_INDEX_CRON", "0 3 * * *")
    clean_env.setenv("DISCOVERY_SENSOR_INTERVAL_SECONDS", "7")
    clean_env.setenv("ENABLE_BACKGROUND_JOBS", "false")
    assert build_discovery_schedule().cron_schedule == "*/2 * * * *"
    assert build_search_index_schedule().cron_schedule == "0 3 * * *"
    sensor = build_new_histories_sensor()
    assert sensor.minimum_interval_seconds == 7
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert build_discovery_schedule().default_status == dg.DefaultScheduleStatus.STOPPED


def _load_definitions(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Load the code location in a fresh interpreter, as `dagster dev` does."""
    base = {k: v for k, v in os.environ.items() if k not in set(settings.names())}
    code = (
        "from conversation_assets.definitions import defs\n"
        "defs.resolve_all_job_defs()\n"
        "print(sorted(defs.resources))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_code_location_loads_with_every_variable_set():
    explicit_defaults = {
        name: good[0] for name, (good, _) in VALUES.items() if name != "DAGSTER_PG_URL"
    }
    production = explicit_defaults | {
        "EMBEDDING_BACKEND": "ollama",
        "SUMMARIZER_BACKEND": "openai",
        "EMBEDDING_BASE_URL": "https://bob:pw@models.example",
        "ENABLE_BACKGROUND_JOBS": "false",
    }
    for env in (explicit_defaults, production):
        loaded = _load_definitions(env)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        assert "['embeddings', 'messenger', 'postgres', 'summarizer']" in loaded.stdout

    refused = _load_definitions({"EMBEDDING_BACKEND": "openia"})
    assert refused.returncode != 0
    assert "EMBEDDING_BACKEND='openia': Input should be 'local', 'ollama' or 'openai'" in (
        refused.stderr
    )


@pytest.fixture
def definitions_with(clean_env: pytest.MonkeyPatch) -> Iterator[object]:
    """The definitions module, re-imported under the environment the test sets."""
    import conversation_assets.definitions as module

    def load() -> dg.Definitions:
        return importlib.reload(module).defs

    yield load
    clean_env.undo()
    importlib.reload(module)


@pytest.mark.parametrize("backend", ["local", "ollama", "openai"])
def test_a_real_run_with_each_embedding_backend(
    definitions_with, clean_env, conn, db_url, model_server: ModelServer, backend
):
    clean_env.setenv("DATABASE_URL", db_url)
    clean_env.setenv("EMBEDDING_BACKEND", backend)
    if backend != "local":  # the local server's vectors are 3-d
        clean_env.setenv("EMBEDDING_BASE_URL", model_server.url)
        clean_env.setenv("EMBEDDING_API_KEY", "sk-test")
        conn.execute("ALTER TABLE conversations ALTER COLUMN embedding TYPE vector(3)")
    defs = definitions_with()
    _discover_one_session(defs, conn)

    result = defs.resolve_job_def("embedding_job").execute_in_process(
        instance=dg.DagsterInstance.ephemeral()
    )

    assert result.success
    assert conn.execute(
        "SELECT count(*) FROM conversations WHERE embedding IS NOT NULL"
    ).fetchone() == (1,)
    if backend == "openai":
        assert model_server.requests[-1]["headers"]["Authorization"] == "Bearer sk-test"
    if backend != "local":
        assert {r["path"] for r in model_server.requests} == {
            "/api/embed" if backend == "ollama" else "/v1/embeddings"
        }


@pytest.mark.parametrize("backend", ["extractive", "ollama", "openai"])
def test_a_real_run_with_each_summarizer_backend(
    definitions_with, clean_env, conn, db_url, model_server: ModelServer, backend
):
    clean_env.setenv("DATABASE_URL", db_url)
    clean_env.setenv("SUMMARIZER_BACKEND", backend)
    clean_env.setenv("SUMMARIZER_BASE_URL", model_server.url)
    defs = definitions_with()

    _discover_one_session(defs, conn)

    transcript, summary = conn.execute(
        "SELECT full_conversation, summary FROM conversations"
    ).fetchone()
    if backend == "extractive":
        assert summary and not model_server.requests
    else:
        assert summary == fake_summary(
            model_server.requests[-1]["payload"]["messages"][-1]["content"]
        )
        assert transcript.split()[-1] in summary


def _discover_one_session(defs: dg.Definitions, conn: psycopg.Connection) -> None:
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("s1", "human"), ("s1", "ai")])
    result = defs.resolve_job_def("discovery_job").execute_in_process(
        partition_key=datetime.now(UTC).date().isoformat(),
        run_config=INCREMENTAL_RUN_CONFIG,
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    assert conn.execute("SELECT count(*) FROM conversations").fetchone() == (1,)


def test_readme_documents_every_setting_with_its_default():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([^|]+) \| ([^|]+) \|$", readme, flags=re.MULTILINE)
    table = {name: (default.strip(), meaning.strip()) for name, default, meaning in rows}
    assert table == settings.documented()


@pytest.mark.parametrize(
    ("warning", "critical"),
    [
        ("INBOX_AGE_WARNING_SECONDS", "INBOX_AGE_CRITICAL_SECONDS"),
        ("INBOX_DEPTH_WARNING", "INBOX_DEPTH_CRITICAL"),
        ("ENQUEUE_P99_WARNING_MS", "ENQUEUE_P99_CRITICAL_MS"),
    ],
)
def test_a_critical_threshold_below_its_warning_is_refused(clean_env, warning, critical):
    clean_env.setenv(warning, "600")
    clean_env.setenv(critical, "300")
    with pytest.raises(settings.SettingError, match=f"{critical}=.*must not be below {warning}"):
        settings.load()
    clean_env.setenv(critical, "600")
    assert settings.load()
