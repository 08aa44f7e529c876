"""Messenger sync against the local Graph API over real HTTP and a real PostgreSQL.

Domain-level: `sync_page` and `build_thread_conversations` driven directly, so
each property (paging, incremental exactness, overlap, throttling, kills,
deletes, bad input) is tested with small pages and no simulated latency.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from conversation_assets import graph_sim, reads
from conversation_assets.graph_sim import GraphSim, Scripted
from conversation_assets.messenger import (
    SyncOptions,
    build_thread_conversations,
    crew_code,
    load_pages,
    probe_page,
    sync_page,
)
from conversation_assets.messenger_api import GraphClient
from conversation_assets.store import conversation_id

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
PAGE = "100000000000001"
OTHER = "100000000000002"


class Sleeps(list):
    """The waits a client asked for, taken as a millisecond each (a test's clock)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        time.sleep(0.001)


@pytest.fixture
def sim() -> Iterator[GraphSim]:
    state = GraphSim(start=START)
    state.add_page(PAGE, "Acme Store", "secret-token-one-AAAA")
    state.add_page(OTHER, "Globex Help", "secret-token-two-BBBB")
    with graph_sim.serve(state) as url:
        state.base = url  # type: ignore[attr-defined]
        yield state


@pytest.fixture
def pool(db_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(
        db_url, min_size=1, max_size=6, kwargs={"autocommit": True}, open=True
    ) as opened:
        yield opened


def register(conn: psycopg.Connection, page_id: str = PAGE, client: str = "acme") -> None:
    conn.execute(
        "INSERT INTO messenger_pages (page_id, client_code, label) VALUES (%s, %s, %s)",
        (page_id, client, f"page {page_id}"),
    )


def client_for(sim: GraphSim, page_id: str = PAGE, **options) -> GraphClient:
    options.setdefault("sleep", Sleeps())
    options.setdefault("backoff_seconds", 0.001)
    return GraphClient(
        base_url=sim.base,  # type: ignore[attr-defined]
        token=sim.pages[page_id].token,
        page_id=page_id,
        timeout_seconds=5,
        **options,
    )


def run(
    pool: ConnectionPool,
    sim: GraphSim,
    mode: str = "incremental",
    page_id: str = PAGE,
    client: GraphClient | None = None,
    **options,
):
    with pool.connection() as conn:
        (page,) = load_pages(conn, [page_id])
    outcome = sync_page(
        pool,
        client or client_for(sim, page_id),
        page,
        SyncOptions(mode=mode, **options),  # type: ignore[arg-type]
    )
    return outcome


def fill(sim: GraphSim, threads: int, messages: int, page_id: str = PAGE) -> None:
    graph_sim.fill_page(sim, page_id, threads, messages, START - timedelta(days=10))


def snapshot(conn: psycopg.Connection, page_id: str = PAGE) -> dict[str, object]:
    """Everything the sync stores for a page, minus sync times."""
    threads = conn.execute(
        """SELECT sender_id, client_code, thread_id, participant_name, updated_time,
                  message_count, unread_count, snippet, can_reply, first_message_at,
                  last_message_at, deleted_at IS NOT NULL
           FROM messenger_conversations WHERE page_id = %s ORDER BY sender_id""",
        (page_id,),
    ).fetchall()
    events = conn.execute(
        """SELECT message_id, sender_id, thread_id, direction, from_id, from_name,
                  created_time, text, attachment_kind, deleted_at IS NOT NULL
           FROM contact_interaction_events WHERE page_id = %s ORDER BY message_id""",
        (page_id,),
    ).fetchall()
    return {"threads": threads, "events": events}


def platform(sim: GraphSim, page_id: str = PAGE) -> dict[str, object]:
    """The platform's live threads and messages, as the sync should store them."""
    threads = {}
    messages = {}
    for thread in sim.pages[page_id].threads.values():
        if thread.deleted:
            continue
        live = thread.live_messages()
        threads[thread.participant_id] = (thread.id, len(live), thread.updated_time)
        for message in live:
            messages[message.id] = (thread.participant_id, message.text or None)
    return {"threads": threads, "messages": messages}


def stored_view(conn: psycopg.Connection, page_id: str = PAGE) -> dict[str, object]:
    threads = {
        row[0]: (row[1], row[2], row[3])
        for row in conn.execute(
            """SELECT sender_id, thread_id, message_count, updated_time
               FROM messenger_conversations WHERE page_id = %s AND deleted_at IS NULL""",
            (page_id,),
        )
    }
    messages = {
        row[0]: (row[1], row[2])
        for row in conn.execute(
            """SELECT message_id, sender_id, text FROM contact_interaction_events
               WHERE page_id = %s AND deleted_at IS NULL""",
            (page_id,),
        )
    }
    return {"threads": threads, "messages": messages}


# --- paging ----------------------------------------------------------------------------


def test_full_sync_pages_to_the_end_even_through_short_pages(conn, pool, sim):
    register(conn)
    sim.short_pages = True
    fill(sim, threads=23, messages=7)

    outcome = run(pool, sim, "full", page_size=5, nested_messages=3, message_page_size=4)

    assert outcome.status == "ok", outcome.error
    assert stored_view(conn) == platform(sim)
    # Pages shorter than asked still had `next`: the listing went on to the end.
    assert outcome.list_calls > 23 // 5 + 1
    assert outcome.threads_new == 23 and outcome.messages_new == 23 * 7
    assert outcome.watermark_after == max(t.updated_time for t in sim.threads.values())


def test_stored_fields_are_what_the_platform_says(conn, pool, sim):
    register(conn)
    thread = sim.add_thread(PAGE, "Zoë 🌸 Ивановa", at=START)
    sim.add_message(thread, "Hello 👋 こんにちは", at=START + timedelta(seconds=1))
    sim.add_message(thread, "Hi! How can we help?", from_page=True, at=START + timedelta(seconds=2))
    sim.add_message(thread, None, sticker=True, at=START + timedelta(seconds=3))
    sim.add_message(thread, None, attachment="image", at=START + timedelta(seconds=4))
    sim.add_message(
        thread, "see", share="https://example.invalid/x", at=START + timedelta(seconds=5)
    )
    nameless = sim.add_thread(PAGE, None, at=START + timedelta(seconds=6))
    sim.add_message(nameless, "مرحبا", at=START + timedelta(seconds=7))

    assert run(pool, sim, "full").status == "ok"

    rows = conn.execute(
        """SELECT direction, from_id, text, attachment_kind FROM contact_interaction_events
           WHERE sender_id = %s ORDER BY created_time""",
        (thread.participant_id,),
    ).fetchall()
    assert rows == [
        ("inbound", thread.participant_id, "Hello 👋 こんにちは", None),
        ("outbound", PAGE, "Hi! How can we help?", None),
        ("inbound", thread.participant_id, None, "sticker"),
        ("inbound", thread.participant_id, None, "image"),
        ("inbound", thread.participant_id, "see", "share"),
    ]
    names = dict(
        conn.execute("SELECT sender_id, participant_name FROM messenger_conversations").fetchall()
    )
    assert names == {thread.participant_id: "Zoë 🌸 Ивановa", nameless.participant_id: None}
    first, last, count, unread = conn.execute(
        """SELECT first_message_at, last_message_at, message_count, unread_count
           FROM messenger_conversations WHERE sender_id = %s""",
        (thread.participant_id,),
    ).fetchone()
    assert (first, last, count, unread) == (
        START + timedelta(seconds=1),
        START + timedelta(seconds=5),
        5,
        4,
    )


# --- incremental -----------------------------------------------------------------------


def test_incremental_reads_only_what_changed(conn, pool, sim):
    register(conn)
    fill(sim, threads=30, messages=4)
    assert run(pool, sim, "full", page_size=10, nested_messages=10).status == "ok"
    sim.advance(3600)
    threads = sorted(sim.pages[PAGE].threads.values(), key=lambda t: t.id)
    for thread in threads[:3]:  # new messages in three threads
        sim.add_message(thread, "any news? 😅")
    fresh = sim.add_thread(PAGE, "New Person")  # a new thread
    sim.add_message(fresh, "first message")
    sim.edit_message(threads[5].messages[-1].id, "edited text")  # an edit

    outcome = run(pool, sim, "incremental", page_size=10, nested_messages=10)

    assert outcome.status == "ok", outcome.error
    assert stored_view(conn) == platform(sim)
    assert outcome.list_calls == 1 and outcome.message_calls == 0
    assert (outcome.threads_new, outcome.messages_new, outcome.messages_updated) == (1, 4, 1)


def test_new_messages_beyond_the_nested_field_cost_one_call_per_thread(conn, pool, sim):
    register(conn)
    fill(sim, threads=12, messages=3)
    assert run(pool, sim, "full", page_size=5, nested_messages=5).status == "ok"
    sim.advance(3600)
    busy = sorted(sim.pages[PAGE].threads.values(), key=lambda t: t.id)[:2]
    for thread in busy:
        for n in range(8):  # 8 new messages, the nested field holds 5
            sim.add_message(thread, f"message {n}")

    outcome = run(pool, sim, "incremental", page_size=5, nested_messages=5)

    assert stored_view(conn) == platform(sim)
    assert outcome.list_calls <= 2  # ceil(2 / 5) + 1
    assert outcome.message_calls == 2


def test_incremental_after_any_history_equals_full(conn, pool, sim, other_db_url):
    import random

    register(conn)
    fill(sim, threads=25, messages=3)
    rng = random.Random(42)
    for round_number in range(6):
        sim.advance(rng.randint(1, 900))
        threads = [t for t in sim.pages[PAGE].threads.values() if not t.deleted]
        for _ in range(rng.randint(1, 12)):
            thread = rng.choice(threads)
            action = rng.random()
            if action < 0.5:
                sim.add_message(thread, f"round {round_number} {rng.random():.4f}")
            elif action < 0.6:
                sim.add_message(thread, "reply", from_page=True)
            elif action < 0.7:
                sim.add_thread(PAGE, rng.choice([None, "Nova", "Ωmega"]))
            elif action < 0.8 and thread.messages:
                sim.edit_message(thread.messages[-1].id, f"edit {rng.random():.4f}")
            elif action < 0.9:
                sim.touch(thread, participant_name=f"Renamed {rng.randint(1, 99)}")
            else:
                sim.touch(thread, unread_count=0)
        outcome = run(pool, sim, "incremental", page_size=4, nested_messages=3)
        assert outcome.status == "ok", outcome.error

    incremental = snapshot(conn)
    with (
        psycopg.connect(other_db_url, autocommit=True) as fresh,
        ConnectionPool(other_db_url, min_size=1, max_size=4, kwargs={"autocommit": True}) as p2,
    ):
        register(fresh)
        assert run(p2, sim, "full", page_size=4, nested_messages=3).status == "ok"
        assert snapshot(fresh) == incremental
    assert stored_view(conn) == platform(sim)


def test_a_thread_updated_during_a_sync_is_not_missed(conn, pool, sim):
    register(conn)
    fill(sim, threads=20, messages=2)
    assert run(pool, sim, "full", page_size=5).status == "ok"
    sim.advance(600)
    oldest = min(sim.pages[PAGE].threads.values(), key=lambda t: t.updated_time)
    newest = max(sim.pages[PAGE].threads.values(), key=lambda t: t.updated_time)
    sim.add_message(newest, "changed before the sync")
    moved = []

    def during(page_id: str, served: int) -> None:
        # After the first page is served, the oldest thread (not listed yet, far past
        # the cursor) gets a message: it moves to the top, behind the listing.
        if served == 1 and not moved:
            moved.append(sim.add_message(oldest, "written while the sync ran"))

    sim.after_list_page = during
    first = run(pool, sim, "incremental", page_size=5)
    sim.after_list_page = None
    assert first.status == "ok"
    assert (
        moved
        and not conn.execute(
            "SELECT 1 FROM contact_interaction_events WHERE message_id = %s", (moved[0].id,)
        ).fetchone()
    )

    second = run(pool, sim, "incremental", page_size=5)

    assert second.status == "ok" and second.messages_new == 1
    assert stored_view(conn) == platform(sim)


def test_overlap_catches_a_thread_stamped_just_before_the_watermark(conn, pool, sim):
    register(conn)
    fill(sim, threads=10, messages=2)
    assert run(pool, sim, "full").status == "ok"
    (watermark,) = conn.execute("SELECT watermark FROM messenger_sync_state").fetchone()
    # The platform makes visible late a message stamped a minute before the watermark.
    late = min(sim.pages[PAGE].threads.values(), key=lambda t: t.updated_time)
    sim.add_message(late, "late arrival", at=watermark - timedelta(minutes=1))

    with_overlap = run(pool, sim, "incremental", overlap=timedelta(minutes=5))

    assert with_overlap.messages_new == 1
    assert stored_view(conn) == platform(sim)


# --- deletes ---------------------------------------------------------------------------


def test_full_sync_marks_what_is_gone_deleted_and_incremental_keeps_it(conn, pool, sim):
    register(conn)
    fill(sim, threads=8, messages=3)
    assert run(pool, sim, "full", page_size=3).status == "ok"
    assert build_thread_conversations(pool, [PAGE]).written.inserted == 8
    threads = sorted(sim.pages[PAGE].threads.values(), key=lambda t: t.id)
    sim.delete_thread(threads[0])
    sim.delete_message(threads[1].messages[0].id)

    incremental = run(pool, sim, "incremental", page_size=3)
    assert incremental.threads_deleted == 0  # only a full sync reconciles

    full = run(pool, sim, "full", page_size=3)

    assert (full.threads_deleted, full.messages_deleted) == (1, 4)  # 3 of the thread + 1
    assert stored_view(conn) == platform(sim)
    kept = conn.execute(
        "SELECT count(*) FROM contact_interaction_events WHERE deleted_at IS NOT NULL"
    ).fetchone()[0]
    assert kept == 4  # marked, not removed
    build_thread_conversations(pool, [PAGE], mode="incremental")
    deleted = conn.execute(
        "SELECT deleted_by FROM conversations WHERE crew_code = %s AND session_id = %s",
        (crew_code(PAGE), threads[0].participant_id),
    ).fetchone()
    assert deleted == ("source",)


# --- rate limits ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["app", "user", "page", "custom", "business"])
def test_each_throttling_code_waits_what_the_platform_says_then_resumes(conn, pool, sim, kind):
    register(conn)
    fill(sim, threads=9, messages=2)
    sim.throttle_next(kind, times=1, regain_minutes=2, status=403 if kind == "user" else 400)
    sleeps = Sleeps()

    outcome = run(pool, sim, "full", client=client_for(sim, sleep=sleeps), page_size=4)

    assert outcome.status == "ok", outcome.error
    assert outcome.throttle_waits == 1 and 120.0 in sleeps
    assert stored_view(conn) == platform(sim)


def test_throttling_without_a_figure_backs_off_and_http_429_counts(conn, pool, sim):
    register(conn)
    fill(sim, threads=3, messages=1)
    sim.fail_next(Scripted(429, {}, {}), Scripted(400, {"error": {"code": 613, "message": "x"}}))
    sleeps = Sleeps()

    outcome = run(pool, sim, client=client_for(sim, sleep=sleeps, throttle_backoff_seconds=7))

    assert outcome.status == "ok" and outcome.throttle_waits == 2
    assert sleeps[:2] == [7, 14]


def test_usage_headers_slow_the_sync_down_before_the_limit(conn, pool, sim):
    register(conn)
    fill(sim, threads=6, messages=1)
    sim.usage = {"app": 10, "page": 90, "buc": 20}
    sleeps = Sleeps()

    outcome = run(
        pool,
        sim,
        "full",
        client=client_for(sim, sleep=sleeps, usage_threshold=80, slowdown_max_seconds=20),
        page_size=2,
    )

    assert outcome.status == "ok" and outcome.slowdown_waits == outcome.calls - 1
    assert sleeps and all(s == pytest.approx(10.0) for s in sleeps)  # (90-80)/(100-80) x 20


def test_a_wait_longer_than_the_maximum_stops_cleanly_and_keeps_progress(conn, pool, sim):
    register(conn)
    fill(sim, threads=10, messages=2)
    assert run(pool, sim, "full").status == "ok"
    sim.advance(600)
    for thread in sim.pages[PAGE].threads.values():
        sim.add_message(thread, "more")
    sim.throttle_next("business", times=1, regain_minutes=60, match="after=")

    stopped = run(pool, sim, client=client_for(sim, max_throttle_wait=300), page_size=4)

    assert stopped.status == "throttled" and "3600 s" in stopped.error
    assert stopped.messages_new == 4  # the first API page committed
    state = conn.execute("SELECT watermark, throttled_until FROM messenger_sync_state").fetchone()
    assert state[0] == stopped.watermark_before and state[1] is not None
    resumed = run(pool, sim, page_size=4)
    assert resumed.status == "ok" and resumed.messages_new == 6
    assert stored_view(conn) == platform(sim)


def test_transient_errors_are_retried(conn, pool, sim):
    register(conn)
    fill(sim, threads=3, messages=1)
    transient = {
        "error": {"code": 2, "message": "Service temporarily unavailable", "is_transient": True}
    }
    sim.fail_next(
        Scripted(500, transient),
        Scripted(503, b"<html>bad gateway</html>"),
        Scripted(200, b"{truncated"),
    )

    outcome = run(pool, sim)

    assert outcome.status == "ok" and outcome.retries == 3
    assert stored_view(conn) == platform(sim)


# --- tokens --------------------------------------------------------------------------------


def test_an_invalid_token_fails_that_page_only_and_is_never_shown(conn, pool, sim, caplog):
    register(conn)
    register(conn, OTHER, "globex")
    fill(sim, threads=3, messages=2)
    fill(sim, threads=2, messages=2, page_id=OTHER)
    bad = GraphClient(base_url=sim.base, token="wrong-token-CCCC", page_id=PAGE)
    said: list[str] = []

    with pool.connection() as c:
        pages = {p.page_id: p for p in load_pages(c)}
    failed = sync_page(pool, bad, pages[PAGE], SyncOptions(mode="full"), said.append)
    good = sync_page(pool, client_for(sim, OTHER), pages[OTHER], SyncOptions(), said.append)

    assert (
        failed.status == "failed" and PAGE in failed.error and "invalid or expired" in failed.error
    )
    assert good.status == "ok"
    text = " ".join(said) + repr(failed) + repr(good) + caplog.text
    for token in ("wrong-token-CCCC", "secret-token-one-AAAA", "secret-token-two-BBBB"):
        assert token not in text
    (error,) = conn.execute(
        "SELECT last_error FROM messenger_sync_state WHERE page_id = %s", (PAGE,)
    ).fetchone()
    assert "wrong-token" not in error and PAGE in error
    # The token went in a header, never in a URL.
    assert all("access_token" not in r["query"] for r in sim.requests)


# --- bad input ------------------------------------------------------------------------------


def test_bad_items_are_stored_where_they_make_sense_else_rejected(conn, pool, sim):
    register(conn)
    good = sim.add_thread(PAGE, "Good", at=START)
    sim.add_message(good, "fine", at=START + timedelta(seconds=1))
    odd = sim.add_message(good, "x", at=START + timedelta(seconds=2))
    odd.raw = {"id": odd.id, "created_time": "yesterday", "from": {"id": "1"}}
    numeric = sim.add_message(good, "y", at=START + timedelta(seconds=3))
    numeric.raw = {
        "id": numeric.id,
        "created_time": "2026-11-20T09:00:03+0000",
        "from": {"id": good.participant_id},
        "message": 42,
    }
    nul = sim.add_message(good, "a\x00b\ud800c", at=START + timedelta(seconds=4))
    broken = sim.add_thread(PAGE, "Broken", at=START + timedelta(seconds=5))
    sim.add_message(broken, "lost", at=START + timedelta(seconds=5))
    broken.overrides = {"updated_time": 12345}
    no_one = sim.add_thread(PAGE, "Nobody", at=START + timedelta(seconds=6))
    no_one.overrides = {"participants": {"data": [{"id": PAGE}]}, "senders": "nope"}
    typed = sim.add_thread(PAGE, "Typed", at=START + timedelta(seconds=7))
    sim.add_message(typed, "ok", at=START + timedelta(seconds=7))
    typed.overrides = {
        "message_count": "12",
        "unread_count": [1],
        "snippet": {"a": 1},
        "can_reply": "yes",
    }

    outcome = run(pool, sim, "full")

    assert outcome.status == "ok", outcome.error
    assert outcome.rejects == 4
    reasons = dict(
        conn.execute("SELECT item_key, reason FROM messenger_rejects ORDER BY 1").fetchall()
    )
    assert "not a time" in reasons[odd.id] and "int, not text" in reasons[numeric.id]
    assert "not a time" in reasons[broken.id] and "no participant" in reasons[no_one.id]
    (text,) = conn.execute(
        "SELECT text FROM contact_interaction_events WHERE message_id = %s", (nul.id,)
    ).fetchone()
    assert text == "ab\ufffdc" or text == "ab?c"
    row = conn.execute(
        """SELECT message_count, unread_count, snippet, can_reply FROM messenger_conversations
           WHERE thread_id = %s""",
        (typed.id,),
    ).fetchone()
    assert row == (12, None, None, None)


def test_a_malformed_list_response_is_rejected_not_fatal(conn, pool, sim):
    register(conn)
    fill(sim, threads=3, messages=1)
    sim.fail_next(Scripted(200, {"data": "oops", "paging": {}}))

    outcome = run(pool, sim, "full")

    assert outcome.status == "ok" and outcome.rejects == 1
    assert conn.execute("SELECT item_kind FROM messenger_rejects").fetchone() == ("response",)


def test_times_a_reader_cannot_load_are_rejected_and_other_tenants_build(conn, pool, sim):
    register(conn)
    register(conn, OTHER, "globex")
    fill(sim, threads=3, messages=2)
    fill(sim, threads=2, messages=2, page_id=OTHER)
    far = sim.add_thread(PAGE, "Far", at=START)
    sim.add_message(far, "hi", at=START)
    far.overrides = {"updated_time": "9999-12-31T23:00:00-0200"}  # year 10000 in UTC
    old = sim.add_thread(PAGE, "Ancient", at=START)
    ancient = sim.add_message(old, "hi", at=START)
    ancient.raw = {
        "id": ancient.id,
        "created_time": "0001-01-01T00:30:00+0100",  # year 0 in UTC
        "from": {"id": old.participant_id},
        "message": "hi",
    }

    outcome = run(pool, sim, "full")

    assert outcome.status == "ok" and outcome.rejects == 2
    reasons = dict(conn.execute("SELECT item_key, reason FROM messenger_rejects").fetchall())
    assert "years 1 to 9999" in reasons[far.id] and "years 1 to 9999" in reasons[ancient.id]
    assert run(pool, sim, "incremental").status == "ok"
    assert run(pool, sim, "full", page_id=OTHER).status == "ok"
    report = build_thread_conversations(pool, [PAGE, OTHER])
    assert report.written.inserted == 3 + 1 + 2  # the ancient message's thread, without it
    assert conn.execute(
        "SELECT count(*) FROM conversations WHERE client_code = 'globex'"
    ).fetchone() == (2,)


def test_a_thread_stamped_in_the_future_never_freezes_the_watermark(conn, pool, sim):
    register(conn)
    fill(sim, threads=5, messages=2)
    assert run(pool, sim, "full").status == "ok"
    future = sim.add_thread(PAGE, "Future", at=START.replace(year=2099))
    sim.add_message(future, "hi", at=START.replace(year=2099))

    outcome = run(pool, sim, "incremental")

    assert outcome.status == "ok" and outcome.threads_new == 1
    (watermark,) = conn.execute("SELECT watermark FROM messenger_sync_state").fetchone()
    assert watermark.year < 2099  # a thread past the clock never sets it
    sim.advance(3600)
    sim.add_message(sorted(sim.pages[PAGE].threads.values(), key=lambda t: t.id)[0], "later")
    sim.add_message(sim.add_thread(PAGE, "Brand new"), "hello")
    assert run(pool, sim, "incremental").status == "ok"
    assert stored_view(conn) == platform(sim)


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_an_unreadable_messages_answer_leaves_the_thread_for_the_next_pass(conn, pool, sim, mode):
    register(conn)
    fill(sim, threads=3, messages=2)
    chatty = sim.add_thread(PAGE, "Chatty", at=START)
    for n in range(60):  # past the 25 nested: /messages calls
        sim.add_message(chatty, f"m{n}", at=START + timedelta(seconds=n))
    assert run(pool, sim, "full").status == "ok"
    sim.advance(600)
    for n in range(40):
        sim.add_message(chatty, f"new {n}")
    sim.fail_next(Scripted(200, {"data": "oops"}, match="/messages"))

    outcome = run(pool, sim, mode)

    assert outcome.status == "ok" and outcome.rejects == 1
    assert outcome.messages_deleted == 0  # nothing read whole, nothing marked deleted
    assert conn.execute(
        "SELECT count(*) FROM contact_interaction_events WHERE deleted_at IS NOT NULL"
    ).fetchone() == (0,)
    # The thread was left as stored, below the watermark: the next pass reads it whole.
    again = run(pool, sim, "incremental")
    assert again.status == "ok" and again.message_calls >= 1
    assert stored_view(conn) == platform(sim)


def test_a_thread_id_the_api_cannot_be_asked_for_is_rejected_not_fatal(conn, pool, sim):
    register(conn)
    fill(sim, threads=4, messages=2)
    odd = sim.add_thread(PAGE, "Odd", at=START)
    for n in range(30):  # past the nested 25: reading it whole needs its id
        sim.add_message(odd, f"m{n}", at=START + timedelta(seconds=n))
    odd.overrides = {"id": "t odd/id"}

    outcome = run(pool, sim, "full")

    assert outcome.status == "ok" and outcome.threads_new == 4
    (reason,) = conn.execute(
        "SELECT reason FROM messenger_rejects WHERE item_key = 't odd/id'"
    ).fetchone()
    assert "cannot be asked for" in reason
    # One stored before ids were checked, now gone: the full listing is enough to say so.
    conn.execute(
        """INSERT INTO messenger_conversations (page_id, sender_id, client_code, thread_id,
               updated_time) VALUES (%s, 'legacy', 'acme', 't legacy#1', %s)""",
        (PAGE, START),
    )
    again = run(pool, sim, "full")
    assert again.status == "ok" and again.threads_deleted == 1


def test_a_message_in_the_stored_second_is_seen_by_the_probe_and_the_sync(conn, pool, sim):
    register(conn)
    fill(sim, threads=3, messages=2)
    assert run(pool, sim, "full").status == "ok"
    sim.advance(600)
    thread = next(iter(sim.pages[PAGE].threads.values()))
    at = sim.now()
    sim.add_message(thread, "first of a burst", at=at)
    assert run(pool, sim, "incremental").status == "ok"
    (page,) = load_pages(conn, [PAGE])
    assert not probe_page(conn, client_for(sim), page)

    sim.add_message(thread, "second of the burst", at=at)  # the same second

    assert probe_page(conn, client_for(sim), page)
    assert run(pool, sim, "incremental").messages_new == 1
    assert stored_view(conn) == platform(sim)
    assert not probe_page(conn, client_for(sim), page)


def test_a_page_registered_again_under_another_client_keeps_its_rows(conn, pool, sim):
    register(conn, PAGE, "acme")
    fill(sim, threads=3, messages=2)
    assert run(pool, sim, "full").status == "ok"
    build_thread_conversations(pool, [PAGE])
    conn.execute("UPDATE messenger_pages SET client_code = 'globex' WHERE page_id = %s", (PAGE,))

    outcome = run(pool, sim, "full")

    assert outcome.status == "failed"
    assert "stored under client acme" in outcome.error and "globex" in outcome.error
    for table in ("messenger_conversations", "contact_interaction_events", "conversations"):
        clients = conn.execute(
            sql.SQL("SELECT DISTINCT client_code FROM {}").format(sql.Identifier(table))
        ).fetchall()
        assert clients == [("acme",)]


def test_a_thread_with_tens_of_thousands_of_messages(conn, pool, sim):
    register(conn)
    thread = sim.add_thread(PAGE, "Chatty", at=START)
    with sim.lock:
        for n in range(20_000):
            sim.add_message(thread, f"message {n} 💬", at=START + timedelta(seconds=n))

    outcome = run(pool, sim, "full")

    assert outcome.status == "ok" and outcome.messages_new == 20_000
    assert outcome.message_calls == 200  # 25 nested, then 100 a call
    report = build_thread_conversations(pool, [PAGE])
    assert report.written.inserted == 1
    (count,) = conn.execute(
        "SELECT message_count FROM conversations WHERE crew_code = %s", (crew_code(PAGE),)
    ).fetchone()
    assert count == 20_000


# --- conversations -----------------------------------------------------------------------------


def test_every_thread_is_a_conversation_of_the_right_client(conn, pool, sim):
    register(conn)
    register(conn, OTHER, "globex")
    fill(sim, threads=5, messages=3)
    fill(sim, threads=4, messages=2, page_id=OTHER)
    assert run(pool, sim, "full").status == "ok"
    assert run(pool, sim, "full", page_id=OTHER).status == "ok"

    report = build_thread_conversations(pool, [PAGE, OTHER])

    assert report.written.inserted == 9 and report.queue_left == 0
    rows = conn.execute(
        """SELECT c.client_code, c.channel, c.user_id, c.message_count, c.full_conversation
           FROM conversations AS c ORDER BY c.crew_code, c.session_id"""
    ).fetchall()
    assert {r[0] for r in rows[:5]} == {"acme"} and {r[0] for r in rows[5:]} == {"globex"}
    assert all(r[1] == "messenger" for r in rows)
    assert sorted(r[2] for r in rows[:5]) == sorted(
        t.participant_id for t in sim.pages[PAGE].threads.values()
    )
    assert all(r[4].startswith(("User:", "Assistant:")) for r in rows)
    # Nothing changed: a second build writes nothing, an incremental sync queues nothing.
    assert run(pool, sim).threads_updated == 0
    assert build_thread_conversations(pool, [PAGE, OTHER]).threads == 0


def test_a_conversation_whose_thread_is_gone_is_not_restored(conn, pool, sim):
    register(conn)
    fill(sim, threads=3, messages=2)
    assert run(pool, sim, "full").status == "ok"
    build_thread_conversations(pool, [PAGE])
    thread = sorted(sim.pages[PAGE].threads.values(), key=lambda t: t.id)[0]
    conversation = conversation_id(crew_code(PAGE), thread.participant_id)
    assert reads.soft_delete(conn, "acme", conversation)  # the product deletes it
    sim.delete_thread(thread)  # then the platform does
    assert run(pool, sim, "full").threads_deleted == 1
    build_thread_conversations(pool, [PAGE])

    assert not reads.restore(conn, "acme", conversation)

    listed = reads.list_conversations(conn, "acme", page_size=50).items
    assert conversation not in {item.id for item in listed}
    # A thread still on the platform is restored as before.
    other = sorted(sim.pages[PAGE].threads.values(), key=lambda t: t.id)[1]
    kept = conversation_id(crew_code(PAGE), other.participant_id)
    assert reads.soft_delete(conn, "acme", kept) and reads.restore(conn, "acme", kept)


# --- kills ---------------------------------------------------------------------------------------

_CHILD = """
import sys
from psycopg_pool import ConnectionPool
from conversation_assets.messenger import SyncOptions, load_pages, sync_page
from conversation_assets.messenger_api import GraphClient
db_url, base, token, page_id = sys.argv[1:5]
with ConnectionPool(db_url, min_size=1, max_size=4, kwargs={"autocommit": True}) as pool:
    with pool.connection() as conn:
        (page,) = load_pages(conn, [page_id])
    client = GraphClient(base_url=base, token=token, page_id=page_id)
    print(sync_page(pool, client, page, SyncOptions(mode="full", page_size=5)).status)
"""


def _child(db_url: str, sim: GraphSim) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, db_url, sim.base, sim.pages[PAGE].token, PAGE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_killed_between_pages_then_rerun_is_exact(conn, pool, sim):
    register(conn)
    fill(sim, threads=40, messages=3)
    sim.latency = 0.05
    child = _child(conn.info.dsn, sim)
    _wait_for(lambda: sim.counts().get("list", 0) >= 3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    sim.latency = 0.0
    partial = conn.execute("SELECT count(*) FROM messenger_conversations").fetchone()[0]
    assert 0 < partial < 40
    assert conn.execute("SELECT watermark FROM messenger_sync_state").fetchone() is None

    assert run(pool, sim, page_size=5).status == "ok"

    assert stored_view(conn) == platform(sim)


def test_killed_inside_a_write_then_rerun_is_exact(conn, pool, sim, db_url):
    register(conn)
    fill(sim, threads=20, messages=3)
    with psycopg.connect(db_url) as blocker:
        # Holding this lock stops the child's first write after it upserted the threads
        # and before its messages: it is killed in the middle of a transaction.
        blocker.execute("LOCK TABLE contact_interaction_events IN SHARE MODE")
        child = _child(db_url, sim)
        _wait_for(
            lambda: (
                conn.execute(
                    """SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                   AND query LIKE '%%INSERT INTO contact_interaction_events%%'"""
                ).fetchone()
                is not None
            )
        )
        child.send_signal(signal.SIGKILL)
        child.wait()
        blocker.rollback()
    _wait_for(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ).fetchone()[0]
            == 0
        )
    )
    assert conn.execute("SELECT count(*) FROM messenger_conversations").fetchone()[0] == 0

    assert run(pool, sim, page_size=5).status == "ok"

    assert stored_view(conn) == platform(sim)
