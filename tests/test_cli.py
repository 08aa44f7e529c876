"""The launcher against a real embedded PostgreSQL: migrations both ways through
``main()``, the embedded server's restart keeping data, and the URL plumbing that
keeps Dagster's storage on psycopg2. Self-contained: no fixture from conftest.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from conversation_assets import cli, migrate, settings
from conversation_assets.embedded import (
    SERVER_SETTINGS,
    EmbeddedPostgres,
    scratch_database,
    start_embedded,
)


@pytest.fixture(scope="module")
def cli_test_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """One throwaway server for the module; deleted with its data at the end."""
    server = start_embedded(tmp_path_factory.mktemp("cli-pg") / "data", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cli_fresh_db_url(
    cli_test_server: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An empty database per test, exported as DATABASE_URL."""
    with scratch_database(cli_test_server.url, "cli") as url:
        monkeypatch.setenv("DATABASE_URL", url)
        monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
        yield url


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {row[0] for row in rows}


def test_migrate_then_down_to_zero_round_trips(
    cli_fresh_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    latest = max(m.version for m in migrate.load_migrations())

    assert cli.main(["migrate"]) == 0
    out = capsys.readouterr().out
    assert "applied migration 0001_discovery" in out
    assert f"schema now at version {latest:04d}" in out
    assert {"crews", "discovered_sessions", "schema_migrations"} <= _tables(cli_fresh_db_url)

    assert cli.main(["migrate"]) == 0
    assert "schema up to date" in capsys.readouterr().out

    assert cli.main(["migrate", "--down", "0"]) == 0
    out = capsys.readouterr().out
    assert "reverted migration 0001_discovery" in out
    assert "version 0 (empty)" in out
    assert _tables(cli_fresh_db_url) <= {"schema_migrations"}
    with psycopg.connect(cli_fresh_db_url) as conn:
        assert migrate.applied_versions(conn) == []

    assert cli.main(["migrate"]) == 0  # and back up again on the reverted schema
    assert "crews" in _tables(cli_fresh_db_url)


def test_demo_is_idempotent(cli_fresh_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("conversation_assets.demo")
    assert cli.main(["demo"]) == 0
    assert "demo data loaded" in capsys.readouterr().out
    with psycopg.connect(cli_fresh_db_url) as conn:
        crews = conn.execute("SELECT count(*) FROM crews").fetchone()[0]
    assert crews > 0

    assert cli.main(["demo"]) == 0
    assert "already present" in capsys.readouterr().out
    with psycopg.connect(cli_fresh_db_url) as conn:
        assert conn.execute("SELECT count(*) FROM crews").fetchone()[0] == crews


def test_embedded_restart_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    first = start_embedded(data_dir, cleanup_mode="stop")
    try:
        with psycopg.connect(first.url) as conn:
            for name, value in SERVER_SETTINGS.items():  # a new server is created with them
                assert conn.execute("SELECT current_setting(%s)", (name,)).fetchone() == (value,)
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('still here')")
    finally:
        first.stop()
    assert not (data_dir / "postmaster.pid").exists(), "stop() left PostgreSQL running"
    # A directory made before the settings existed gets them at its next start.
    conf = data_dir / "postgresql.conf"
    conf.write_text(conf.read_text().split("\n# conversation_assets.embedded")[0])

    second = start_embedded(data_dir, cleanup_mode="delete")
    try:
        assert second.url == first.url
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("still here",)]
            assert conn.execute("SHOW wal_buffers").fetchone() == ("16MB",)
        conf = (data_dir / "postgresql.conf").read_text()
        assert conf.count("SERVER_SETTINGS") == 1  # written once, at creation
    finally:
        second.stop()
    assert not data_dir.exists()


def test_cli_uses_embedded_server_when_database_url_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "pgdata"
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("EMBEDDED_PGDATA", str(data_dir))

    assert cli.main(["migrate"]) == 0
    out = capsys.readouterr().out
    assert f"starting embedded PostgreSQL in {data_dir}" in out
    assert "embedded PostgreSQL stopped" in out
    assert not (data_dir / "postmaster.pid").exists()

    server = start_embedded(data_dir, cleanup_mode="delete")
    try:
        with psycopg.connect(server.url) as conn:
            assert migrate.applied_versions(conn) != []
    finally:
        server.stop()


def test_dagster_storage_url_is_psycopg2_and_connects(
    cli_test_server: EmbeddedPostgres, cli_fresh_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli_test_server.dagster_url.startswith("postgresql+psycopg2://")
    derived = cli.dagster_url(cli_fresh_db_url)
    assert derived.startswith("postgresql+psycopg2://")

    params = psycopg.conninfo.conninfo_to_dict(cli_fresh_db_url)
    keyword_form = psycopg.conninfo.make_conninfo("", **params)  # host=... dbname=...
    assert "://" not in keyword_form
    for url in (cli_test_server.dagster_url, derived, cli.psycopg2_url(keyword_form)):
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                assert conn.dialect.driver == "psycopg2"
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        finally:
            engine.dispose()

    monkeypatch.setenv("DAGSTER_PG_URL", cli_fresh_db_url)  # plain postgresql://: the trap
    with pytest.raises(settings.SettingError, match="postgresql\\+psycopg2"):
        cli.dagster_url(cli_fresh_db_url)


def test_dev_refuses_a_busy_port(cli_fresh_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["dev", "--port", str(port)]) == 1
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().out
    assert _tables(cli_fresh_db_url) == set(), "dev must fail before migrating"
