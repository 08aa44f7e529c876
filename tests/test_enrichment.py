"""Enriched conversations, metrics, performance figures, dashboards and their Dagster layer."""

import random
import threading
import time
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from conversation_assets import dashboards, demo, locks
from conversation_assets.assets.conversations import conversations
from conversation_assets.assets.discovery import discovered_sessions
from conversation_assets.assets.enrichment import (
    conversation_metrics,
    enriched_conversations,
    enriched_matches_conversations,
    performance_stats,
)
from conversation_assets.enrichment import (
    ProductTableError,
    enrich,
    refresh_metrics,
    refresh_performance,
)
from conversation_assets.partitions import daily_partitions
from conversation_assets.store import conversation_id, upsert_conversations
from jobs import INCREMENTAL_RUN_CONFIG
from resources.summarizer import SummarizerResource
from schedules import build_metrics_schedule, performance_stats_schedule
from sensors import METRICS_PERIODS_PER_TICK, build_metrics_sensor
from tests.sources import DAY, add_crew, record, run_pipeline, say, stats_flush

EVERY_DAY = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
COLUMNS = (
    "id, client_code, user_id, channel, status, summary, message_count, has_embedding, "
    "user_insights, ticket_identifier, ticket_state, latest_messages, created_at"
)


def enriched(conn, columns=COLUMNS):
    statement = sql.SQL("SELECT {} FROM enriched_conversations ORDER BY id")
    return conn.execute(statement.format(sql.SQL(columns))).fetchall()


def versions(conn):
    return dict(conn.execute("SELECT session_id, xmin::text FROM enriched_conversations"))


def counted(conn):
    """Publish this session's write counters now: a refresh reads a product table
    again only once its counters moved (they are flushed lazily)."""
    stats_flush(conn)
    conn.execute("SELECT 1")


def product_tables(conn):
    demo.create_product_tables(conn)
    conn.execute(
        "INSERT INTO user_insights (client_code, user_id, plan, lifetime_value) "
        "VALUES ('acme', 'u1', 'free', 10), ('acme', 'u2', 'pro', 99), "
        "('other', 'u1', 'enterprise', 5)"
    )


def seed(conn, n=6):
    """n conversations of acme over two days, users u1/u2 alternating."""
    upsert_conversations(
        conn,
        [
            record(
                f"s{i}",
                user_id=f"u{1 + i % 2}",
                created_at=DAY + timedelta(days=i % 2, minutes=i),
                last_message_at=DAY + timedelta(days=i % 2, minutes=i + 3),
                message_count=2 + i,
                channel=("web", "telegram")[i % 2],
            )
            for i in range(n)
        ],
    )


def incremental(postgres, **kwargs):
    return enrich(postgres.pool, mode="incremental", **kwargs)


# --- what the refresh picks up -------------------------------------------------------


def test_each_kind_of_changed_input_is_picked_up_and_nothing_else_is_rewritten(conn, postgres):
    product_tables(conn)
    seed(conn, 8)  # u1 has s0, s2, s4, s6; u2 has s1, s3, s5, s7
    first = incremental(postgres)
    assert (first.written, first.removed) == (8, 0)
    rows = {r[0]: r for r in enriched(conn)}
    s0 = rows[conversation_id("crew", "s0")]
    assert {k: s0[8][k] for k in ("plan", "lifetime_value")} == {
        "plan": "free",
        "lifetime_value": 10,
    }
    assert s0[11].endswith("Assistant: hi!")  # the latest messages' excerpt
    assert conn.execute("SELECT count(*) FROM enrichment_queue").fetchone() == (0,)

    # Nothing changed: nothing rewritten.
    before = versions(conn)
    again = incremental(postgres)
    assert (again.conversations, again.written) == (0, 0)
    assert versions(conn) == before

    # 1. a conversation changed (by whoever writes it).
    upsert_conversations(
        conn, [record("s2", user_id="u1", summary="new summary", created_at=DAY, message_count=4)]
    )
    # 2. a user's insights changed (u1's: s0, s2, s4, s6).
    conn.execute(
        "UPDATE user_insights SET plan = 'team' WHERE client_code = 'acme' AND user_id = 'u1'"
    )
    # 3. a ticket appeared for s3.
    conn.execute(
        "INSERT INTO linked_tickets VALUES (%s, 'acme', 'SUP-1', 'Refund', 'Todo', 'https://t/1')",
        (conversation_id("crew", "s3"),),
    )
    # 4. the product closed s5 (an UPDATE straight in SQL) and deleted s1.
    counted(conn)
    conn.execute("UPDATE conversations SET status = 'closed' WHERE session_id = 's5'")
    conn.execute(
        "UPDATE conversations SET deleted_at = now(), deleted_by = 'product' "
        "WHERE session_id = 's1'"
    )
    report = incremental(postgres)

    after = versions(conn)
    rewritten = {s for s in after if after[s] != before.get(s)}
    assert rewritten == {"s0", "s2", "s4", "s6", "s3", "s5"}  # s7 kept its row version
    assert "s1" not in after and report.removed == 1
    assert (report.queued_for_insights, report.queued_for_tickets) == (4, 1)
    got = {r[0]: r for r in enriched(conn)}
    assert got[conversation_id("crew", "s2")][5] == "new summary"
    assert got[conversation_id("crew", "s4")][8]["plan"] == "team"
    assert got[conversation_id("crew", "s3")][9:11] == ("SUP-1", "Todo")
    assert got[conversation_id("crew", "s5")][4] == "closed"

    # The ticket moves on and the user's insights row goes: both are seen.
    conn.execute("UPDATE linked_tickets SET state = 'Done'")
    conn.execute("DELETE FROM user_insights WHERE client_code = 'acme' AND user_id = 'u2'")
    counted(conn)
    incremental(postgres)
    got = {r[0]: r for r in enriched(conn)}
    assert got[conversation_id("crew", "s3")][10] == "Done"
    assert got[conversation_id("crew", "s7")][8] is None
    # Tenants never mix: 'other' has a u1 too, and acme's u1 rows carry acme's insights.
    assert got[conversation_id("crew", "s4")][8]["plan"] == "team"


