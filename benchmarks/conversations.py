"""Conversations benchmark: bulk and single upserts, user lookups, local embeddings and
semantic search, each beside one INSERT ... ON CONFLICT (and commit) per conversation, same run.

Run: ``python benchmarks/conversations.py [--n 100000] [--clients 20] [--naive 5000]
[--queries 200] [--keep-db] [--shared-buffers 4GB] [--tcp] [--bulk-only]
[--compare-loader ROUNDS]`` (``--n 1000000`` for the 1M-vector search figure).
Uses an embedded PostgreSQL in the system temp dir, or ``DATABASE_URL`` (in a
database it creates and drops). ``--tcp`` starts the embedded server listening on
127.0.0.1 as well and connects through it (production connects over TCP, the embedded
server on a Unix socket). ``--bulk-only`` stops after the bulk upsert figures;
``--compare-loader 4`` only compares what the bulk loader's tricks pay. Figures
and the machine go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from discovery import (  # benchmarks/discovery.py
    add_server_arguments,
    database,
    load_average,
    machine,
    server_settings,
)
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

from conversation_assets import demo, embedded, migrate
from conversation_assets.bulk import upsert_conversations_in_batches
from conversation_assets.embedding import embed_backlog
from conversation_assets.reads import (
    exact_search,
    explain_search,
    list_conversations,
    semantic_search,
)
from conversation_assets.search_indexes import (
    INDEX_PREFIX,
    MIN_VECTORS,
    graph_memory_mb,
    sync_search_indexes,
)
from conversation_assets.store import ConversationRecord, upsert_conversations
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource

BARS = {"bulk": 20_000.0, "embed": 2_000.0, "search_p95_ms": 20.0, "recall": 0.95}
BATCH = 5_000
WORKERS = 2  # upsert_conversations_in_batches' default with a pool
EF_SEARCH = (40, 100, 200)  # 40 is semantic_search's default
START = datetime(2026, 1, 1, tzinfo=UTC)


def records(n: int, clients: int, seed: int = 3, prefix: str = "s") -> list[ConversationRecord]:
    """Conversations of ~1 KB: 4-12 demo turns, Zipf-sized clients, 200 users each."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(clients)]
    out = []
    for i in range(n):
        client = rng.choices(range(clients), weights)[0]
        turns = []
        for _ in range(rng.randint(2, 6)):
            turns.append(f"User: {rng.choice(demo._HUMAN)}")
            turns.append(f"Assistant: {rng.choice(demo._AI)}")
        transcript = "\n".join(turns)
        out.append(
            ConversationRecord(
                client_code=f"client{client:02d}",
                crew_code=f"crew{client:02d}",
                session_id=f"{prefix}{i:08d}",
                user_id=f"user{rng.randrange(200):03d}",
                channel=rng.choice(["web", "telegram", "whatsapp"]),
                full_conversation=transcript,
                summary=transcript[:200],
                metadata={
                    "message_count": len(turns),
                    "language": "en",
                    "sentiment": {"compound": round(rng.uniform(-1, 1), 4)},
                    "summarizer": "extractive",
                },
                message_count=len(turns),
                sentiment=round(rng.uniform(-1, 1), 4),
                language="en",
                created_at=START + timedelta(seconds=i * 30),
                last_message_at=START + timedelta(seconds=i * 30 + 300),
            )
        )
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latencies_ms(work: Callable[[int], object], count: int) -> list[float]:
    out = []
    for i in range(count):
        started = time.perf_counter()
        work(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def show(label: str, values_ms: Sequence[float]) -> str:
    return (
        f"{label}: p50 {statistics.median(values_ms):.2f} ms, "
        f"p95 {percentile(values_ms, 0.95):.2f} ms"
    )


@contextmanager
def tcp_database(keep: bool, shared_buffers: str | None) -> Iterator[str]:
    """A database on a fresh embedded server reached over TCP, on 127.0.0.1.

    The embedded server listens on a Unix socket only, and socket options, buffer
    sizes and wake-ups differ between the two: figures meant for production, which
    connects over TCP, are taken through TCP. The server is started as the embedded
    one is (same binaries, settings and password), then restarted listening on a free
    port of 127.0.0.1, with a pg_hba.conf line letting that address in by password.
    """
    workdir = Path(tempfile.mkdtemp(prefix="conversations-bench-tcp-"))
    data = workdir / "data"
    server = embedded.get_server(data, cleanup_mode=None if keep else "delete")
    try:
        if shared_buffers:
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(
                        sql.Literal(shared_buffers)
                    )
                )
        with (data / "pg_hba.conf").open("a", encoding="utf-8") as hba:
            hba.write("host all all 127.0.0.1/32 scram-sha-256\n")
        with socket.socket() as probe:  # a free port, for the server to take right after
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server.stop()
        options = shlex.join(["-h", "127.0.0.1", "-p", str(port), "-k", str(data)])
        embedded._check(  # the embedded module's runner: as root, in a user namespace
            "pg_ctl", "-w", "-t", "60", "-D", str(data), "-l", str(data / "server.log"),
            "-o", options, "start",
        )  # fmt: skip
        url = make_conninfo(
            host="127.0.0.1",
            port=port,
            user=embedded.SUPERUSER,
            dbname="postgres",
            passfile=str(data / embedded.PASSFILE),
        )
        with embedded.scratch_database(url, "bench_conversations", keep=keep) as db_url:
            yield db_url
            if keep:
                print(f"\nkept database: {db_url} (server still running, data in {data})")
    finally:
        if not keep:
            server.cleanup()  # stops the restarted server too (pg_ctl on the directory)
            shutil.rmtree(workdir, ignore_errors=True)


