"""Discovery benchmark: incremental discovery against the per-session discovery queries it
replaces (SELECT DISTINCT + one query per new session), same data, same run.

Run: ``python benchmarks/discovery.py [--rows 1000000] [--crews 20] [--new 1000]
[--repeats 5] [--ticks 20] [--keep-db] [--shared-buffers 4GB]``. Uses an embedded
PostgreSQL in the system temp dir, or ``DATABASE_URL`` (in a database it creates and
drops). See README.md.

DB time is the server's own measure: ``pg_stat_database.active_time`` (time backends
of this database spent running statements), read around each measured window after
forcing the measured connections to flush their statistics.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from conversation_assets import demo, migrate, settings
from conversation_assets.discovery import discover, probe_new_work
from conversation_assets.embedded import get_server, scratch_database
from resources.postgres import PostgresResource

MEAN_SESSION_LENGTH = 9.94  # of demo.fill_histories' length distribution
AFFECTED_CREWS = 4  # the new messages land in this many crews
FLUSH_WAIT = 0.05  # seconds for a forced statistics flush to land


def quiet(_: str) -> None:
    """Discovery's progress lines, dropped: printing is not what is measured."""


# --- Machine and database -------------------------------------------------------


def machine() -> dict[str, str]:
    """Cores, CPU, RAM and load: the figures are meaningless without them."""
    info = {"cores": str(os.cpu_count()), "python": platform.python_version()}
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    try:
        kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        info["ram"] = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        info["ram"] = "unknown"
    return info


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The embedded server's options every benchmark takes."""
    parser.add_argument(
        "--shared-buffers",
        help="restart the embedded server with this much buffer cache (e.g. 4GB)",
    )


def server_settings(conn: psycopg.Connection) -> str:
    """The server's version and buffer cache, for a benchmark's header."""
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('shared_buffers'),"
        " current_setting('wal_buffers')"
    ).fetchone()
    if not row:
        return "PostgreSQL ?"
    return f"PostgreSQL {row[0]}, shared_buffers {row[1]}, wal_buffers {row[2]}"


@contextmanager
def database(keep: bool, shared_buffers: str | None = None) -> Iterator[str]:
    """A fresh database: on DATABASE_URL if set, else on an embedded PostgreSQL.

    ``shared_buffers`` (e.g. ``4GB``) restarts the embedded server with that much
    buffer cache instead of PostgreSQL's default 128 MB, to measure a server sized
    for its data; with DATABASE_URL the server's own setting stands.
    """
    base_url = settings.load().database_url
    server, workdir = None, None
    if not base_url:
        workdir = Path(tempfile.mkdtemp(prefix="discovery-bench-"))
        server = get_server(workdir / "data", cleanup_mode=None if keep else "delete")
        base_url = server.get_uri()
        if shared_buffers:
            with psycopg.connect(base_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(
                        sql.Literal(shared_buffers)
                    )
                )
            server.stop()  # shared_buffers takes a restart
            server.start()
    elif shared_buffers:
        print("--shared-buffers is ignored with DATABASE_URL: the server's setting stands")
    try:
        with scratch_database(base_url, "bench_discovery", keep=keep) as url:
            yield url
            if keep:
                print(f"\nkept database: {url}")
                if workdir:
                    print(f"(embedded server still running, data in {workdir / 'data'})")
    finally:
        if server is not None and not keep:
            server.cleanup()
        if workdir is not None and not keep:
            shutil.rmtree(workdir, ignore_errors=True)


