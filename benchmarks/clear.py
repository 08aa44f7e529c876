"""The cost of reflecting an n8n ``clear()``: whole-table rescan vs the change log.

    .venv/bin/python benchmarks/clear.py [--rows 1000000]

One n8n-shaped table (no created_at, no session_id index) is discovered; then one
session is cleared and the next incremental run is timed twice:
  (1) without the change log: the run rescans the table (whole-crew recompute);
  (2) with `track-deletes` triggers and the advised session_id index: the run
      recomputes only the cleared session.
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from conversation_assets import demo, migrate, settings
from conversation_assets.discovery import discover, histories_identifier
from conversation_assets.embedded import get_server, scratch_database
from conversation_assets.queries import query
from resources.postgres import PostgresResource

TABLE = "clear_histories"


def _clear_one_session(conn: psycopg.Connection) -> str:
    session = conn.execute(
        sql.SQL("SELECT session_id FROM {} ORDER BY id DESC LIMIT 1").format(sql.Identifier(TABLE))
    ).fetchone()[0]
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE session_id = %s").format(sql.Identifier(TABLE)), (session,)
    )
    conn.execute("SELECT pg_stat_force_next_flush()")
    time.sleep(0.2)
    return session


def _timed_run(pool) -> tuple[float, bool, int]:
    started = time.perf_counter()
    report = discover(pool, progress=lambda _: None)
    outcome = report.outcomes[0]
    return (
        (time.perf_counter() - started) * 1000,
        outcome.reconciled,
        outcome.logged_sessions_recomputed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()

    base_url = settings.load().database_url
    workdir, server = None, None
    if not base_url:
        workdir = Path(tempfile.mkdtemp(prefix="clear-bench-"))
        server = get_server(workdir / "data", cleanup_mode="delete")
        base_url = server.get_uri()
    try:
        with scratch_database(base_url, "bench_clear") as url:
            with psycopg.connect(url, autocommit=True) as conn:
                migrate.upgrade(conn)
                demo.create_histories_table(conn, TABLE, "n8n")
                rows = demo.fill_histories(conn, TABLE, "n8n", sessions=args.rows // 10, seed=1)
                conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(TABLE)))
                conn.execute("INSERT INTO crews VALUES ('crew', 'acme', %s)", (TABLE,))
                resource = PostgresResource(database_url=url)
                discover(resource.pool, progress=lambda _: None)
                print(f"{rows:,} rows in one n8n table, discovered")

                _clear_one_session(conn)
                rescan_ms, reconciled, _ = _timed_run(resource.pool)
                print(
                    f"(1) clear() then run, no change log: {rescan_ms:8.1f} ms "
                    f"(whole-crew recompute: {reconciled})"
                )

                conn.execute(query("track_changes", histories=histories_identifier("crew", TABLE)))
                conn.execute(
                    sql.SQL("CREATE INDEX ON {} (session_id)").format(sql.Identifier(TABLE))
                )
                discover(resource.pool, progress=lambda _: None)  # picks up the triggers
                _clear_one_session(conn)
                logged_ms, reconciled, logged = _timed_run(resource.pool)
                print(
                    f"(2) clear() then run, change log + index: {logged_ms:8.1f} ms "
                    f"(whole-crew recompute: {reconciled}, sessions recomputed: {logged})"
                )
                print(f"ratio (1)/(2): {rescan_ms / logged_ms:.0f}x")
                resource.close()
    finally:
        if server is not None:
            server.cleanup()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
