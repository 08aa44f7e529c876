"""End-to-end freshness, idle cost and first start of a live ``scripts/dev``.

Run it beside a live ``scripts/dev`` (sensors on, default settings):

    .venv/bin/python benchmarks/freshness.py --minutes 5            # freshness
    .venv/bin/python benchmarks/freshness.py --idle-minutes 15      # idle cost
    .venv/bin/python benchmarks/freshness.py --first-start          # start scripts/dev now

Freshness: it commits a message to a brand-new session of one crew every few seconds,
at random points of the sensors' cycles, and polls until each one reaches every table:
its session in ``discovered_sessions``, its row in ``conversations``, its row in
``enriched_conversations``, its vector (``conversations.embedding``), the enriched row's
``has_embedding``, and its day of ``conversation_metrics`` refreshed after its enriched
row was written. p50/p95/max of each, from the commit.

Idle: writes nothing and counts the runs Dagster launched (by job), and the CPU seconds
used by the Dagster processes (webserver, daemon, code server, run workers) and by the
embedded PostgreSQL, per hour.

First start: run it just before ``scripts/dev`` starts on a fresh ``EMBEDDED_PGDATA``;
it waits for the database, then follows Dagster's runs until none has been queued or
running for ``--quiet-seconds``: runs launched (by job), most runs of one job at a
time, most runs at a time, and the seconds from the first run to the last run's end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from conversation_assets import settings

STAGES = ["discovered", "conversation", "enriched", "vector", "embedding_flag", "metrics"]
BARS = {
    "discovered": 15,
    "conversation": 20,
    "enriched": 20,
    "vector": 60,
    "embedding_flag": 60,
    "metrics": 120,
}
ACTIVE = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")


def urls() -> tuple[str, str]:
    """(pipeline database, Dagster's storage database), both plain psycopg URLs."""
    current = settings.load()
    if current.database_url:
        dagster = current.dagster_pg_url or current.database_url
        return current.database_url, dagster.replace("postgresql+psycopg2://", "postgresql://")
    from conversation_assets.embedded import default_data_dir, start_embedded

    # Attach to the server scripts/dev started; never stop it on exit.
    server = start_embedded(default_data_dir(), cleanup_mode=None)
    return server.url, server.dagster_url.replace("postgresql+psycopg2://", "postgresql://")


def quantiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):5.1f} s  p95 {p95:5.1f} s  max {ordered[-1]:5.1f} s"


# --- Freshness -----------------------------------------------------------------------