def test_new_messages_flow_from_the_source_to_the_enriched_row(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    say(conn, "histories", "chat-1", "human", "My card was declined", at=DAY, user_id="u7")
    say(conn, "histories", "chat-1", "ai", "Let me check that.", at=DAY + timedelta(minutes=1))
    run_pipeline(postgres)
    incremental(postgres)
    assert enriched(conn, "message_count, duration_seconds, user_id") == [(2, 60.0, "u7")]

    say(conn, "histories", "chat-1", "human", "Thanks, it works", at=DAY + timedelta(minutes=5))
    run_pipeline(postgres)
    report = incremental(postgres)
    assert report.written == 1
    row = enriched(conn, "message_count, duration_seconds, latest_messages")[0]
    assert row[:2] == (3, 300.0)
    assert row[2].endswith("User: Thanks, it works")


def test_missing_product_tables_leave_their_columns_empty(conn, postgres):
    seed(conn, 2)
    report = incremental(postgres)
    assert report.missing_tables == ["user_insights", "linked_tickets"]
    assert report.written == 2
    assert {r[8] for r in enriched(conn)} == {None}


def test_the_excerpt_is_bounded(conn, postgres):
    upsert_conversations(conn, [record("long", full_conversation="User: " + "x" * 50_000)])
    incremental(postgres, excerpt_chars=300)
    assert conn.execute(
        "SELECT length(latest_messages) FROM enriched_conversations"
    ).fetchone() == (300,)


def test_a_run_takes_only_what_was_queued_before_it_started(conn, postgres):
    seed(conn, 4)
    seen = []

    def change_while_running(message: str) -> None:
        seen.append(message)
        if len(seen) == 1:  # after the first batch: s0 changes again
            with psycopg.connect(postgres.database_url, autocommit=True) as other:
                upsert_conversations(
                    other, [record("s0", user_id="u2", summary="later", created_at=DAY)]
                )

    report = enrich(postgres.pool, mode="incremental", batch_size=2, progress=change_while_running)
    assert report.conversations == 4  # s0 was not taken twice
    assert conn.execute("SELECT count(*) FROM enrichment_queue").fetchone() == (1,)
    incremental(postgres)
    assert conn.execute(
        "SELECT summary FROM enriched_conversations WHERE session_id = 's0'"
    ).fetchone() == ("later",)


# --- incremental equals full -----------------------------------------------------------


def test_incremental_equals_a_full_rebuild_after_random_changes(conn, postgres):
    rng = random.Random(4)
    product_tables(conn)
    sessions = [f"s{i:02}" for i in range(40)]
    for round_number in range(5):
        batch = []
        for session in rng.sample(sessions, 12):
            batch.append(
                record(
                    session,
                    user_id=rng.choice(["u1", "u2", "u3"]),
                    summary=f"round {round_number}",
                    channel=rng.choice(["web", "whatsapp"]),
                    status=rng.choice(["active", "handoff_complete"]),
                    created_at=DAY + timedelta(days=rng.randrange(3), hours=rng.randrange(24)),
                    message_count=rng.randrange(1, 30),
                    sentiment=rng.uniform(-1, 1),
                )
            )
        upsert_conversations(conn, batch)
        gone = rng.choice(sessions)
        conn.execute(
            "UPDATE conversations SET deleted_at = now(), deleted_by = 'product' "
            "WHERE session_id = %s",
            (gone,),
        )
        if round_number == 2:
            conn.execute("DELETE FROM conversations WHERE session_id = %s", (rng.choice(sessions),))
        conn.execute(
            "UPDATE user_insights SET lifetime_value = lifetime_value + %s WHERE user_id = %s",
            (round_number, rng.choice(["u1", "u2"])),
        )
        conn.execute(
            "INSERT INTO linked_tickets SELECT id, client_code, 'T-' || session_id, 't', %s, 'u' "
            "FROM conversations WHERE session_id = %s "
            "ON CONFLICT (conversation_id) DO UPDATE SET state = EXCLUDED.state",
            (f"state {round_number}", rng.choice(sessions)),
        )
        counted(conn)
        report = incremental(postgres, batch_size=7)
        days = sorted(report.touched_days)
        if days:
            start = datetime.combine(days[0], datetime.min.time(), UTC)
            end = datetime.combine(days[-1], datetime.min.time(), UTC) + timedelta(days=1)
            refresh_metrics(postgres.pool, (start, end))

    columns = COLUMNS.replace("id, ", "session_id, ", 1)
    incremental_rows = enriched(conn, columns)
    incremental_metrics = conn.execute(
        "SELECT * FROM conversation_metrics ORDER BY 1, 2, 3, 4"
    ).fetchall()
    conn.execute("TRUNCATE enriched_conversations, enrichment_source_state, conversation_metrics")
    enrich(postgres.pool, mode="full", window=EVERY_DAY, batch_size=9)
    refresh_metrics(postgres.pool, EVERY_DAY)

    assert enriched(conn, columns) == incremental_rows
    drop_times = lambda rows: [r[:-1] for r in rows]  # noqa: E731 - refreshed_at differs
    assert drop_times(
        conn.execute("SELECT * FROM conversation_metrics ORDER BY 1, 2, 3, 4").fetchall()
    ) == drop_times(incremental_metrics)
    # And a full refresh over what is already right rewrites nothing.
    before = versions(conn)
    assert enrich(postgres.pool, mode="full", window=EVERY_DAY).written == 0
    assert versions(conn) == before


# --- readers are never blocked ---------------------------------------------------------


def test_readers_see_the_old_rows_while_a_refresh_runs_then_the_new(conn, postgres, db_url):
    seed(conn, 4)
    incremental(postgres)
    refresh_metrics(postgres.pool, EVERY_DAY)
    upsert_conversations(
        conn,
        [
            record(
                f"s{i}",
                summary="v2",
                user_id=f"u{1 + i % 2}",
                created_at=DAY + timedelta(days=i % 2, minutes=i),
                message_count=2 + i,
                channel=("web", "telegram")[i % 2],
            )
            for i in range(4)
        ],
    )
    upsert_conversations(conn, [record("s9", created_at=DAY)])

    with psycopg.connect(db_url) as holder:
        # A row lock on one enriched row and one metrics row: the refreshes stop there,
        # mid-transaction, having written the rows before it.
        holder.execute("SELECT 1 FROM enriched_conversations WHERE session_id = 's3' FOR UPDATE")
        holder.execute("SELECT 1 FROM conversation_metrics WHERE channel = 'telegram' FOR UPDATE")
        refresh = threading.Thread(target=incremental, args=(postgres,))
        metrics = threading.Thread(target=refresh_metrics, args=(postgres.pool, EVERY_DAY))
        refresh.start()
        metrics.start()
        _wait_for_lock_waits(conn, 2)

        with psycopg.connect(db_url, autocommit=True) as reader:
            reader.execute("SET lock_timeout = '1s'; SET statement_timeout = '2s'")
            started = time.perf_counter()
            summaries = {r[0] for r in reader.execute("SELECT summary FROM enriched_conversations")}
            totals = reader.execute(
                "SELECT sum(conversations) FROM conversation_metrics"
            ).fetchone()
            assert time.perf_counter() - started < 1.5
        assert summaries == {"hello from s0", "hello from s1", "hello from s2", "hello from s3"}
        assert totals == (4,)
        holder.rollback()
        refresh.join(timeout=30)
        metrics.join(timeout=30)

    assert {r[0] for r in conn.execute("SELECT summary FROM enriched_conversations")} == {
        "v2",
        "hello from s9",
    }


def _wait_for_lock_waits(conn, count):
    for _ in range(200):
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        ).fetchone()[0]
        if waiting >= count:
            return
        time.sleep(0.05)
    raise AssertionError("the refreshes never reached the locked rows")