class DbClock:
    """Server-side time of a window, from ``pg_stat_database.active_time`` (ms).

    Backends publish their counters lazily (at most once a second, or at exit), so a
    measured connection is asked to flush (``pg_stat_force_next_flush()``) before it
    is read. The monitor's own two statements per reading are the noise, measured
    by :meth:`calibrate` and subtracted.
    """

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.noise = 0.0

    def read(self) -> float:
        flush(self.conn)
        row = self.conn.execute(
            "SELECT active_time FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        assert row is not None
        return float(row[0])

    def calibrate(self) -> None:
        samples = []
        for _ in range(7):
            before = self.read()
            samples.append(self.read() - before)
        self.noise = statistics.median(samples)

    def since(self, before: float) -> float:
        return max(self.read() - before - self.noise, 0.0)


def flush(conn: psycopg.Connection) -> None:
    """Make the backend publish its statistics as soon as this statement ends."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(FLUSH_WAIT)


# --- Building the histories -----------------------------------------------------


@dataclass(frozen=True)
class CrewSpec:
    crew_code: str
    client_code: str
    table: str
    shape: str


def crew_specs(crews: int) -> list[CrewSpec]:
    """Four crews a client, shapes in turn, every fifth table in a schema of its own."""
    specs = []
    for number in range(crews):
        client = f"client{number // 4 + 1:02d}"
        crew = f"{client}_crew{number % 4 + 1}"
        table = f"bench.{crew}_histories" if number % 5 == 4 else f"{crew}_histories"
        specs.append(
            CrewSpec(crew, client, table, demo.HISTORY_SHAPES[number % len(demo.HISTORY_SHAPES)])
        )
    return specs


def build(url: str, specs: list[CrewSpec], rows: int) -> int:
    """Create and fill every crew's table (in parallel, one connection per worker)."""
    with psycopg.connect(url, autocommit=True) as conn:
        migrate.upgrade(conn)
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
        for spec in specs:
            demo.create_histories_table(conn, spec.table, spec.shape)
            conn.execute(
                "INSERT INTO crews (crew_code, client_code, histories_table) VALUES (%s, %s, %s)",
                (spec.crew_code, spec.client_code, spec.table),
            )
    sessions = max(1, round(rows / len(specs) / MEAN_SESSION_LENGTH))

    def fill(item: tuple[int, CrewSpec]) -> int:
        number, spec = item
        with psycopg.connect(url, autocommit=True) as conn:
            added = demo.fill_histories(
                conn, spec.table, spec.shape, sessions=sessions, seed=1000 + number, malformed=5
            )
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(identifier(spec.table)))
        return added

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return sum(pool.map(fill, enumerate(specs)))


def identifier(table: str) -> sql.Identifier:
    return sql.Identifier(*table.split("."))


# --- The four measurements ------------------------------------------------------


@dataclass
class Figure:
    wall_ms: float
    db_ms: float


def per_session_queries(conn: psycopg.Connection, specs: list[CrewSpec]) -> tuple[int, int]:
    """The per-session discovery the pipeline replaces: DISTINCT over every table, diff
    against the known sessions, then one metadata query per new session. Read-only.
    Returns (new sessions, queries).

    An empty session id is never discovered, so it looks new to every run and costs a
    query each time, as it would have in the seed; it is not counted as a new session."""
    found, queries = 0, 0
    for spec in specs:
        table = identifier(spec.table)
        distinct = {
            str(s)
            for (s,) in conn.execute(sql.SQL("SELECT DISTINCT session_id FROM {}").format(table))
        }
        known = {
            s
            for (s,) in conn.execute(
                "SELECT session_id FROM discovered_sessions WHERE crew_code = %s",
                (spec.crew_code,),
            )
        }
        queries += 2
        for session_id in sorted(distinct - known):
            conn.execute(
                sql.SQL("SELECT count(*), min(id), max(id) FROM {} WHERE session_id = %s").format(
                    table
                ),
                (session_id,),
            ).fetchone()
            found += 1 if session_id.strip() else 0
            queries += 1
    return found, queries


def bare_query(conn: psycopg.Connection, specs: list[CrewSpec], marks: dict[str, int]) -> int:
    """The physical floor: one set-based GROUP BY past the watermark per affected crew."""
    rows = 0
    for spec in specs:
        result = conn.execute(
            sql.SQL(
                """SELECT session_id, count(*), min(id), max(id) FROM {}
                   WHERE id > %s GROUP BY session_id"""
            ).format(identifier(spec.table)),
            (marks[spec.crew_code],),
        ).fetchall()
        rows += sum(r[1] for r in result)
    return rows


