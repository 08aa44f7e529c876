"""Messenger sync: a simulated page of 10,000 threads of 20 messages, 50 ms per API call.

``python benchmarks/messenger.py [--threads 10000] [--messages 20] [--latency-ms 50]
[--changed 100]``. Starts the local Graph API (`conversation_assets.graph_sim`) in a
process of its own, and an embedded PostgreSQL (or uses DATABASE_URL). Times, in the
same run and against the same server:

- this project's sync: a full sync, then an incremental sync after `--changed`
  threads got two new messages each; then the build of the threads' conversations;
- the way the per-thread upserts this replaces worked ("before"): list 100 threads,
  then one upsert and one events insert per thread, each its own statement;
- the bulk version of that loop ("after"): list 100 threads, one bulk
  upsert per 100 threads, events in multi-row inserts of 500, fetching and writing
  in turn;
- two references: the list calls alone, nothing decoded or written (the floor), and
  our full sync with its Python work (decoding, parsing, COPY) moved to a child
  process, so that none of it shares the listing's GIL.

Neither of those two ways has an incremental mode: after the change they sync
the page again. Reported: API calls, wall time, database time (client-side time in
statements and COPY), the share of wall time spent waiting on the API, and the bars.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import requests
from psycopg_pool import ConnectionPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conversation_assets import migrate, settings  # noqa: E402
from conversation_assets.embedded import get_server, scratch_database  # noqa: E402
from conversation_assets.graph_sim import BENCH_PAGE, demo_token  # noqa: E402
from conversation_assets.messenger import (  # noqa: E402
    MESSAGE_FIELDS,
    THREAD_FIELDS,
    EventRow,
    Page,
    PageSync,
    SyncOptions,
    ThreadRow,
    build_thread_conversations,
    load_pages,
    parse_message,
    parse_thread,
    sync_page,
)
from conversation_assets.messenger_api import GraphClient, RawPage  # noqa: E402


@dataclass
class Figures:
    name: str
    calls: int
    wall: float
    db: float
    api: float
    threads: int
    messages: int

    def line(self) -> str:
        share = 100 * self.api / self.wall if self.wall else 0.0
        return (
            f"{self.name:<34} {self.calls:>6} calls  wall {self.wall:7.2f} s  "
            f"db {self.db:6.2f} s  waiting on API {share:5.1f}%  "
            f"({self.threads} threads, {self.messages} messages written)"
        )


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


@contextmanager
def graph_api(threads: int, messages: int, latency_ms: float) -> Iterator[str]:
    """The simulator in its own process (its JSON work does not share our GIL)."""
    process = subprocess.Popen(
        [
            sys.executable, "-m", "conversation_assets.graph_sim", "--port", "0",
            "--bench-threads", str(threads), "--bench-messages", str(messages),
            "--latency-ms", str(latency_ms),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("MESSENGER_GRAPH_URL="):
            raise RuntimeError(f"the simulator did not start: {line!r}")
        yield line.split("=", 1)[1]
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def databases(count: int) -> Iterator[list[str]]:
    base_url = settings.load().database_url
    server = None
    if not base_url:
        workdir = Path(tempfile.mkdtemp(prefix="messenger-bench-"))
        server = get_server(workdir / "data", cleanup_mode="delete")
        base_url = server.get_uri()
    try:
        with ExitStack() as stack:
            urls = [
                stack.enter_context(scratch_database(base_url, f"bench_messenger_{name}"))
                for name in "abcd"[:count]
            ]
            for url in urls:
                with psycopg.connect(url, autocommit=True) as conn:
                    migrate.upgrade(conn)
                    conn.execute(
                        "INSERT INTO messenger_pages (page_id, client_code, label) "
                        "VALUES (%s, 'bench', 'benchmark page')",
                        (BENCH_PAGE,),
                    )
            yield urls
    finally:
        if server is not None:
            server.cleanup()


def client(base: str) -> GraphClient:
    return GraphClient(base_url=base, token=demo_token(BENCH_PAGE), page_id=BENCH_PAGE)


def ours(pool: ConnectionPool, base: str, mode: str, name: str) -> Figures:
    with pool.connection() as conn:
        (page,) = load_pages(conn, [BENCH_PAGE])
    api = client(base)
    started = time.perf_counter()
    outcome = sync_page(pool, api, page, SyncOptions(mode=mode))  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    if outcome.status != "ok":
        raise RuntimeError(outcome.error)
    return Figures(
        name,
        outcome.calls,
        wall,
        outcome.db_seconds,
        outcome.api_seconds,
        outcome.threads_new + outcome.threads_updated,
        outcome.messages_new + outcome.messages_updated,
    )


# --- the references: the calls alone, and our Python work outside the GIL -------------


def _listing(api: GraphClient) -> Iterator[RawPage]:
    """Every list answer undecoded, each call made as soon as the last one's cursor is read."""
    params: dict[str, Any] = {
        "platform": "messenger",
        "fields": f"{THREAD_FIELDS},messages.limit(25){{{MESSAGE_FIELDS}}}",
        "limit": 100,
    }
    while True:
        page = api.get("list", f"{BENCH_PAGE}/conversations", params, raw=True)
        yield page
        if page.after is None:
            return
        params = {**params, "after": page.after}