# --- metrics, performance and dashboards ------------------------------------------------


def test_metrics_figures_and_dashboard_reads(conn, postgres):
    seed(conn)
    conn.execute(
        "UPDATE conversations SET status = 'handoff_complete', sentiment = 0.5 "
        "WHERE session_id = 's0'"
    )
    incremental(postgres)
    refresh_metrics(postgres.pool, EVERY_DAY)
    day0 = conn.execute(
        "SELECT channel, status, conversations, messages, avg_duration_seconds, "
        "p95_duration_seconds, handed_off, avg_sentiment FROM conversation_metrics "
        "WHERE day = %s ORDER BY status",
        (DAY.date(),),
    ).fetchall()
    # s0, s2, s4 started on DAY (web); s0 handed off; 3 minutes each.
    assert day0 == [
        ("web", "active", 2, 4 + 6, 180.0, 180.0, 0, None),
        ("web", "handoff_complete", 1, 2, 180.0, 180.0, 1, 0.5),
    ]

    first, last = DAY.date(), DAY.date() + timedelta(days=1)
    series = dashboards.daily_series(conn, "acme", first, last)
    assert [(d.day, d.conversations, d.messages, d.handed_off) for d in series] == [
        (first, 3, 12, 1),
        (last, 3, 3 + 5 + 7, 0),
    ]
    assert series[0].avg_sentiment == pytest.approx(0.5)
    assert dashboards.daily_series(conn, "other", first, last) == []
    top = dashboards.top_channels(conn, "acme", first, last, limit=1)
    assert [(c.channel, c.conversations) for c in top] == [("telegram", 3)]
    hours = dashboards.last_24_hours(conn, "acme", now=DAY + timedelta(hours=1))
    assert len(hours) == 24 and sum(n for _, n in hours) == 3
    assert hours[-2] == (DAY.replace(minute=0), 3)
    with pytest.raises(ValueError, match="before first_day"):
        dashboards.daily_series(conn, "acme", last, first)

    # Past hours come from performance_stats once refreshed (here doctored, to see
    # which path answered); an hour marked stale, and the current one, are live.
    refresh_performance(
        postgres.pool, (DAY.replace(hour=0), DAY.replace(hour=0) + timedelta(days=2))
    )
    conn.execute(
        "UPDATE performance_stats SET conversations_by_client = '{\"acme\": 7}' WHERE hour = %s",
        (DAY.replace(minute=0),),
    )
    later = DAY + timedelta(hours=3)
    assert dict(dashboards.last_24_hours(conn, "acme", now=later))[DAY.replace(minute=0)] == 7
    conn.execute(
        "INSERT INTO metrics_dirty_periods (kind, period_start) VALUES ('hour', %s)",
        (DAY.replace(minute=0),),
    )
    assert dict(dashboards.last_24_hours(conn, "acme", now=later))[DAY.replace(minute=0)] == 3
    assert sum(n for _, n in dashboards.last_24_hours(conn, "other", now=later)) == 0


