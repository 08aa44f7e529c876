"""``conversation-pipeline``: migrate the schema, load demo data, run Dagster locally.

One entry point so that a fresh clone needs no database, no DAGSTER_HOME and no
environment variables: with DATABASE_URL unset every command uses the embedded
PostgreSQL in ``.pgdata`` (see ``embedded.py``), and ``dev`` wires Dagster's own
storage to it with the psycopg2 URL that dagster-postgres needs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from urllib.parse import urlencode

import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict

from conversation_assets import graph_sim, migrate, settings
from conversation_assets.embedded import (
    EmbeddedPostgres,
    default_data_dir,
    repo_root,
    start_embedded,
)

READY_TIMEOUT_S = 120.0
LOCATION_TIMEOUT_S = 90.0
SHUTDOWN_GRACE_S = 30.0  # dagster dev waits for its webserver and daemon to exit
KILL_GRACE_S = 5.0

_embedded: EmbeddedPostgres | None = None


class CliError(Exception):
    """A problem the user can fix (bad URL, busy port): printed without a traceback."""


def _say(message: str) -> None:
    """Progress lines: prefixed so they stand out among Dagster's log lines."""
    print(f"[conversation-pipeline] {message}", flush=True)


# --- database URLs -----------------------------------------------------------------


def database_url() -> str:
    """DATABASE_URL when set, else the embedded server's URL (started once per process)."""
    global _embedded
    url = settings.load().database_url
    if url:
        return url
    if _embedded is None:
        data_dir = default_data_dir()
        _say(f"DATABASE_URL is unset: starting embedded PostgreSQL in {data_dir}")
        _embedded = start_embedded(data_dir)
    return _embedded.url


def stop_embedded() -> None:
    """Stop the embedded server if this process started it (no-op otherwise)."""
    global _embedded
    if _embedded is not None:
        embedded, _embedded = _embedded, None
        embedded.stop()
        _say("embedded PostgreSQL stopped")


def psycopg2_url(url: str) -> str:
    """The SQLAlchemy ``postgresql+psycopg2://`` form of a libpq URL or key=value string.

    dagster-postgres hands its URL to SQLAlchemy 2.1, which maps a bare
    ``postgresql://`` to psycopg 3; the webserver then fails with "the connection
    is closed" and never answers. Naming psycopg2 avoids that.
    """
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme in ("postgres", "postgresql") or scheme.startswith("postgresql+"):
            return f"postgresql+psycopg2://{rest}"
        raise CliError(f"not a PostgreSQL URL (scheme {scheme!r})")
    # key=value conninfo: SQLAlchemy's psycopg2 dialect passes query parameters on.
    return "postgresql+psycopg2:///?" + urlencode(conninfo_to_dict(url))


def dagster_url(url: str) -> str:
    """Dagster's storage URL: DAGSTER_PG_URL, else the embedded ``dagster`` database,
    else the pipeline's own database (no CREATE DATABASE rights needed)."""
    explicit = settings.load().dagster_pg_url  # validated there: postgresql+psycopg2://
    if explicit:
        return explicit
    if _embedded is not None and url == _embedded.url:
        return _embedded.dagster_url
    return psycopg2_url(url)