def calls_alone(base: str) -> Figures:
    """The floor: every list call, each answer's cursor read, nothing decoded or written."""
    api = client(base)
    started = time.perf_counter()
    for _page in _listing(api):
        pass
    wall = time.perf_counter() - started
    return Figures("the calls alone (floor)", api.stats.calls, wall, 0.0, wall, 0, 0)


def _decode_and_write(url: str, base: str, pages: Any, done: Any) -> None:
    """A child process: our own decoding, parsing and writing, fed the listed bodies."""

    class FedSync(PageSync):
        def _listing(self) -> Iterator[tuple[dict[str, Any], str | None]]:
            while (item := pages.get()) is not None:
                yield RawPage(*item).body(), item[1]

    with ConnectionPool(url, min_size=3, max_size=6, kwargs={"autocommit": True}) as pool:
        with pool.connection() as conn:
            (page,) = load_pages(conn, [BENCH_PAGE])
        out = FedSync(pool, client(base), page, SyncOptions(mode="full"), lambda _: None).run()
        done.put((out.db_seconds, out.threads_new, out.messages_new))


def python_elsewhere(url: str, base: str) -> Figures:
    """Our full sync with its Python work (decode, parse, COPY) in a child process: what
    the listing gains when none of that shares its GIL. Not how the sync runs."""
    context = multiprocessing.get_context("spawn")
    pages, done = context.Queue(maxsize=3), context.Queue()
    child = context.Process(target=_decode_and_write, args=(url, base, pages, done))
    child.start()
    time.sleep(3)  # the child's imports, before the clock starts
    api = client(base)
    started = time.perf_counter()
    for page in _listing(api):
        pages.put((page.content, page.after))
    pages.put(None)
    db, threads, messages = done.get()
    wall = time.perf_counter() - started
    child.join()
    return Figures(
        "ours, Python work in a child process",
        api.stats.calls,
        wall,
        db,
        api.stats.api_seconds,
        threads,
        messages,
    )


# --- the two ways this replaces --------------------------------------------------------

_UPSERT_ONE = """
INSERT INTO messenger_conversations (page_id, sender_id, client_code, thread_id,
    participant_name, updated_time, message_count, unread_count, snippet, can_reply)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (page_id, sender_id) DO UPDATE
SET thread_id = EXCLUDED.thread_id, participant_name = EXCLUDED.participant_name,
    updated_time = EXCLUDED.updated_time, message_count = EXCLUDED.message_count,
    unread_count = EXCLUDED.unread_count, snippet = EXCLUDED.snippet,
    can_reply = EXCLUDED.can_reply, synced_at = now()
RETURNING page_id, sender_id, synced_at"""
_UPSERT_MANY = """
INSERT INTO messenger_conversations AS m (page_id, sender_id, client_code, thread_id,
    participant_name, updated_time, message_count, unread_count, snippet, can_reply)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
    %s::timestamptz[], %s::int[], %s::int[], %s::text[], %s::bool[])
ON CONFLICT (page_id, sender_id) DO UPDATE
SET thread_id = EXCLUDED.thread_id, participant_name = EXCLUDED.participant_name,
    updated_time = EXCLUDED.updated_time, message_count = EXCLUDED.message_count,
    unread_count = EXCLUDED.unread_count, snippet = EXCLUDED.snippet,
    can_reply = EXCLUDED.can_reply, synced_at = now()
RETURNING page_id, sender_id, synced_at"""
_INSERT_EVENTS = """
INSERT INTO contact_interaction_events (message_id, page_id, sender_id, client_code,
    thread_id, direction, from_id, from_name, created_time, text, attachment_kind)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
    %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::text[])
ON CONFLICT (message_id) DO NOTHING"""


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