@pytest.mark.parametrize(
    ("read", "index"),
    [
        ("dashboard_daily_series", "conversation_metrics_pkey"),
        ("dashboard_top_channels", "conversation_metrics_pkey"),
        ("dashboard_last_24_hours", "conversations_client_created_idx"),
        ("dashboard_last_24_hours", "performance_stats_pkey"),
    ],
)
def test_each_dashboard_read_is_served_by_an_index(conn, read, index):
    from conversation_assets.queries import query

    params = {
        "client_code": "acme",
        "first_day": date(2026, 11, 1),
        "last_day": date(2026, 11, 30),
        "limit": 5,
        "now": DAY,
    }
    # Twenty clients' month of metrics and conversations, so the planner has a choice.
    conn.execute(
        "INSERT INTO conversation_metrics (client_code, day, channel, status, conversations, "
        "messages, with_embeddings, handed_off) "
        "SELECT 'c' || c, date '2026-10-01' + d, ch, 'active', 1, 1, 0, 0 "
        "FROM generate_series(1, 20) c, generate_series(0, 60) d, unnest(ARRAY['web', 'sms']) ch"
    )
    upsert_conversations(
        conn,
        [
            record(f"x{i}", client_code=f"c{i % 20}", created_at=DAY - timedelta(hours=i % 500))
            for i in range(2000)
        ],
    )
    conn.execute("ANALYZE conversation_metrics; ANALYZE conversations")
    statement = query(read).as_string(conn)
    plan = conn.execute("EXPLAIN " + statement, params).fetchall()
    text = "\n".join(r[0] for r in plan)
    assert index in text and "client_code = 'acme'" in text.split(index, 1)[1]