# --- the approach replaced: one insert per conversation ---------------------------

NAIVE_INSERT = """
INSERT INTO conversations (id, client_code, crew_code, session_id, user_id, channel, summary,
    full_conversation, metadata, status, message_count, sentiment, language, created_at,
    last_message_at)
VALUES (conversation_id(%(crew)s, %(session)s), %(client)s, %(crew)s, %(session)s, %(user)s,
    %(channel)s, %(summary)s, %(text)s, %(metadata)s, 'active', %(count)s, %(sentiment)s,
    %(language)s, %(created)s, %(last)s)
ON CONFLICT (id) DO UPDATE SET summary = EXCLUDED.summary,
    full_conversation = EXCLUDED.full_conversation, metadata = EXCLUDED.metadata"""


def naive_params(r: ConversationRecord) -> dict[str, object]:
    return {
        "crew": r.crew_code,
        "session": r.session_id,
        "client": r.client_code,
        "user": r.user_id,
        "channel": r.channel,
        "summary": r.summary,
        "text": r.full_conversation,
        "metadata": json.dumps(r.metadata),
        "count": r.message_count,
        "sentiment": r.sentiment,
        "language": r.language,
        "created": r.created_at,
        "last": r.last_message_at,
    }


def one_insert_per_conversation(conn: psycopg.Connection, batch: list[ConversationRecord]) -> float:
    """The approach the bulk path replaces: one statement (and one commit) per conversation."""
    started = time.perf_counter()
    for r in batch:
        conn.execute(NAIVE_INSERT, naive_params(r))
    return time.perf_counter() - started


# --- the measurements --------------------------------------------------------------


def bulk(conn: psycopg.Connection, url: str, data: list[ConversationRecord], naive: int) -> None:
    half = len(data) // 2
    # One connection first (half the rows), then the default: a pool and two workers.
    started = time.perf_counter()
    report = upsert_conversations_in_batches(conn, data[:half], batch_size=BATCH)
    serial = half / (time.perf_counter() - started)
    with ConnectionPool(url, min_size=WORKERS, kwargs={"autocommit": True}) as pool:
        started, cpu = time.perf_counter(), time.process_time()
        report.add(upsert_conversations_in_batches(pool, data[half:], batch_size=BATCH))
        ours = (len(data) - half) / (time.perf_counter() - started)
        # This process's CPU (every thread): what the client costs, which the host's
        # speed swings move far less than the rate.
        client_us = (time.process_time() - cpu) / (len(data) - half) * 1e6
        assert report.rejected == 0 and report.inserted == len(data)
        conn.execute("VACUUM ANALYZE conversations")

        started = time.perf_counter()
        upsert_conversations_in_batches(pool, data, batch_size=BATCH)
        unchanged = len(data) / (time.perf_counter() - started)

    extra = records(naive, 1, seed=99, prefix="naive")
    theirs = naive / one_insert_per_conversation(conn, extra)
    print(
        f"bulk upsert, {len(data) - half:,} new conversations into {half:,} (COPY + one INSERT "
        f"... ON CONFLICT per {BATCH:,}, {WORKERS} connections): {ours:,.0f}/s; one "
        f"insert per conversation ({naive:,} rows, same table): {theirs:,.0f}/s -> "
        f"{ours / theirs:.1f}x [bar {BARS['bulk']:,.0f}/s: "
        f"{'met' if ours >= BARS['bulk'] else 'NOT met'}]"
    )
    print(f"bulk upsert, two connections, client CPU: {client_us:.1f} us a row")
    print(f"bulk upsert, the first {half:,} through one connection: {serial:,.0f}/s")
    print(
        f"bulk upsert of the same {len(data):,} unchanged (nothing rewritten): {unchanged:,.0f}/s"
    )