def _describe(url: str) -> str:
    """A URL without its password, for progress lines."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable URL)"
    where = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    return f"database {params.get('dbname', '?')} on {where}{port}"


# --- commands ----------------------------------------------------------------------


def run_migrations(url: str, down: int | None = None) -> None:
    """Apply every migration (or revert to ``down``) and say what changed."""
    with psycopg.connect(url, autocommit=True) as conn:
        if down is None:
            from conversation_assets.embedding import configured_dimension

            changed = migrate.upgrade(conn, embedding_dimension=configured_dimension)
            verb = "applied"
        else:
            changed = migrate.downgrade(conn, down)
            verb = "reverted"
        for migration in changed:
            _say(f"{verb} migration {migration.version:04d}_{migration.name}")
        versions = migrate.applied_versions(conn)
    at = f"{max(versions):04d}" if versions else "0 (empty)"
    if not changed:
        _say(f"schema up to date at version {at}")
    else:
        _say(f"schema now at version {at}")


def load_demo_data(url: str) -> dict[str, int]:
    """Load the demo crews and histories unless they exist (``load_demo`` is idempotent)."""
    from conversation_assets.demo import load_demo  # lazy: optional for migrate/dev

    with psycopg.connect(url, autocommit=True) as conn:
        try:
            from pgvector.psycopg import register_vector

            register_vector(conn)
        except (ImportError, psycopg.ProgrammingError):
            pass
        counts = load_demo(conn)
    if counts:
        _say("demo data loaded: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    else:
        _say("demo data already present: nothing loaded")
    return counts


def _cmd_migrate(args: argparse.Namespace) -> int:
    url = database_url()
    _say(f"migrating {_describe(url)}")
    run_migrations(url, args.down)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    url = database_url()
    _say(f"migrating {_describe(url)}")
    run_migrations(url)
    load_demo_data(url)
    return 0


def _cmd_search_indexes(args: argparse.Namespace) -> int:
    """Sync the per-client HNSW indexes now (e.g. right after a bulk load)."""
    from conversation_assets.search_indexes import SearchIndexError, sync_search_indexes

    given = {
        "min_vectors": args.min_vectors,
        "max_indexes": args.max_indexes,
        "build_memory_mb": args.build_memory_mb,
    }
    url = database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            report = sync_search_indexes(
                conn,
                progress=_say,
                **{name: value for name, value in given.items() if value is not None},
            )
        except SearchIndexError as error:
            report = error.report
            _say(f"ERROR: {error}")
    if report.skipped_reason:
        _say(f"nothing done: {report.skipped_reason}")
        return 1
    _say(
        f"{report.indexes} client indexes hold {report.vectors_covered:,} of "
        f"{report.vectors_total:,} live vectors ({len(report.built)} built, "
        f"{len(report.dropped)} dropped, {len(report.failed)} failed, {report.seconds:.1f} s)"
    )
    return 1 if report.failed else 0


def _cmd_metrics_server(args: argparse.Namespace) -> int:
    """Serve Prometheus text at /metrics, every figure read from the database per scrape."""
    from conversation_assets.monitoring import serve_metrics

    current = settings.load()
    host = args.host or current.metrics_server_host
    port = args.port or current.metrics_server_port
    if not _port_free(host, port):
        raise CliError(f"port {port} on {host} is already in use; pass --port to pick another")
    stop, bound = serve_metrics(database_url(), host, port, current.pg_application_name)
    _say(f"metrics at http://{_probe_host(host)}:{bound}/metrics  (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except (_Interrupted, KeyboardInterrupt):
        return 0
    finally:
        with _signals_deferred():
            stop()


def _cmd_status(args: argparse.Namespace) -> int:
    """The dashboard in the terminal; exit code 0 healthy, 1 warning, 2 critical."""
    from conversation_assets.monitoring import status
    from resources.postgres import PostgresResource

    current = settings.load()
    resource = PostgresResource(
        database_url=database_url(),
        pool_min_size=1,
        pool_max_size=1,
        application_name=f"{current.pg_application_name}-status",
    )
    try:
        verdict = status(resource.pool, current, every=args.watch)
    except (_Interrupted, KeyboardInterrupt):
        return 0
    finally:
        resource.close()
    return {"healthy": 0, "warning": 1, "critical": 2}[verdict.health]


# --- dev: dagster dev as a supervised child ----------------------------------------


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived: shut down in order, then exit 0."""