def test_performance_stats_count_conversations_and_the_pipelines_runs(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    now = datetime.now(UTC).replace(microsecond=0)
    say(conn, "histories", "live", "human", "hello", at=now, user_id="u1")
    resources = {"postgres": postgres, "summarizer": SummarizerResource()}
    result = dg.materialize(
        [discovered_sessions, conversations, enriched_conversations],
        partition_key=now.date().isoformat(),
        resources=resources,
        run_config=INCREMENTAL_RUN_CONFIG,
    )
    assert result.success
    hour = now.replace(minute=0, second=0)
    refresh_performance(postgres.pool, (hour, hour + timedelta(hours=1)))
    row = conn.execute(
        "SELECT conversations, conversations_by_client, messages, discovery_runs, rows_scanned, "
        "conversations_built, build_batches, enriched FROM performance_stats WHERE hour = %s",
        (hour,),
    ).fetchone()
    assert row == (1, {"acme": 1}, 1, 1, 1, 1, 1, 1)
    assert conn.execute("SELECT count(*) FROM pipeline_runs").fetchone() == (3,)


# --- the Dagster layer ------------------------------------------------------------------


def test_enrichment_and_metrics_assets_and_their_checks(conn, postgres):
    seed(conn)
    resources = {"postgres": postgres}
    key = DAY.date().isoformat()
    result = dg.materialize(
        [enriched_conversations, enriched_matches_conversations],
        partition_key=key,
        resources=resources,
        run_config={"ops": {"enriched_conversations": {"config": {"mode": "incremental"}}}},
    )
    assert result.success
    # The incremental run wrote both days and announces the other one.
    partitions = {
        e.event_specific_data.materialization.partition
        for e in result.get_asset_materialization_events()
    }
    assert partitions == {key, (DAY + timedelta(days=1)).date().isoformat()}
    assert result.get_asset_check_evaluations()[0].passed

    metrics = dg.materialize([conversation_metrics], partition_key=key, resources=resources)
    check = metrics.get_asset_check_evaluations()[0]
    assert check.passed and check.metadata["conversations_recounted"].value == 3

    # Enrichment lagging behind a change fails the recount loudly.
    conn.execute("UPDATE conversations SET message_count = 99 WHERE session_id = 's0'")
    metrics = dg.materialize([conversation_metrics], partition_key=key, resources=resources)
    check = metrics.get_asset_check_evaluations()[0]
    assert not check.passed and check.metadata["mismatched_rows"].value == 1

    # A row removed behind the pipeline's back (not queued) fails the enrichment check.
    conn.execute("DELETE FROM enriched_conversations WHERE session_id = 's2'")
    conn.execute("DELETE FROM enrichment_queue")
    evaluation = enriched_matches_conversations(postgres=postgres)
    assert not evaluation.passed
    assert evaluation.metadata["live_conversations_without_row"].value == 1
    # A full (backfill) run of the day repairs it.
    dg.materialize([enriched_conversations], partition_key=key, resources=resources)
    assert conn.execute("SELECT count(*) FROM enriched_conversations").fetchone() == (6,)


def test_metrics_sensor_refreshes_exactly_the_stale_days_and_hours(conn, postgres):
    seed(conn)
    # A run that stops after its first batch (a crash, or max_batches): the days and
    # hours that batch changed are marked stale in the batch's own transaction.
    report = enrich(postgres.pool, mode="incremental", batch_size=2, max_batches=1)
    assert report.batches == 1
    marked = conn.execute("SELECT kind, period_start FROM metrics_dirty_periods").fetchall()
    assert {kind for kind, _ in marked} == {"day", "hour"}

    sensor = build_metrics_sensor()
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        result = sensor(context)
    # One run per kind, over the span of the stale periods.
    ranges = {
        r.job_name: (r.partition_key_range.start, r.partition_key_range.end)
        for r in result.run_requests
    }
    days = sorted(start.date().isoformat() for kind, start in marked if kind == "day")
    hours = sorted(start.strftime("%Y-%m-%d-%H:%M") for kind, start in marked if kind == "hour")
    assert ranges == {
        "metrics_job": (days[0], days[-1]),
        "performance_stats_job": (hours[0], hours[-1]),
    }
    # The same marks again: the same run keys (no second run); a new mark: new keys.
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        again = sensor(context)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in result.run_requests]

    # The metrics job run over that range refreshes every day in it.
    from conversation_assets.definitions import defs

    run = defs.resolve_job_def("metrics_job").execute_in_process(
        tags=result.run_requests[0].tags
        if result.run_requests[0].job_name == "metrics_job"
        else result.run_requests[1].tags,
        resources={"postgres": postgres},
    )
    assert run.success
    assert conn.execute(
        "SELECT count(*) FROM metrics_dirty_periods WHERE kind = 'day'"
    ).fetchone() == (0,)

    incremental(postgres)  # the rest of the queue
    refresh_metrics(postgres.pool, EVERY_DAY)
    refresh_performance(postgres.pool, (DAY - timedelta(hours=9), DAY + timedelta(days=2)))
    assert conn.execute("SELECT count(*) FROM metrics_dirty_periods").fetchone() == (0,)
    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        assert isinstance(sensor(context), dg.SkipReason)