def compare_loader(url: str, rounds: int, base: int = 50_000, n: int = 20_000) -> None:
    """What each of the bulk loader's own tricks pays, into the same table.

    (a) `upsert_conversations` per batch, one connection, nothing overlapped; (b) the
    loader on one connection (the next batch encoded in a thread); (c) the loader on a
    pool, two lanes. `base` rows first, then `n` new rows per variant and round, the
    variants' order rotated each round so that the growing table and the host's swings
    fall on all of them.
    """

    def plain(
        conn: psycopg.Connection, pool: ConnectionPool, data: list[ConversationRecord]
    ) -> None:
        for i in range(0, len(data), BATCH):
            upsert_conversations(conn, data[i : i + BATCH])

    def one_connection(
        conn: psycopg.Connection, pool: ConnectionPool, data: list[ConversationRecord]
    ) -> None:
        upsert_conversations_in_batches(conn, data, batch_size=BATCH)

    def two_lanes(
        conn: psycopg.Connection, pool: ConnectionPool, data: list[ConversationRecord]
    ) -> None:
        upsert_conversations_in_batches(pool, data, batch_size=BATCH)

    variants = {
        "(a) upsert_conversations per batch": plain,
        "(b) loader, one connection": one_connection,
        "(c) loader, two lanes": two_lanes,
    }
    names = list(variants)
    rates: dict[str, list[float]] = {name: [] for name in names}
    with (
        psycopg.connect(url, autocommit=True) as conn,
        ConnectionPool(url, min_size=WORKERS, kwargs={"autocommit": True}) as pool,
    ):
        upsert_conversations_in_batches(pool, records(base, 20, prefix="base"), batch_size=BATCH)
        for round_ in range(rounds):
            for number, name in enumerate(names[round_ % 3 :] + names[: round_ % 3]):
                data = records(n, 20, seed=round_, prefix=f"r{round_}v{number}")
                load = load_average()
                started = time.perf_counter()
                variants[name](conn, pool, data)
                rates[name].append(n / (time.perf_counter() - started))
                print(f"round {round_ + 1}, {name}: {rates[name][-1]:,.0f}/s (load {load})")
    for name in names:
        print(f"{name}: " + " / ".join(f"{rate:,.0f}" for rate in rates[name]) + " /s")


def single(conn: psycopg.Connection, data: list[ConversationRecord], count: int = 500) -> None:
    rng = random.Random(5)
    picks = [rng.choice(data) for _ in range(count)]

    def ours(i: int) -> None:
        r = picks[i]
        r.summary = f"changed {i}"
        upsert_conversations(conn, [r])

    def theirs(i: int) -> None:
        r = picks[i]
        r.summary = f"changed again {i}"
        conn.execute(NAIVE_INSERT, naive_params(r))

    print(
        show(f"single upsert ({count} changed conversations, our path)", latencies_ms(ours, count))
    )
    print(
        show(
            "single upsert, one bare INSERT ... ON CONFLICT (the floor)",
            latencies_ms(theirs, count),
        )
    )