def _cmd_track_deletes(args: argparse.Namespace) -> int:
    """Print (or, with --apply, install) the change-log triggers on crews' tables.

    Stdout is a SQL script to review and pipe to psql: every name in it is quoted
    as SQL (a crew code as a literal, a table as an identifier), so a code holding
    a line break cannot put a statement of its own in it. Notes go to stderr."""

    from psycopg import sql

    from conversation_assets.discovery import discover, histories_identifier, load_crews
    from conversation_assets.queries import query
    from resources.postgres import PostgresResource

    url = database_url()
    with psycopg.connect(url, autocommit=True) as conn:
        crews = load_crews(conn, args.crews or None)
        if not crews:
            raise CliError("no enabled crew matches")
        for crew in crews:
            header = query(
                "track_changes_crew",
                crew_code=sql.Literal(crew.crew_code),
                histories_table=sql.Literal(crew.histories_table),
            )
            statement = query(
                "track_changes",
                histories=histories_identifier(crew.crew_code, crew.histories_table),
            )
            print(f"{header.as_string(conn)}\n{statement.as_string(conn)}", flush=True)
            if args.apply:
                with conn.transaction():
                    conn.execute(statement)
    if not args.apply:
        print(
            "[conversation-pipeline] nothing changed: run again with --apply to install "
            "these triggers",
            file=sys.stderr,
            flush=True,
        )
        return 0
    # Deletes made before the triggers existed: one exact recompute of the crews.
    resource = PostgresResource(database_url=url)
    try:
        report = discover(
            resource.pool, mode="full", crew_codes=[c.crew_code for c in crews], progress=_say
        )
    finally:
        resource.close()
    _say(f"change log installed on {len(crews)} crew(s); {len(report.failed)} failed")
    return 1 if report.failed else 0


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while stopping: a second Ctrl-C must not abandon
    children or PostgreSQL half-stopped. No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _probe_host(host: str) -> str:
    """Where to reach a server bound to ``host`` (a wildcard bind is reached via loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _port_free(host: str, port: int) -> bool:
    """False when something already listens there: we would otherwise poll it, not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


# Never route loopback polls through an http_proxy from the environment.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with _http.open(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _graphql(base: str, query: str) -> dict | None:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with _http.open(request, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


_LOCATIONS_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _location_report(base: str, child: subprocess.Popen[bytes], deadline: float) -> list[str]:
    """Wait for the code locations to finish loading; one line per location."""
    while time.monotonic() < deadline and child.poll() is None:
        answer = _graphql(base, _LOCATIONS_QUERY) or {}
        workspace = (answer.get("data") or {}).get("workspaceOrError") or {}
        entries = workspace.get("locationEntries")
        if entries is not None and all(e.get("loadStatus") == "LOADED" for e in entries):
            lines = []
            for entry in entries:
                loaded = entry.get("locationOrLoadError") or {}
                if loaded.get("__typename") == "PythonError":
                    first = (loaded.get("message") or "").strip().splitlines()[:1]
                    lines.append(f"code location {entry['name']} FAILED to load: {''.join(first)}")
                else:
                    lines.append(f"code location {entry['name']} loaded")
            return lines or ["no code locations in the workspace"]
        time.sleep(1.0)
    return ["code locations still loading; see the UI's Deployment page"]


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of a process group (zombies excluded: they are already gone)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    """Interrupt dagster dev, let it stop its webserver, daemon and code servers, then
    terminate (and at last kill) anything left in its process group."""
    pgid = child.pid  # start_new_session: the child leads its own group
    if child.poll() is None:
        _say("stopping Dagster (webserver, daemon, code servers)...")
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            _say(f"dagster dev still running after {SHUTDOWN_GRACE_S:.0f} s; terminating it")
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        members = _group_members(pgid)
        if not members:
            break
        for process in members:
            try:
                process.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(members, timeout=grace)
    if child.poll() is None:
        child.wait(timeout=KILL_GRACE_S)


def _exit_code(returncode: int) -> int:
    """Non-zero, shell style: killed by signal N becomes 128 + N."""
    if returncode < 0:
        return 128 - returncode
    return returncode or 1