def freshness(url: str, minutes: float, every: float) -> dict[str, list[float]]:
    rng = random.Random(42)
    with psycopg.connect(url, autocommit=True) as conn:
        crew_code, client_code, table = conn.execute(
            "SELECT crew_code, client_code, histories_table FROM crews WHERE enabled "
            "ORDER BY crew_code LIMIT 1"
        ).fetchone()
        insert = sql.SQL("INSERT INTO {} (session_id, message) VALUES (%s, %s)").format(
            sql.Identifier(*table.split("."))
        )
        is_uuid = conn.execute(
            "SELECT format_type(atttypid, atttypmod) = 'uuid' FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = 'session_id'",
            (table,),
        ).fetchone()[0]
        sent: dict[str, float] = {}
        reached: dict[str, dict[str, float]] = {}
        enriched_at: dict[str, object] = {}
        deadline = time.monotonic() + minutes * 60
        next_send = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_send and now < deadline:
                session = str(uuid.uuid4()) if is_uuid else f"freshness-{uuid.uuid4().hex[:12]}"
                text = "Hello, my parcel has not arrived yet, could you check where it is?"
                message = {"type": "human", "content": text, "additional_kwargs": {}}
                conn.execute(insert, (session, json.dumps(message)))  # autocommit: committed
                sent[session], reached[session] = time.monotonic(), {}
                next_send = now + rng.uniform(0.5, 1.5) * every
            waiting = [s for s in sent if len(reached[s]) < len(STAGES)]
            if not waiting and now >= deadline:
                break
            if waiting:
                rows = conn.execute(
                    """SELECT d.session_id, c.id IS NOT NULL, e.id IS NOT NULL,
                              c.embedding IS NOT NULL, coalesce(e.has_embedding, false),
                              e.enriched_at,
                              (SELECT max(m.refreshed_at) FROM conversation_metrics AS m
                                WHERE m.client_code = e.client_code
                                  AND m.day = (e.created_at AT TIME ZONE 'UTC')::date)
                       FROM discovered_sessions AS d
                       LEFT JOIN conversations AS c
                              ON c.crew_code = d.crew_code AND c.session_id = d.session_id
                       LEFT JOIN enriched_conversations AS e ON e.id = c.id
                       WHERE d.crew_code = %s AND d.session_id = ANY(%s)""",
                    (crew_code, waiting),
                ).fetchall()
                stamp = time.monotonic()
                for session, conv, enr, vec, flag, at, refreshed in rows:
                    got = reached[session]
                    if enr and session not in enriched_at:
                        enriched_at[session] = at
                    first_at = enriched_at.get(session)
                    for stage, ok in (
                        ("discovered", True),
                        ("conversation", conv),
                        ("enriched", enr),
                        ("vector", vec),
                        ("embedding_flag", flag),
                        (
                            "metrics",
                            refreshed is not None
                            and first_at is not None
                            and refreshed >= first_at,
                        ),
                    ):
                        if ok and stage not in got:
                            got[stage] = stamp - sent[session]
                if len(sent) and stamp > deadline + 600:
                    print(f"gave up on {len(waiting)} sessions (are the sensors running?)")
                    break
            time.sleep(0.25)
    print(f"crew {crew_code} (client {client_code}): {len(sent)} messages")
    return {stage: [r[stage] for r in reached.values() if stage in r] for stage in STAGES}


# --- Dagster's runs and the machine --------------------------------------------------


def runs_since(
    dagster_url: str, since: float
) -> list[tuple[str, str, float, float | None, float | None]]:
    """(job, status, created, started, ended) of the runs created since ``since`` (epoch)."""
    with psycopg.connect(dagster_url, autocommit=True) as conn:
        return conn.execute(
            """SELECT pipeline_name, status, extract(epoch FROM create_timestamp)::float8,
                      start_time, end_time
               FROM runs WHERE create_timestamp >= to_timestamp(%s) AT TIME ZONE 'UTC'
               ORDER BY create_timestamp""",
            (since,),
        ).fetchall()