def lookups(conn: psycopg.Connection, data: list[ConversationRecord], count: int = 1000) -> None:
    rng = random.Random(8)
    picks = [rng.choice(data) for _ in range(count)]

    def page(i: int) -> None:
        list_conversations(conn, picks[i].client_code, user_id=picks[i].user_id, page_size=20)

    def bare(i: int) -> None:
        conn.execute(
            "SELECT id, summary, created_at FROM conversations WHERE client_code = %s "
            "AND user_id = %s AND deleted_at IS NULL ORDER BY created_at DESC LIMIT 20",
            (picks[i].client_code, picks[i].user_id),
        ).fetchall()

    print(show("user lookup, list_conversations page of 20 + total", latencies_ms(page, count)))
    print(
        show("user lookup, the bare indexed SELECT ... LIMIT 20 (floor)", latencies_ms(bare, count))
    )


def embeddings(url: str, conn: psycopg.Connection) -> None:
    embedder = EmbeddingResource()
    embedder.dimension()  # load the model outside the timings
    sample = [
        r[0]
        for r in conn.execute(
            "SELECT full_conversation FROM conversations ORDER BY id LIMIT 2000"
        ).fetchall()
    ]
    started = time.perf_counter()
    for text in sample:
        embedder.embed([text])  # the approach replaced: one model call per conversation
    one_by_one = len(sample) / (time.perf_counter() - started)

    # Big indexes after bulk loads: the HNSW index is built once the vectors are in.
    conn.execute("DROP INDEX conversations_embedding_hnsw_idx")
    postgres = PostgresResource(database_url=url, application_name="bench-conversations")
    try:
        report = embed_backlog(postgres.pool, embedder, batch_size=2048)
    finally:
        postgres.close()
    print(
        f"local embeddings through the embedding step ({report.texts_sent:,} texts sent, "
        f"{report.cache_hits:,} cache hits): model {report.texts_per_second:,.0f} "
        f"transcripts/s, whole step {report.embedded / report.seconds:,.0f}/s; "
        f"one call per conversation: {one_by_one:,.0f}/s -> "
        f"{report.texts_per_second / one_by_one:.1f}x "
        f"[bar {BARS['embed']:,.0f}/s: "
        f"{'met' if report.texts_per_second >= BARS['embed'] else 'NOT met'}]"
    )
    started = time.perf_counter()
    # Room for the whole graph (about 3 KB a 256-d vector, 1 GB at least): at 1M a
    # build that outgrows it goes on on disk, 27.7 min with 1 GB against 8.3 with 3 GB.
    graph_mb = max(1024, graph_memory_mb(report.embedded, report.dimension))
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{graph_mb}MB")))
    conn.execute(
        "CREATE INDEX conversations_embedding_hnsw_idx ON conversations "
        "USING hnsw (embedding vector_cosine_ops) WHERE embedding IS NOT NULL"
    )
    build_seconds = time.perf_counter() - started
    # What autovacuum does after the embedding step rewrote every row: clear the old
    # versions and mark pages all-visible (index-only scans need it).
    conn.execute("VACUUM ANALYZE conversations")
    print(
        f"HNSW index build over {report.embedded:,} vectors "
        f"(maintenance_work_mem {graph_mb:,} MB): {build_seconds:.1f} s"
    )