def run_dagster_dev(url: str, host: str, port: int, extra_env: dict[str, str]) -> int:
    """Start ``dagster dev`` on ``url``, announce its URL once it answers, supervise it."""
    root = repo_root()
    dagster_home = root / "dagster_home"
    env = dict(os.environ) | extra_env
    env.update(
        DATABASE_URL=url,
        DAGSTER_PG_URL=dagster_url(url),
        DAGSTER_HOME=str(dagster_home),
        # `dagster dev` warns on every start that `dg dev` supersedes it; dg needs a
        # dg project layout this repository does not use.
        PYTHONWARNINGS=",".join(
            filter(None, [env.get("PYTHONWARNINGS"), "ignore:Function `dev_command`"])
        ),
    )
    command = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(root / "workspace.yaml"),
        "-h",
        host,
        "-p",
        str(port),
    ]
    _say(f"starting dagster dev (DAGSTER_HOME={dagster_home})")
    # Own session: a terminal Ctrl-C reaches only us, and we stop the group in order.
    child = subprocess.Popen(command, cwd=root, env=env, start_new_session=True)
    base = f"http://{_probe_host(host)}:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _get(f"{base}/server_info") is None:
            if child.poll() is not None:
                _say(f"ERROR: dagster dev exited with code {child.returncode} before serving")
                return _exit_code(child.returncode)
            if time.monotonic() > deadline:
                _say(f"ERROR: Dagster did not answer on {base} within {READY_TIMEOUT_S:.0f} s")
                return 1
            time.sleep(0.5)
        _say(f"Dagster UI ready: {base}  (Ctrl-C to stop)")
        for line in _location_report(base, child, time.monotonic() + LOCATION_TIMEOUT_S):
            _say(line)
        code = child.wait()
        _say(f"ERROR: dagster dev exited unexpectedly with code {code}")
        return _exit_code(code)
    except (_Interrupted, KeyboardInterrupt):
        return 0
    finally:
        with _signals_deferred():
            _stop_child(child)


@contextmanager
def _demo_graph_api(url: str) -> Iterator[dict[str, str]]:
    """With MESSENGER_GRAPH_URL unset, a local Graph API serving the demo pages (a new
    message every 15 s) for as long as dev runs, its pages registered: Messenger
    threads flow into the UI with nothing to configure. Set, the real API is used."""
    if "messenger_graph_url" in settings.load().model_fields_set:
        yield {}
        return
    sim = graph_sim.demo_sim()
    stop = threading.Event()
    with graph_sim.serve(sim) as graph_url:
        threading.Thread(target=graph_sim.live_traffic, args=(sim, 15.0, stop), daemon=True).start()
        with psycopg.connect(url, autocommit=True) as conn:
            graph_sim.register_demo_pages(conn)
        _say(f"MESSENGER_GRAPH_URL is unset: demo Messenger pages served at {graph_url}")
        try:
            yield {
                "MESSENGER_GRAPH_URL": graph_url,
                "MESSENGER_PAGE_TOKENS": graph_sim.demo_tokens_json(),
            }
        finally:
            stop.set()


def _cmd_graph_sim(args: argparse.Namespace) -> int:
    """The local Graph API (demo pages, or one benchmark page) until interrupted."""
    return graph_sim.run(args)


def _cmd_dev(args: argparse.Namespace) -> int:
    if not _port_free(args.host, args.port):  # before anything starts: fail fast
        raise CliError(
            f"port {args.port} on {args.host} is already in use; pass --port to pick another"
        )
    url = database_url()
    _say(f"using {_describe(url)}")
    run_migrations(url)
    load_demo_data(url)
    with _demo_graph_api(url) as graph_env:
        code = run_dagster_dev(url, args.host, args.port, graph_env)
    with _signals_deferred():
        stop_embedded()
    _say("stopped" if code == 0 else f"exiting with code {code}")
    return code