def watermarks(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT crew_code, high_water_id FROM crew_discovery_state").fetchall()
    return dict(rows)


def timed(clock: DbClock, conn: psycopg.Connection, work: Callable[[], Any]) -> tuple[Figure, Any]:
    """Wall and DB time of ``work`` run on ``conn``."""
    flush(conn)  # what ran before on this connection is not part of the window
    before = clock.read()
    started = time.perf_counter()
    result = work()
    wall = (time.perf_counter() - started) * 1000
    flush(conn)
    return Figure(wall, clock.since(before)), result


@contextmanager
def warm_pool(url: str, name: str) -> Iterator[tuple[Any, Figure]]:
    """A fresh pool whose connection has already run one discovery with nothing new,
    as a long-lived process's would have: (pool, that warm-up run's figure)."""
    resource = PostgresResource(database_url=url, application_name=name)
    try:
        pool = resource.pool
        started = time.perf_counter()
        discover(pool, mode="incremental", progress=quiet)
        yield pool, Figure((time.perf_counter() - started) * 1000, 0.0)
    finally:
        resource.close()


def incremental(clock: DbClock, pool: Any) -> tuple[Figure, Any]:
    """Wall and DB time of one ``discover`` run over every crew."""
    with pool.connection() as conn:
        flush(conn)
    before = clock.read()
    started = time.perf_counter()
    report = discover(pool, mode="incremental", progress=quiet)
    wall = (time.perf_counter() - started) * 1000
    with pool.connection() as conn:
        flush(conn)
    return Figure(wall, clock.since(before)), report


def median(figures: list[Figure]) -> Figure:
    return Figure(
        statistics.median(f.wall_ms for f in figures), statistics.median(f.db_ms for f in figures)
    )


def spread(figures: list[Figure]) -> str:
    walls = [f.wall_ms for f in figures]
    return f"{min(walls):.1f}–{max(walls):.1f}"


# --- Main -----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="total history rows")
    parser.add_argument("--crews", type=int, default=20, help="crews (histories tables)")
    parser.add_argument("--new", type=int, default=1_000, help="new messages per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements of (a), (c), (d)")
    parser.add_argument("--ticks", type=int, default=20, help="sensor ticks measured for (b)")
    parser.add_argument("--keep-db", action="store_true", help="keep the database afterwards")
    add_server_arguments(parser)
    args = parser.parse_args()
    if args.crews < 1 or args.rows < args.crews or args.new < 1:
        parser.error("need --crews >= 1, --rows >= --crews and --new >= 1")

    began = time.perf_counter()
    info = machine()
    print(f"discovery benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {info['cores']} cores ({info['cpu']}), {info['ram']} RAM, ", end="")
    print(f"Python {info['python']}, load average {load_average()}")

    with database(args.keep_db, args.shared_buffers) as url:
        specs = crew_specs(args.crews)
        affected = specs[: min(AFFECTED_CREWS, len(specs))]
        started = time.perf_counter()
        total = build(url, specs, args.rows)
        load_s = time.perf_counter() - started

        work = psycopg.connect(url, autocommit=True)
        print(f"{server_settings(work)}; ", end="")
        print(f"{total:,} rows in {len(specs)} tables, built in {load_s:.1f} s")

        started = time.perf_counter()
        resource = PostgresResource(database_url=url, application_name="bench-initial")
        initial = discover(resource.pool, mode="incremental", progress=quiet)
        resource.close()
        initial_s = time.perf_counter() - started
        if initial.failed:
            raise SystemExit(f"initial discovery failed: {[o.error for o in initial.failed]}")
        # In a deployment the conversations step, in the same job, drains what discovery
        # queued; here nothing does, and a queue holding every session made each crew's
        # step about 6 ms slower (1M rows: 105.8 ms vs 81.2 ms). Measure the steady state.
        work.execute("TRUNCATE conversation_queue")
        work.execute(
            "VACUUM ANALYZE discovered_sessions, crew_discovery_state, discovery_rejects, "
            "conversation_queue"
        )
        sessions = work.execute("SELECT count(*) FROM discovered_sessions").fetchone()
        print(
            f"initial discovery: {initial.total('rows_scanned'):,} rows, "
            f"{sessions[0] if sessions else 0:,} sessions, "
            f"{initial.total('rejected_rows')} rejected, in {initial_s:.1f} s"
        )

        clock = DbClock(url)
        clock.calibrate()
        per_crew = args.new // len(affected)
        a_runs, c_runs, d_runs, warmups = [], [], [], []
        affected_ms, idle_ms = [], []
        for repeat in range(args.repeats):
            with warm_pool(url, f"bench-discovery-{repeat}") as (pool, warm):
                for number, spec in enumerate(affected):
                    count = per_crew + (args.new - per_crew * len(affected) if number == 0 else 0)
                    seed = 10_000 + repeat * 100 + number
                    demo.add_messages(work, spec.table, spec.shape, count=count, seed=seed)
                # Both read-only, on the same new messages, before (a) consumes them.
                marks = watermarks(work)
                c_fig, (c_new, c_queries) = timed(
                    clock, work, lambda: per_session_queries(work, specs)
                )
                d_fig, d_rows = timed(
                    clock, work, lambda marks=marks: bare_query(work, affected, marks)
                )
                a_fig, report = incremental(clock, pool)
            if report.failed:
                raise SystemExit(f"discovery failed: {[o.error for o in report.failed]}")
            scanned, a_new = report.total("rows_scanned"), report.total("sessions_new")
            if scanned != args.new or d_rows != args.new or a_new != c_new:
                raise SystemExit(
                    f"runs disagree: (a) read {scanned} rows and found {a_new} new sessions, "
                    f"(c) found {c_new}, (d) read {d_rows}; expected {args.new} rows"
                )
            codes = {spec.crew_code for spec in affected}
            affected_ms.append(sum(o.seconds for o in report.outcomes if o.crew_code in codes))
            idle_ms.append(sum(o.seconds for o in report.outcomes if o.crew_code not in codes))
            a_runs.append(a_fig)
            c_runs.append(c_fig)
            d_runs.append(d_fig)
            warmups.append(warm)
            print(
                f"  run {repeat + 1}: (a) {a_fig.wall_ms:.1f} ms wall / {a_fig.db_ms:.1f} ms DB, "
                f"(c) {c_fig.wall_ms:.0f} ms ({c_new} new sessions, {c_queries} queries), "
                f"(d) {d_fig.wall_ms:.1f} ms"
            )

        # (b): nothing is new now; the sensor's cursor is every crew's watermark.
        cursor = watermarks(work)
        probe_new_work(work, cursor)  # warm the caches
        ticks = []
        for _ in range(args.ticks):
            figure, (found, problems) = timed(clock, work, lambda: probe_new_work(work, cursor))
            if found or problems:
                raise SystemExit(f"sensor tick found work or problems: {found} {problems}")
            ticks.append(figure)
        max_ids = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT max(id) FROM {}").format(identifier(spec.table)) for spec in specs
        )
        probes, single = [], []
        for _ in range(args.ticks):
            probes.append(timed(clock, work, lambda: [work.execute(q) for q in separate(specs)])[0])
            single.append(timed(clock, work, lambda: work.execute(first_probe(specs)))[0])
        union, _ = timed(clock, work, lambda: work.execute(max_ids).fetchall())
        work.close()

        report_figures(
            args, total, median(a_runs), median(c_runs), median(d_runs), median(ticks),
            median(probes), median(single), union, a_runs, c_runs, d_runs, ticks,
            statistics.median(affected_ms) * 1000, statistics.median(idle_ms) * 1000,
            median(warmups), clock.noise, len(affected), len(specs),
        )  # fmt: skip
    print(f"\nload average at the end {load_average()}; ", end="")
    print(f"benchmark took {time.perf_counter() - began:.0f} s in all")


