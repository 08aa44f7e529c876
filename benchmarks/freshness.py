"""End-to-end freshness: a message's commit to its session in ``discovered_sessions``.

Run it beside a live ``scripts/dev`` (sensor on, default settings):

    .venv/bin/python benchmarks/freshness.py --minutes 5

It commits a message to a brand-new session of one crew every few seconds, at
random points of the sensor's cycle, and polls ``discovered_sessions`` until each
session appears. The latency is bounded by the sensor interval
(DISCOVERY_SENSOR_INTERVAL_SECONDS) plus the run's start-up (a new process that
loads the code) and the run itself.
"""

import argparse
import json
import random
import statistics
import time
import uuid

import psycopg
from psycopg import sql

from conversation_assets import settings


def database_url() -> str:
    url = settings.load().database_url
    if url:
        return url
    from conversation_assets.embedded import default_data_dir, start_embedded

    # Attach to the server scripts/dev started; never stop it on exit.
    return start_embedded(default_data_dir(), cleanup_mode=None).url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--every", type=float, default=6.0, help="mean seconds between messages")
    args = parser.parse_args()

    rng = random.Random(42)
    with psycopg.connect(database_url(), autocommit=True) as conn:
        crew_code, table = conn.execute(
            "SELECT crew_code, histories_table FROM crews WHERE enabled ORDER BY crew_code LIMIT 1"
        ).fetchone()
        insert = sql.SQL("INSERT INTO {} (session_id, message) VALUES (%s, %s)").format(
            sql.Identifier(*table.split("."))
        )
        is_uuid = conn.execute(
            "SELECT format_type(atttypid, atttypmod) = 'uuid' FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = 'session_id'",
            (table,),
        ).fetchone()[0]
        waiting: dict[str, float] = {}
        latencies: list[float] = []
        deadline = time.monotonic() + args.minutes * 60
        next_send = time.monotonic()
        while time.monotonic() < deadline or waiting:
            now = time.monotonic()
            if now >= next_send and now < deadline:
                session = str(uuid.uuid4()) if is_uuid else f"freshness-{uuid.uuid4().hex[:12]}"
                message = {"type": "human", "content": "freshness probe", "additional_kwargs": {}}
                conn.execute(insert, (session, json.dumps(message)))  # autocommit: committed
                waiting[session] = time.monotonic()
                next_send = now + rng.uniform(0.5, 1.5) * args.every
            if waiting:
                found = conn.execute(
                    "SELECT session_id FROM discovered_sessions "
                    "WHERE crew_code = %s AND session_id = ANY(%s)",
                    (crew_code, list(waiting)),
                ).fetchall()
                for (session,) in found:
                    latencies.append(time.monotonic() - waiting.pop(session))
                    print(f"{len(latencies):3d}  {latencies[-1]:6.1f} s", flush=True)
            if time.monotonic() > deadline + 300:
                print(f"gave up on {len(waiting)} sessions (is the sensor running?)")
                break
            time.sleep(0.25)

    if len(latencies) >= 2:
        quantiles = statistics.quantiles(latencies, n=20)
        print(
            f"crew {crew_code}: {len(latencies)} messages; commit -> discovered_sessions "
            f"p50 {statistics.median(latencies):.1f} s, p95 {quantiles[18]:.1f} s, "
            f"max {max(latencies):.1f} s"
        )


if __name__ == "__main__":
    main()