# --- entry point -------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conversation-pipeline",
        description="Migrate, load demo data, or run Dagster locally. With DATABASE_URL unset, "
        "an embedded PostgreSQL in .pgdata (or $EMBEDDED_PGDATA) is used.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    migrate_cmd = commands.add_parser("migrate", help="apply (or revert) schema migrations")
    migrate_cmd.add_argument(
        "--down", type=int, metavar="VERSION", help="revert every migration newer than VERSION"
    )
    migrate_cmd.set_defaults(handler=_cmd_migrate)
    demo_cmd = commands.add_parser("demo", help="migrate, then load demo data (idempotent)")
    demo_cmd.set_defaults(handler=_cmd_demo)
    track_cmd = commands.add_parser(
        "track-deletes",
        help="print (or install with --apply) triggers that log the sessions a product "
        "deletes, so runs recompute only those instead of rescanning the table",
    )
    track_cmd.add_argument("crews", nargs="*", help="crew codes (all enabled crews if none)")
    track_cmd.add_argument("--apply", action="store_true", help="install the triggers")
    track_cmd.set_defaults(handler=_cmd_track_deletes)
    index_cmd = commands.add_parser(
        "search-indexes",
        help="give each client with enough vectors an HNSW index of its own (built "
        "CONCURRENTLY) and drop those of clients that shrank; what search_index_job does",
    )
    index_cmd.add_argument(
        "--min-vectors", type=int, metavar="N", help="live vectors a client needs (10,000)"
    )
    index_cmd.add_argument(
        "--max-indexes", type=int, metavar="N", help="at most this many, largest first (100)"
    )
    index_cmd.add_argument(
        "--build-memory-mb",
        type=int,
        metavar="MB",
        help="most maintenance_work_mem one build gets (1024; about 3 KB a 256-d vector)",
    )
    index_cmd.set_defaults(handler=_cmd_search_indexes)
    metrics_cmd = commands.add_parser(
        "metrics-server",
        help="serve Prometheus metrics (inbox, queues, latency histograms, last successes) "
        "read from the database at each scrape",
    )
    metrics_cmd.add_argument("--port", type=int, help="port (METRICS_SERVER_PORT, 9464)")
    metrics_cmd.add_argument("--host", help="address (METRICS_SERVER_HOST, 127.0.0.1)")
    metrics_cmd.set_defaults(handler=_cmd_metrics_server)
    status_cmd = commands.add_parser(
        "status", help="print the dashboard: queue depth, throughput, p50/p95/p99, health"
    )
    status_cmd.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C"
    )
    status_cmd.set_defaults(handler=_cmd_status)
    sim_cmd = commands.add_parser(
        "graph-sim", help="serve a local Graph API with demo Messenger pages"
    )
    graph_sim.add_arguments(sim_cmd)
    sim_cmd.set_defaults(handler=_cmd_graph_sim)
    dev_cmd = commands.add_parser(
        "dev", help="migrate, load demo data and run the Dagster UI and daemon"
    )
    dev_cmd.add_argument("--port", type=int, default=3000, help="webserver port (3000)")
    dev_cmd.add_argument("--host", default="127.0.0.1", help="webserver host (127.0.0.1)")
    dev_cmd.set_defaults(handler=_cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the embedded server (if started here) is stopped on the way out."""
    args = _parser().parse_args(argv)
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        # SIGTERM behaves like Ctrl-C, so that the finally blocks stop what we started.
        # SIGINT is set explicitly too: a shell starts background jobs with SIGINT
        # ignored, Python then installs no handler, and `kill -INT` would do nothing
        # (and dagster dev would inherit the ignored SIGINT and never shut down).
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        return int(args.handler(args))
    except (_Interrupted, KeyboardInterrupt):
        _say("interrupted")
        return 130
    except (CliError, settings.SettingError, psycopg.OperationalError) as error:
        _say(f"ERROR: {error}")
        return 1
    finally:
        with _signals_deferred():
            stop_embedded()
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