def test_refreshes_take_turns(conn, postgres):
    seed(conn)
    incremental(postgres)
    errors = []

    def refresh() -> None:
        try:
            refresh_metrics(postgres.pool, EVERY_DAY)
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=refresh) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert conn.execute("SELECT sum(conversations) FROM conversation_metrics").fetchone() == (6,)

    # An incremental refresh while another holds the lock steps aside; a full one waits.
    upsert_conversations(conn, [record("late", created_at=DAY)])
    with psycopg.connect(postgres.database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (locks.key("enrichment"),))
        skipped = incremental(postgres)
        assert skipped.skipped_reason and skipped.conversations == 0
        waiting = threading.Thread(
            target=enrich, args=(postgres.pool,), kwargs={"mode": "full", "window": EVERY_DAY}
        )
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive()
        holder.execute("SELECT pg_advisory_unlock(%s)", (locks.key("enrichment"),))
        waiting.join(timeout=30)
    assert conn.execute(
        "SELECT count(*) FROM enriched_conversations WHERE session_id = 'late'"
    ).fetchone() == (1,)


def test_product_tables_of_other_shapes_and_tenants(conn, postgres):
    # An integer user id, a text conversation id, no keys, and a row of another tenant.
    conn.execute("CREATE TABLE user_insights (client_code text, user_id integer, plan text)")
    conn.execute(
        "CREATE TABLE linked_tickets (conversation_id text, client_code text, identifier text, "
        "title text, state text, url text)"
    )
    upsert_conversations(conn, [record("a", user_id="7"), record("b", user_id="8")])
    a, b = conversation_id("crew", "a"), conversation_id("crew", "b")
    conn.execute("INSERT INTO user_insights VALUES ('acme', 7, 'pro'), ('other', 8, 'spy')")
    conn.execute(
        "INSERT INTO linked_tickets VALUES (%s, 'acme', 'A-1', 't', 'Todo', 'u'), "
        "(%s, 'zzz-other', 'X-9', 't', 'Todo', 'u'), (%s, 'acme', 'A-2', 't', 'Done', 'u'), "
        "('not-a-uuid', 'acme', 'A-3', 't', 'Todo', 'u')",
        (str(a).upper(), str(a), str(b)),
    )
    counted(conn)
    report = incremental(postgres)
    assert report.written == 2
    got = dict(
        (r[0], r[1:])
        for r in conn.execute(
            "SELECT session_id, user_insights, ticket_identifier FROM enriched_conversations"
        )
    )
    assert got == {"a": ({"plan": "pro"}, "A-1"), "b": (None, "A-2")}

    # Untouched product tables are not read again (their counters did not move): with
    # the saved hashes gone, reading them would queue both conversations again.
    conn.execute("DELETE FROM enrichment_source_state")
    idle = incremental(postgres)
    assert (idle.queued_for_insights, idle.queued_for_tickets) == (0, 0)
    # A full refresh always reads them.
    forced = enrich(postgres.pool, mode="full", window=EVERY_DAY)
    assert (forced.queued_for_insights, forced.queued_for_tickets) == (1, 2)
    conn.execute("ALTER TABLE linked_tickets DROP COLUMN url")
    with pytest.raises(ProductTableError, match="linked_tickets has no column url"):
        incremental(postgres)


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ((datetime(2026, 11, 20), datetime(2026, 11, 21)), "UTC datetimes"),
        ((DAY, DAY + timedelta(days=1)), "boundary"),
        ((EVERY_DAY[1], EVERY_DAY[0]), "not after"),
    ],
)
def test_metrics_windows_are_whole_utc_periods(postgres, window, message):
    with pytest.raises(ValueError, match=message):
        refresh_metrics(postgres.pool, window)


def _requested(schedule, postgres, tick: datetime) -> list[str]:
    from conversation_assets.definitions import defs

    with dg.build_schedule_context(
        scheduled_execution_time=tick,
        resources={"postgres": postgres},
        repository_def=defs.get_repository_def(),
    ) as context:
        data = schedule.evaluate_tick(context)
    return [r.partition_key for r in data.run_requests or []]