def _tree(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    found = []
    for root in roots:
        try:
            found.append(root)
            found.extend(root.children(recursive=True))
        except psutil.Error:
            continue
    return found


def watched_processes(pgdata: Path) -> list[psutil.Process]:
    """The scripts/dev tree (conversation-pipeline dev, dagster dev and their children)
    and the embedded PostgreSQL of ``pgdata`` with its backends."""
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "conversation-pipeline dev" in cmdline or cmdline.endswith("conversation-pipeline dev"):
            roots.append(process)
    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        try:
            roots.append(psutil.Process(int(pid_file.read_text().split()[0])))
        except (psutil.Error, ValueError):
            pass
    return _tree(roots)


class CpuMeter:
    """CPU seconds of a process set, sampled every second (short-lived run workers are
    counted up to their last sample)."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata, self.seen = pgdata, {}

    def sample(self) -> None:
        for process in watched_processes(self.pgdata):
            try:
                times = process.cpu_times()
                self.seen[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:
                continue

    def total(self, baseline: dict) -> float:
        return sum(v - baseline.get(k, 0.0) for k, v in self.seen.items())


def idle(dagster_url: str, pgdata: Path, minutes: float) -> None:
    meter = CpuMeter(pgdata)
    meter.sample()
    baseline, began = dict(meter.seen), time.time()
    load_before = os.getloadavg()
    deadline = time.monotonic() + minutes * 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        meter.sample()
    seconds = time.time() - began
    runs = runs_since(dagster_url, began)
    per_hour = 3600 / seconds
    by_job = Counter(job for job, *_ in runs)
    cpu = meter.total(baseline)
    print(
        f"idle {seconds / 60:.1f} min: {len(runs)} runs launched ({dict(by_job) or 'none'}), "
        f"{len(runs) * per_hour:.1f} per hour; CPU {cpu:.1f} s "
        f"({cpu * per_hour:.0f} CPU s per hour, {100 * cpu / seconds:.1f}% of one core) "
        f"by scripts/dev's processes and its PostgreSQL; machine load "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )


def first_start(url_getter, pgdata: Path, quiet_seconds: float, timeout: float) -> None:
    began = time.time()
    print("waiting for scripts/dev's database...", flush=True)
    while True:
        try:
            _, dagster_url = url_getter()
            with psycopg.connect(dagster_url, connect_timeout=3) as conn:
                conn.execute("SELECT 1 FROM runs LIMIT 1")
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() - began > timeout:
                raise
            time.sleep(1.0)
    meter = CpuMeter(pgdata)
    most_at_once, most_per_job = 0, Counter()
    quiet_since = None
    first_run = last_end = None
    load_peak = 0.0
    while time.time() - began < timeout:
        meter.sample()
        load_peak = max(load_peak, os.getloadavg()[0])
        runs = runs_since(dagster_url, began - 60)
        active = [r for r in runs if r[1] in ("STARTING", "STARTED")]
        most_at_once = max(most_at_once, len(active))
        for job, count in Counter(r[0] for r in active).items():
            most_per_job[job] = max(most_per_job[job], count)
        if runs:
            first_run = first_run or min(r[2] for r in runs)
            ends = [r[4] for r in runs if r[4]]
            last_end = max(ends) if ends else last_end
        busy = [r for r in runs if r[1] in ACTIVE]
        if runs and not busy:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since >= quiet_seconds:
                break
        else:
            quiet_since = None
        time.sleep(0.5)
    runs = runs_since(dagster_url, began - 60)
    by_job = Counter(r[0] for r in runs)
    print(
        f"first start: {len(runs)} runs ({dict(by_job)}); at most {most_at_once} running at "
        f"once, at most {max(most_per_job.values(), default=0)} of one job "
        f"({dict(most_per_job)}); first run created {first_run - began:.0f} s after the "
        f"database answered, last run ended {last_end - first_run:.0f} s after the first was "
        f"created; CPU {meter.total({}):.0f} s by scripts/dev's processes and its PostgreSQL; "
        f"peak load average {load_peak:.2f}"
        if first_run and last_end
        else f"first start: {len(runs)} runs; never quiet within {timeout:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--every", type=float, default=6.0, help="mean seconds between messages")
    parser.add_argument("--idle-minutes", type=float, help="measure an idle period instead")
    parser.add_argument("--first-start", action="store_true", help="follow a first start")
    parser.add_argument("--quiet-seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    from conversation_assets.embedded import default_data_dir

    pgdata = default_data_dir()
    if args.first_start:
        first_start(urls, pgdata, args.quiet_seconds, args.timeout)
        return
    url, dagster_url = urls()
    if args.idle_minutes:
        idle(dagster_url, pgdata, args.idle_minutes)
        return
    began = time.time()
    load_before = os.getloadavg()
    reached = freshness(url, args.minutes, args.every)
    runs = runs_since(dagster_url, began)
    print(f"runs launched meanwhile: {dict(Counter(r[0] for r in runs))}")
    print(f"machine load: {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    for stage in STAGES:
        values = reached[stage]
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if values else None
        verdict = "" if p95 is None else ("  meets" if p95 <= BARS[stage] else "  MISSES")
        print(
            f"commit -> {stage:15s} {len(values):3d}  {quantiles(values)}"
            f"   (bar p95 <= {BARS[stage]} s){verdict}"
        )


if __name__ == "__main__":
    main()
