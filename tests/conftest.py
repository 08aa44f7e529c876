"""Real PostgreSQL for every test: DATABASE_URL when set, else an embedded server.

Each test gets its own database cloned from a migrated template, so tests never
see each other's rows and a template clone costs milliseconds.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from conversation_assets import migrate
from conversation_assets.embedded import get_server, scratch_database
from resources.postgres import PostgresResource
from tests.fakes import ModelServer, serve_models


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    data_dir: Path = tmp_path_factory.mktemp("embedded-pg") / "data"
    server = get_server(data_dir, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """A migrated database that every test's database is copied from."""
    with scratch_database(server_url, "cp_template") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate.upgrade(conn)
        yield conninfo_to_dict(url)["dbname"]


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    with scratch_database(server_url, "cp_test", template=template_db) as url:
        yield url


@pytest.fixture
def other_db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A second fresh database, for from-scratch comparisons."""
    with scratch_database(server_url, "cp_test", template=template_db) as url:
        yield url


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def postgres(db_url: str) -> Iterator[PostgresResource]:
    resource = PostgresResource(database_url=db_url, application_name="cp-test-discovery")
    yield resource
    resource.close()


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    """A local Ollama- and OpenAI-compatible model server (embeddings and chat)."""
    with serve_models() as server:
        yield server