def search(conn: psycopg.Connection, data: list[ConversationRecord], queries: int) -> None:
    embedder = EmbeddingResource()
    rng = random.Random(13)
    picks = [rng.choice(data) for _ in range(queries)]
    texts = [f"{rng.choice(demo._HUMAN)} {rng.choice(demo._HUMAN)}" for _ in picks]
    vectors = embedder.embed(texts)
    sizes = dict(conn.execute("SELECT client_code, count(*) FROM conversations GROUP BY 1"))
    # The recall reference, once per query (at 1M an exact search takes seconds), timed.
    truths, exact_ms = [], []
    for pick, vector in zip(picks, vectors, strict=True):
        started = time.perf_counter()
        hits = exact_search(conn, pick.client_code, vector, k=10)
        exact_ms.append((time.perf_counter() - started) * 1000)
        truths.append({h.conversation.id for h in hits})

    def measure(label: str) -> None:
        # The index is read once before timing: a serving database has it in memory.
        for pick, vector in zip(picks, vectors, strict=True):
            semantic_search(conn, pick.client_code, vector, k=10)
        plans = [
            explain_search(conn, p.client_code, v, k=10)
            for p, v in zip(picks, vectors, strict=True)
        ]
        shared = sum("conversations_embedding_hnsw_idx" in plan for plan in plans)
        own = sum(INDEX_PREFIX in plan for plan in plans)
        print(
            f"{label}: of {len(plans)} searches, {own} go through their client's own HNSW "
            f"index, {shared} through the shared one, {len(plans) - own - shared} are ranked "
            "exactly (small clients)"
        )
        for ef in EF_SEARCH:
            timings, recalls, small = [], [], []
            for pick, vector, truth in zip(picks, vectors, truths, strict=True):
                started = time.perf_counter()
                hits = semantic_search(conn, pick.client_code, vector, k=10, ef_search=ef)
                timings.append((time.perf_counter() - started) * 1000)
                recall = len({h.conversation.id for h in hits} & truth) / max(len(truth), 1)
                recalls.append(recall)
                if sizes[pick.client_code] < 0.02 * len(data):
                    small.append(recall)
            p95 = percentile(timings, 0.95)
            recall = statistics.mean(recalls)
            met = p95 <= BARS["search_p95_ms"] and recall >= BARS["recall"]
            small_note = (
                f"; clients under 2% of rows ({len(small)} queries): recall@10 "
                f"{statistics.mean(small):.3f}"
                if small
                else ""
            )
            print(
                f"semantic search top-10 within one client ({label}), {len(data):,} vectors, "
                f"{len(sizes)} clients, ef_search {ef}: p50 "
                f"{statistics.median(timings):.2f} ms, p95 {p95:.2f} ms, recall@10 "
                f"{recall:.3f}{small_note} [bar p95 <= {BARS['search_p95_ms']:.0f} ms at "
                f"recall >= {BARS['recall']}: {'met' if met else 'NOT met'}]"
            )

    measure("shared index")
    report = sync_search_indexes(conn)
    print(
        f"per-client HNSW indexes (sync_search_indexes, clients with >= {MIN_VECTORS:,} "
        f"vectors): {len(report.built)} built, {report.indexes} in all, over "
        f"{report.vectors_covered:,} of "
        f"{report.vectors_total:,} vectors in {report.seconds:.1f} s, "
        f"{report.index_bytes / 2**20:,.0f} MB"
    )
    conn.execute("ANALYZE conversations")
    measure("per-client indexes")
    print(show("exact search (no index, the recall reference)", exact_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="Conversations (and vectors).")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--naive",
        type=int,
        default=5_000,
        help="Rows for the one-insert-per-conversation comparison.",
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument(
        "--tcp",
        action="store_true",
        help="connect over TCP to an embedded server on 127.0.0.1 (not DATABASE_URL)",
    )
    parser.add_argument(
        "--bulk-only", action="store_true", help="stop after the bulk upsert figures"
    )
    parser.add_argument(
        "--compare-loader",
        type=int,
        metavar="ROUNDS",
        help="only compare the bulk loader's tricks, in this many rounds (compare_loader)",
    )
    add_server_arguments(parser)
    args = parser.parse_args()

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram']}, python {info['python']}")
    data = records(args.n, args.clients)
    mean_chars = sum(len(r.full_conversation or "") for r in data) / len(data)
    print(
        f"data: {args.n:,} conversations, {args.clients} clients (Zipf), mean transcript "
        f"{mean_chars:,.0f} characters"
    )
    opened = (
        tcp_database(args.keep_db, args.shared_buffers)
        if args.tcp
        else database(args.keep_db, args.shared_buffers)
    )
    with opened as url, psycopg.connect(url, autocommit=True) as conn:
        migrate.upgrade(conn)
        register_vector(conn)
        host = conn.info.host
        transport = "a Unix socket" if host.startswith("/") else f"TCP ({host})"
        print(f"{server_settings(conn)}, over {transport}; load average before: {load_average()}")
        if args.compare_loader:
            compare_loader(url, args.compare_loader)
            print(f"load average after: {load_average()}")
            return
        bulk(conn, url, data, args.naive)
        if args.bulk_only:
            print(f"load average after: {load_average()}")
            return
        single(conn, data)
        lookups(conn, data)
        embeddings(url, conn)
        search(conn, data, args.queries)
        print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