def test_marks_before_the_first_partition_never_hide_a_recent_one(conn, postgres):
    first = daily_partitions.start
    # Older history (say, a Messenger page's years of threads) marks days no partition
    # holds, more than a tick reads; one recent day is stale too.
    conn.execute(
        """INSERT INTO metrics_dirty_periods (kind, period_start)
           SELECT 'day', %s - n * interval '1 day' FROM generate_series(1, %s) AS n""",
        (first, METRICS_PERIODS_PER_TICK + 10),
    )
    recent = (datetime.now(UTC) - timedelta(days=3)).replace(hour=0, minute=0, second=0)
    recent = recent.replace(microsecond=0)
    conn.execute(
        "INSERT INTO metrics_dirty_periods (kind, period_start) VALUES ('day', %s)", (recent,)
    )

    with dg.build_sensor_context(resources={"postgres": postgres}) as context:
        result = build_metrics_sensor()(context)

    ((start, end),) = [
        (r.partition_key_range.start, r.partition_key_range.end) for r in result.run_requests
    ]
    assert start == end == recent.date().isoformat()


def test_the_refresh_schedules_skip_a_period_before_the_partitions_first_day(conn, postgres):
    first = daily_partitions.start
    conn.execute(
        "INSERT INTO metrics_dirty_periods (kind, period_start) VALUES ('day', %s), ('hour', %s)",
        (first - timedelta(days=1), first - timedelta(hours=1)),
    )
    # The first ticks: the day and the hour that just ended have no partition.
    assert _requested(build_metrics_schedule(), postgres, first + timedelta(minutes=30)) == []
    assert _requested(performance_stats_schedule, postgres, first + timedelta(minutes=5)) == []


def test_metrics_and_performance_schedules_run_only_when_something_changed(
    conn, postgres, monkeypatch
):
    daily, day_tick = build_metrics_schedule(), datetime(2026, 11, 21, 0, 30, tzinfo=UTC)
    hourly, hour_tick = performance_stats_schedule, datetime(2026, 11, 21, 13, 5, tzinfo=UTC)
    day, hour = datetime(2026, 11, 20, tzinfo=UTC), datetime(2026, 11, 21, 12, tzinfo=UTC)
    # Nothing happened: no run, a reason instead.
    assert _requested(daily, postgres, day_tick) == []
    assert _requested(hourly, postgres, hour_tick) == []

    # A change to the period's enriched rows marks it: the schedule runs for it.
    conn.execute(
        "INSERT INTO metrics_dirty_periods (kind, period_start) VALUES ('day', %s), ('hour', %s)",
        (day, hour),
    )
    assert _requested(daily, postgres, day_tick) == ["2026-11-20"]
    assert _requested(hourly, postgres, hour_tick) == ["2026-11-21-12:00"]
    refresh_metrics(postgres.pool, (day, day + timedelta(days=1)))
    refresh_performance(postgres.pool, (hour, hour + timedelta(hours=1)))
    assert _requested(daily, postgres, day_tick) == []
    assert _requested(hourly, postgres, hour_tick) == []

    # A discovery run that finished in the hour after its figures were written is
    # counted by a new refresh; a performance_stats run (the refresh's own) is not.
    record = (
        "INSERT INTO pipeline_runs (run_id, asset, finished_at, duration_ms) VALUES (%s, %s, %s, 1)"
    )
    conn.execute(record, ("own", "performance_stats", hour + timedelta(minutes=40)))
    conn.execute("UPDATE performance_stats SET refreshed_at = %s", (hour + timedelta(minutes=30),))
    assert _requested(hourly, postgres, hour_tick) == []
    conn.execute(record, ("d1", "discovered_sessions", hour + timedelta(minutes=45)))
    assert _requested(hourly, postgres, hour_tick) == ["2026-11-21-12:00"]
    assert performance_stats.partitions_def is not None

    monkeypatch.setenv("ENABLE_BACKGROUND_JOBS", "false")
    assert build_metrics_schedule().default_status == dg.DefaultScheduleStatus.STOPPED
    assert build_metrics_sensor().default_status == dg.DefaultSensorStatus.STOPPED
    monkeypatch.setenv("ENABLE_BACKGROUND_JOBS", "true")
    assert build_metrics_sensor().default_status == dg.DefaultSensorStatus.RUNNING