def replaced_way(url: str, base: str, *, bulk: bool, name: str) -> Figures:
    """Fetch a page of 100 threads, write it, fetch the next: the loop this replaces."""
    page = Page(BENCH_PAGE, "bench", None, True, None, None, None, None)
    api = client(base)
    fields = f"{THREAD_FIELDS},messages.limit(25){{{MESSAGE_FIELDS}}}"
    db = 0.0
    threads_written = messages_written = 0
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for body in api.list_threads(fields, 100):
            threads: list[ThreadRow] = []
            events: list[EventRow] = []
            per_thread: list[tuple[ThreadRow, list[EventRow]]] = []
            for raw in body.get("data") or []:
                thread = parse_thread(page, raw)
                if not isinstance(thread, ThreadRow):
                    continue
                mine = [
                    e
                    for e in (parse_message(page, thread, m) for m in raw["messages"]["data"])
                    if isinstance(e, EventRow)
                ]
                threads.append(thread)
                events.extend(mine)
                per_thread.append((thread, mine))
            t0 = time.perf_counter()
            if bulk:
                conn.execute(_UPSERT_MANY, _columns([t.row() for t in threads], 10)).fetchall()
                for start in range(0, len(events), 500):
                    chunk = [e.row() for e in events[start : start + 500]]
                    conn.execute(_INSERT_EVENTS, _columns(chunk, 11))
            else:
                for thread, mine in per_thread:
                    conn.execute(_UPSERT_ONE, thread.row()).fetchall()
                    if mine:
                        conn.execute(_INSERT_EVENTS, _columns([e.row() for e in mine], 11))
            db += time.perf_counter() - t0
            threads_written += len(threads)
            messages_written += len(events)
    wall = time.perf_counter() - started
    return Figures(
        name, api.stats.calls, wall, db, api.stats.api_seconds, threads_written, messages_written
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--changed", type=int, default=100)
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    print(f"machine: {machine()}")
    print(
        f"page of {args.threads} threads x {args.messages} messages, "
        f"{args.latency_ms:g} ms per API call, {args.changed} threads changed\n"
    )
    with graph_api(args.threads, args.messages, args.latency_ms) as base, databases(4) as urls:
        ours_url, before_url, after_url, elsewhere_url = urls
        floor = calls_alone(base)
        elsewhere = python_elsewhere(elsewhere_url, base)
        with ConnectionPool(ours_url, min_size=3, max_size=6, kwargs={"autocommit": True}) as pool:
            full = ours(pool, base, "full", "this project: full sync")
            t0 = time.perf_counter()
            built = build_thread_conversations(pool, [BENCH_PAGE])
            build_seconds = time.perf_counter() - t0
            before = replaced_way(
                before_url, base, bulk=False, name="per-thread writes (before): full"
            )
            after = replaced_way(after_url, base, bulk=True, name="bulk per 100 (after): full")
            root = base.rsplit("/", 1)[0]
            requests.post(
                f"{root}/_sim/touch",
                data=orjson.dumps({"page_id": BENCH_PAGE, "threads": args.changed, "messages": 2}),
                timeout=60,
            ).raise_for_status()
            incremental = ours(pool, base, "incremental", "this project: incremental")
            t0 = time.perf_counter()
            rebuilt = build_thread_conversations(pool, [BENCH_PAGE])
            rebuild_seconds = time.perf_counter() - t0
            before_again = replaced_way(
                before_url, base, bulk=False, name="per-thread writes (before): sync again"
            )
            after_again = replaced_way(
                after_url, base, bulk=True, name="bulk per 100 (after): sync again"
            )
    for figures in (floor, elsewhere, full, before, after, incremental, before_again, after_again):
        print(figures.line())
    print(
        f"\nconversations built from the threads: {built.threads} in {build_seconds:.2f} s "
        f"(full), {rebuilt.threads} in {rebuild_seconds:.2f} s (after the change)"
    )
    list_bar = math.ceil(args.changed / 100) + 1
    print("\nbars:")
    print(
        f"  incremental calls {incremental.calls} <= ceil({args.changed}/100) + 1 = {list_bar} "
        f"list calls (+0 message calls: every change fit the nested field): "
        f"{'met' if incremental.calls <= list_bar else 'MISSED'}"
    )
    limit = 1.1 * full.calls * latency
    print(
        f"  full sync wall {full.wall:.2f} s <= 1.1 x {full.calls} calls x {latency:g} s = "
        f"{limit:.2f} s: {'met' if full.wall <= limit else 'MISSED'} "
        f"({full.wall / (full.calls * latency):.3f} x the calls' latency; the calls alone "
        f"{floor.wall / (floor.calls * latency):.3f} x, with our Python work in a child "
        f"process {elsewhere.wall / (elsewhere.calls * latency):.3f} x)"
    )
    print(
        f"  full sync {before.wall / full.wall:.1f}x faster than the per-thread writes "
        f"(bar 5x): {'met' if before.wall >= 5 * full.wall else 'MISSED'}; "
        f"{after.wall / full.wall:.1f}x faster than its after"
    )
    print(
        f"  after the change: incremental {before_again.wall / incremental.wall:.0f}x faster "
        f"than the per-thread writes, {after_again.wall / incremental.wall:.0f}x than its after"
    )


if __name__ == "__main__":
    main()
