"""Push ingestion benchmark: enqueue latency under 1, 10 and 100 concurrent writers,
drain throughput with the local model, beside the synchronous "before" (the same
store-and-embed work done inside the request), on the same data in the same run.

Run: ``python benchmarks/ingest.py [--calls 400] [--writers 1,10,100] [--processes 4]
[--drain 20000] [--before 500] [--remote-ms 150] [--keep-db] [--shared-buffers 4GB]``.
The "before" runs with the local model, then (one writer) with a local
OpenAI-compatible endpoint answering `--remote-ms` late, as the replaced approach's
remote embedding call did.
Writers run in separate processes (threads in each, one connection per writer) over
the local socket, each calling `inbox.queue_conversation_storage` in a closed loop
(the next call as soon as one returns: the heaviest load W writers can make), then
paced (one call every `--pace-ms` per writer: a chat app handing off conversations as
they end). Uses an embedded PostgreSQL in the system temp dir, or ``DATABASE_URL``.
Figures: benchmarks/README.md ("Push ingestion").
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import statistics
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import orjson
import psycopg
from discovery import add_server_arguments, database, load_average, machine, server_settings
from pgvector.psycopg import register_vector

from conversation_assets import inbox, migrate
from conversation_assets.embedding import column_dimension
from conversation_assets.inbox import InboxItem, record_for
from conversation_assets.queries import query
from conversation_assets.store import content_hash, upsert_conversations
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource

CLIENT = "acme"
_TOPICS = [
    "my parcel has not arrived and the tracking page shows nothing since Monday",
    "I was charged twice for the same order, can you refund one of the payments",
    "how do I change the delivery address of an order that already shipped",
    "the app logs me out every time I open the settings page on my phone",
    "can I upgrade my plan in the middle of the month and what will it cost",
    "the invoice for March has the wrong company name and VAT number on it",
]


def transcript(i: int) -> str:
    """A distinct chat of 6 to 10 lines (about 600 to 900 characters)."""
    topic = _TOPICS[i % len(_TOPICS)]
    lines = [f"User: Hi, order {i}: {topic}."]
    for turn in range(2 + i % 3):
        lines.append(
            f"AI: Thanks for reaching out about order {i}. Let me check that for you "
            f"(step {turn}); I can see the account and the last {turn + 2} events."
        )
        lines.append(f"User: Thank you, reference {i * 7 + turn}, it is quite urgent for me.")
    lines.append("AI: Done: you will get an email with the details within the hour.")
    return "\n".join(lines)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    cut = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else None

    def at(p: int) -> float:
        return ordered[0] if cut is None else cut[p - 1]

    return {"p50": at(50), "p95": at(95), "p99": at(99), "max": ordered[-1]}


# --- the writers (a separate process each) ---------------------------------------------


def _writer_process(
    url: str,
    threads: int,
    calls: int,
    first: int,
    pace_ms: float,
    out: Any,
    way: str,
    remote: str | None = None,
) -> None:
    """`threads` writers, one connection each; their latencies (ms) go to `out`.

    Each connection makes one untimed call first, as an app's pooled connection has
    (a new backend's first call also loads its caches and compiles the function).
    Paced writers start at a random point of their period and keep to a schedule, so
    they do not all call at the same instant."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    ready = threading.Barrier(threads + 1)
    embedder = (
        EmbeddingResource(backend="openai", base_url=remote, api_key="bench", max_retries=0)
        if remote
        else EmbeddingResource()
    )
    if way == "before":
        embedder.embed(["warm up"])

    def call(conn: psycopg.Connection, i: int) -> None:
        if way == "before":
            _store_synchronously(conn, embedder, i)
        elif way == "floor":
            conn.execute(_BARE_INSERT, (f"floor-{i}", f"u-{i % 997}", transcript(i)))
        else:
            inbox.queue_conversation_storage(
                conn, f"u-{i % 997}", "web", transcript(i), None, {"order": i}, client_code=CLIENT
            )

    def write(n: int) -> None:
        period = pace_ms / 1000
        with psycopg.connect(url, autocommit=True) as conn:
            if way == "before":
                register_vector(conn)
            call(conn, -1 - first - n)  # the warm-up call, not timed
            ready.wait()
            due = time.perf_counter() + random.Random(first + n).uniform(0, period)
            for k in range(calls):
                if period:
                    time.sleep(max(0.0, due - time.perf_counter()))
                    due += period
                start = time.perf_counter()
                call(conn, first + n * calls + k)
                latencies[n].append((time.perf_counter() - start) * 1000)

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    out.put((time.perf_counter() - started, [x for lane in latencies for x in lane]))


_BARE_TABLE = """CREATE TABLE bare_inbox (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    session_id text NOT NULL, user_id text NOT NULL, full_conversation text NOT NULL,
    metadata jsonb NOT NULL, enqueued_at timestamptz NOT NULL DEFAULT now())"""
# The floor: the same row, one plain INSERT into a table without checks or function.
_BARE_INSERT = """INSERT INTO bare_inbox (session_id, user_id, full_conversation, metadata)
VALUES (%s, %s, %s, '{}')"""


def _store_synchronously(conn: psycopg.Connection, embedder: EmbeddingResource, i: int) -> None:
    """The "before": the drain's work for one conversation, inside the request."""
    item = InboxItem(
        0, CLIENT, f"before-{i}", f"u-{i % 997}", "web", transcript(i), None, {"order": i}, None
    )
    record = record_for(item)
    vector = embedder.embed([record.full_conversation or ""])[0]
    with conn.transaction():
        upsert_conversations(conn, [record], source="before")
        conn.execute(query("create_embedding_stage"))
        with conn.cursor() as cur:
            with cur.copy(query("copy_embedding_stage")) as copy:
                copy.set_types(["uuid", "bytea", "vector", "bool"])
                copy.write_row((record.id, content_hash(record.full_conversation), vector, True))
            cur.execute(query("save_embeddings"), {"model": "local:l2_supercat_256"})


def run_writers(
    url: str,
    writers: int,
    calls: int,
    first: int,
    processes: int,
    pace_ms: float,
    way: str = "enqueue",
    remote: str | None = None,
) -> dict[str, float]:
    """W writers spread over up to `processes` processes; latency percentiles (ms) and
    calls per second."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    count = min(processes, writers)
    shares = [writers // count + (1 if p < writers % count else 0) for p in range(count)]
    children = []
    offset = first
    for share in shares:
        child = context.Process(
            target=_writer_process, args=(url, share, calls, offset, pace_ms, out, way, remote)
        )
        child.start()
        children.append(child)
        offset += share * calls
    results = [out.get(timeout=1800) for _ in children]
    for child in children:
        child.join()
    seconds = max(r[0] for r in results)
    samples = [x for r in results for x in r[1]]
    figures = percentiles(samples)
    figures["per_second"] = len(samples) / seconds
    figures["calls"] = len(samples)
    return figures


class _RemoteModel(ThreadingHTTPServer):
    """An OpenAI-compatible embeddings endpoint answering `delay` seconds after a call,
    as the replaced approach's remote model did (about 150 ms a call)."""

    daemon_threads = True

    def __init__(self, delay: float, dimension: int) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                payload = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(server.delay)
                data = [
                    {"index": i, "embedding": _pseudo_vector(text, server.dimension)}
                    for i, text in enumerate(payload["input"])
                ]
                body = orjson.dumps({"object": "list", "data": data})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        self.delay, self.dimension = delay, dimension
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return "http://{}:{}".format(*self.server_address[:2])


def _pseudo_vector(text: str, dimension: int) -> list[float]:
    values = np.random.default_rng(int.from_bytes(content_hash(text)[:8], "big"))
    return values.standard_normal(dimension).astype(np.float32).tolist()


def _vector_floor(conn: psycopg.Connection, count: int, batch_size: int) -> str:
    """The drain's floor: the vectors it just stored, inserted again (nothing else) into a
    bare table under the same HNSW index, `batch_size` rows a transaction."""
    conn.execute(
        "CREATE TABLE bare_vectors AS SELECT id, embedding FROM conversations "
        "WHERE embedding IS NOT NULL ORDER BY created_at DESC LIMIT %s",
        (count,),
    )
    conn.execute("CREATE TABLE bare_indexed (LIKE bare_vectors)")
    conn.execute("CREATE INDEX ON bare_indexed USING hnsw (embedding vector_cosine_ops)")
    ids = [row[0] for row in conn.execute("SELECT id FROM bare_vectors ORDER BY id")]
    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        with conn.transaction():
            conn.execute(
                "INSERT INTO bare_indexed SELECT * FROM bare_vectors WHERE id = ANY(%s)",
                (ids[start : start + batch_size],),
            )
    seconds = time.perf_counter() - started
    return (
        f"floor: the same {len(ids):,} vectors into a bare table under the same HNSW index: "
        f"{seconds:.2f} s = {len(ids) / seconds:,.0f}/s"
    )


def _line(label: str, figures: dict[str, float]) -> str:
    return (
        f"  {label:<34} p50 {figures['p50']:7.3f}  p95 {figures['p95']:7.3f}  "
        f"p99 {figures['p99']:7.3f}  max {figures['max']:8.3f} ms   "
        f"{figures['per_second']:8,.0f} calls/s ({figures['calls']:,.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400, help="Calls per writer.")
    parser.add_argument("--writers", default="1,10,100")
    parser.add_argument("--processes", type=int, default=4, help="Writer processes at most.")
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=1000.0,
        help="Paced: ms between a writer's calls (1000: 100 writers make 100 calls/s).",
    )
    parser.add_argument(
        "--drain", type=int, default=20_000, help="Backlog the two-worker drain stores."
    )
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--before", type=int, default=300, help="Calls per writer, before.")
    parser.add_argument(
        "--remote-ms",
        type=float,
        default=150.0,
        help="The before again with a remote model answering this late (the replaced "
        "approach's ~150 ms embedding call), one writer; 0 skips it.",
    )
    parser.add_argument("--keep-db", action="store_true")
    add_server_arguments(parser)
    args = parser.parse_args()
    writer_counts = [int(w) for w in args.writers.split(",")]

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram']}, python {info['python']}")
    print(f"load average before: {load_average()}")
    with database(args.keep_db, args.shared_buffers) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate.upgrade(conn)
            print(server_settings(conn))
            conn.execute("INSERT INTO inbox_clients (client_code) VALUES (%s)", (CLIENT,))
            inbox.set_max_pending(conn, 10_000_000)
            conn.execute(_BARE_TABLE)
        first = 0
        modes = (("closed loop", 0.0), (f"paced {args.pace_ms:g} ms", args.pace_ms))
        enqueue: dict[tuple[str, int], dict[str, float]] = {}  # closed loop
        paced: dict[tuple[str, int], dict[str, float]] = {}
        for way, title in (
            ("enqueue", "enqueue (queue_conversation_storage: checks, one INSERT, durable)"),
            ("floor", "the floor: the same row, one plain INSERT into a bare table, durable"),
        ):
            print(f"\n{title}")
            for mode, pace in modes:
                for writers in writer_counts:
                    figures = run_writers(
                        url, writers, args.calls, first, args.processes, pace, way
                    )
                    first += writers * args.calls
                    (paced if pace else enqueue)[way, writers] = figures
                    print(_line(f"{writers:>3} writers, {mode}", figures), flush=True)

        print("\nbefore: store and embed inside the request (same work, same data)")
        before_figures = {}
        before_runs = ((1, 0.0, args.before), (10, 0.0, args.before), (100, args.pace_ms, 30))
        for writers, pace, calls in before_runs if args.before else ():
            figures = run_writers(url, writers, calls, first, args.processes, pace, "before")
            first += writers * calls
            before_figures[writers] = figures
            mode = f"paced {pace:g} ms" if pace else "closed loop"
            print(_line(f"{writers:>3} writers, {mode}", figures), flush=True)
        if 100 in before_figures and ("enqueue", 100) in paced:
            then, now = before_figures[100], paced["enqueue", 100]
            print(
                f"  the app's path, 100 writers paced: p50 {then['p50'] / now['p50']:.1f}x less, "
                f"p99 {then['p99'] / now['p99']:.1f}x less than before"
            )
        if 1 in before_figures and ("enqueue", 1) in enqueue:
            ours, floor = enqueue["enqueue", 1]["p50"], enqueue["floor", 1]["p50"]
            print(
                f"  the app's path, one writer, p50: before {before_figures[1]['p50']:.3f} ms, "
                f"enqueue {ours:.3f} ms ({before_figures[1]['p50'] / ours:.1f}x less), "
                f"floor {floor:.3f} ms ({before_figures[1]['p50'] / floor:.1f}x less)"
            )

        if args.remote_ms and 1 in before_figures and ("enqueue", 1) in enqueue:
            with psycopg.connect(url) as conn:
                dimension = column_dimension(conn)
            model = _RemoteModel(args.remote_ms / 1000, dimension)
            calls = max(10, min(args.before, 50))
            try:
                remote = run_writers(url, 1, calls, first, 1, 0.0, "before", model.url)
            finally:
                model.shutdown()
            first += calls
            ours = enqueue["enqueue", 1]["p50"]
            print(_line(f"  1 writer, remote model {args.remote_ms:g} ms", remote))
            print(
                f"  the app's path against it, one writer, p50: {remote['p50'] / ours:.0f}x less "
                f"(against the local model in the request: "
                f"{before_figures[1]['p50'] / ours:.1f}x)"
            )

        resource = PostgresResource(database_url=url, pool_max_size=4)
        embedder = EmbeddingResource()
        embedder.embed(["warm up"])
        try:
            with resource.connection() as conn:
                waiting = inbox.oldest_age(conn)[1]
            print(f"\ndrain: {waiting:,} items waiting (all distinct texts: every one embedded)")
            report = inbox.drain(resource.pool, embedder, batch_size=args.batch_size)
            print(
                f"  one drain: {report.stored:,} stored in {report.seconds:.2f} s = "
                f"{report.per_second:,.0f}/s ({report.batches} batches of {args.batch_size}; "
                f"model {report.embed_seconds:.2f} s, {report.texts_sent:,} texts)"
            )
            with resource.connection() as conn:
                print(f"  {_vector_floor(conn, report.stored, args.batch_size)}")
            # A second backlog, drained by one drain with two workers (two connections,
            # disjoint items through SKIP LOCKED).
            extra = args.drain
            if extra < 10:
                return
            run_writers(url, 10, extra // 10, first, args.processes, 0.0)
            first += extra
            report = inbox.drain(resource.pool, embedder, batch_size=args.batch_size, workers=2)
            print(
                f"  two workers: {report.stored:,} stored in {report.seconds:.2f} s = "
                f"{report.per_second:,.0f}/s (model {report.embed_seconds:.2f} s, both workers)"
            )
            with resource.connection() as conn:
                total, embedded = conn.execute(
                    "SELECT count(*), count(embedding) FROM conversations"
                ).fetchone()
            print(f"  conversations: {total:,}, with a vector: {embedded:,}")
        finally:
            resource.close()
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