def test_a_large_batch_is_split_over_two_connections_with_the_same_result(
    conn, postgres, monkeypatch
):
    monkeypatch.setattr("conversation_assets.enrichment.MIN_IDS_PER_WORKER", 3)
    product_tables(conn)
    seed(conn, 12)
    conn.execute(
        "UPDATE conversations SET deleted_at = now(), deleted_by = 'product' "
        "WHERE session_id = 's4'"
    )
    lent = lambda: postgres.pool.get_stats().get("requests_num", 0)  # noqa: E731
    before = lent()
    report = incremental(postgres, batch_size=12, workers=2)
    # The run's own connection, and a second one for the other half of the batch.
    assert lent() - before == 2
    assert (report.batches, report.conversations, report.written) == (1, 12, 11)
    assert conn.execute("SELECT count(*) FROM enrichment_queue").fetchone() == (0,)
    marked = conn.execute("SELECT count(*) FROM metrics_dirty_periods WHERE kind = 'day'")
    assert marked.fetchone() == (2,)  # both days, whichever part wrote them
    split = enriched(conn)

    # One connection, from scratch: the same rows.
    conn.execute("TRUNCATE enriched_conversations, enrichment_source_state")
    serial = enrich(postgres.pool, mode="full", window=EVERY_DAY, workers=1)
    assert serial.written == 11
    assert enriched(conn) == split


def test_a_pool_of_one_connection_refreshes_on_that_one(conn, postgres, monkeypatch):
    monkeypatch.setattr("conversation_assets.enrichment.MIN_IDS_PER_WORKER", 1)
    seed(conn, 4)
    with ConnectionPool(postgres.database_url, min_size=1, max_size=1) as pool:
        report = enrich(pool, mode="incremental", workers=4)
    assert (report.written, report.batches) == (4, 1)
    with pytest.raises(ValueError, match="workers"):
        enrich(postgres.pool, mode="incremental", workers=0)


def test_metrics_p95_is_the_95th_percentile_of_each_group(conn, postgres):
    # 20 conversations on one day, 1 to 20 minutes long; and 2 of another channel.
    upsert_conversations(
        conn,
        [
            record(
                f"p{i}",
                created_at=DAY + timedelta(hours=1, minutes=i),
                last_message_at=DAY + timedelta(hours=1, minutes=2 * i),
                channel="web" if i <= 20 else "whatsapp",
            )
            for i in range(1, 23)
        ],
    )
    incremental(postgres)
    midnight = datetime.combine(DAY.date(), datetime.min.time(), UTC)
    refresh_metrics(postgres.pool, (midnight, midnight + timedelta(days=1)))
    rows = dict(
        conn.execute(
            "SELECT channel, p95_duration_seconds FROM conversation_metrics WHERE day = %s",
            (DAY.date(),),
        ).fetchall()
    )
    # Interpolated as percentile_cont: position 0.95 * 19 = 18.05 between 19 and 20 min.
    assert rows["web"] == pytest.approx(19.05 * 60)
    assert rows["whatsapp"] == pytest.approx((21 + 0.95) * 60)


# --- one conversation never stops the rest ---------------------------------------------


def test_a_conversation_that_cannot_be_enriched_is_rejected_and_the_queue_moves_on(conn, postgres):
    seed(conn, 6)
    # A value PostgreSQL holds and Python cannot (its day is loaded by psycopg).
    conn.execute("UPDATE conversations SET created_at = 'infinity' WHERE session_id = 's3'")
    bad = conversation_id("crew", "s3")

    report = incremental(postgres, batch_size=4)

    assert report.written == 5 and report.queue_left == 0
    assert [key for key, _ in report.rejects] == [bad]
    stored = conn.execute("SELECT conversation_id, client_code, reason FROM enrichment_rejects")
    assert [(r[0], r[1]) for r in stored] == [(bad, "acme")]
    assert bad not in {r[0] for r in enriched(conn, "id")}

    # Fixed, the conversation is queued again, enriched, and its reject cleared.
    conn.execute("UPDATE conversations SET created_at = %s WHERE session_id = 's3'", (DAY,))
    fixed = incremental(postgres)
    assert fixed.written == 1 and not fixed.rejects
    assert conn.execute("SELECT count(*) FROM enrichment_rejects").fetchone() == (0,)


def test_a_full_refresh_rejects_what_it_cannot_enrich_and_does_the_rest(conn, postgres):
    seed(conn, 4)
    incremental(postgres)
    conn.execute("UPDATE conversations SET created_at = 'infinity' WHERE session_id = 's1'")
    conn.execute("UPDATE conversations SET summary = 'changed' WHERE session_id <> 's1'")
    conn.execute("TRUNCATE enrichment_queue")

    # s1 is chosen through its enriched row, filed under the window.
    report = enrich(postgres.pool, mode="full", window=EVERY_DAY)

    assert [key for key, _ in report.rejects] == [conversation_id("crew", "s1")]
    assert report.written == 3
    assert sorted(r[0] for r in enriched(conn, "summary")) == ["changed"] * 3 + ["hello from s1"]