def separate(specs: list[CrewSpec]) -> list[sql.Composed]:
    return [sql.SQL("SELECT max(id) FROM {}").format(identifier(spec.table)) for spec in specs]


def first_probe(specs: list[CrewSpec]) -> sql.Composed:
    return separate(specs[:1])[0]


def report_figures(
    args: argparse.Namespace,
    total: int,
    a: Figure,
    c: Figure,
    d: Figure,
    b: Figure,
    probes: Figure,
    single: Figure,
    union: Figure,
    a_runs: list[Figure],
    c_runs: list[Figure],
    d_runs: list[Figure],
    ticks: list[Figure],
    affected_ms: float,
    idle_ms: float,
    warm: Figure,
    noise: float,
    affected: int,
    crews: int,
) -> None:
    """The table: medians, ranges, ratios and the performance bars."""
    width = 70
    print("\n" + "=" * (width + 30))
    print(
        f"{total:,} rows, {crews} crews; {args.new:,} new messages in {affected} crews; "
        f"medians of {len(a_runs)} runs ((b): {len(ticks)} ticks)"
    )
    print(f"{'figure':<{width}} {'wall ms':>9} {'DB ms':>9}  wall range")
    rows = [
        ("(a) incremental discover(), all crews", a, spread(a_runs)),
        (
            "(c) per-session queries: DISTINCT per table + 1 query per new session",
            c,
            spread(c_runs),
        ),
        ("(d) bare GROUP BY session_id WHERE id > watermark, affected crews", d, spread(d_runs)),
        (f"(b) sensor tick, probe_new_work() over {crews} crews, nothing new", b, spread(ticks)),
        (f"    bare max(id) probes, {crews} tables, one query each", probes, ""),
        ("    bare max(id) probe, one table", single, ""),
        (f"    bare max(id) probes, {crews} tables in one UNION ALL (1 run)", union, ""),
    ]
    for label, figure, rng in rows:
        print(f"{label:<{width}} {figure.wall_ms:>9.1f} {figure.db_ms:>9.1f}  {rng}")
    print(
        f"    (a) per-crew time inside discover(): {affected_ms:.1f} ms for the {affected} "
        f"crews with new rows, {idle_ms:.1f} ms for the {crews - affected} without"
    )
    print(f"    (a) warm-up run with nothing new, same pool: {warm.wall_ms:.1f} ms wall")
    print(f"    DB-time noise subtracted per reading: {noise:.2f} ms")

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.1f}×" if y > 0 else "n/a"

    print("\nratios")
    print(f"  (c)/(a) wall {ratio(c.wall_ms, a.wall_ms)}, DB {ratio(c.db_ms, a.db_ms)}")
    print(f"  (a)/(d) wall {ratio(a.wall_ms, d.wall_ms)}, DB {ratio(a.db_ms, d.db_ms)}")
    at = "at this size" if total >= 10_000_000 else "(bars are for 10M rows)"
    print(f"\nperformance bars {at}")
    print(f"  (a) ≤ 100 ms (issue's floor): {a.wall_ms:.1f} ms wall → {ok(a.wall_ms <= 100)}")
    print(f"  (a) ≤ 20 ms DB time:           {a.db_ms:.1f} ms DB → {ok(a.db_ms <= 20)}")
    print(
        f"  (c)/(a) ≥ 100×:                {ratio(c.wall_ms, a.wall_ms)} wall → "
        f"{ok(c.wall_ms >= 100 * a.wall_ms)}"
    )
    print(f"  (b) ≤ 20 ms:                   {b.wall_ms:.1f} ms wall → {ok(b.wall_ms <= 20)}")


def ok(met: bool) -> str:
    return "met" if met else "NOT met"


if __name__ == "__main__":
    main()
