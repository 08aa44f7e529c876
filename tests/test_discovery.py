"""Discovery against real PostgreSQL: exactness, concurrency, bad input, faults."""

import json
import os
import random
import threading
import time
import zlib
from datetime import timedelta

import psycopg
from psycopg import sql

from conversation_assets.discovery import discover, probe_new_work
from resources.postgres import PostgresResource
from tests.sources import DAY, add_crew, insert, recount, stats_flush, stored, table_id


def test_incremental_discovery_is_exact_on_every_source_shape(conn, postgres):
    add_crew(conn, "n8n_crew", "acme", "n8n_histories", "n8n")
    add_crew(conn, "lc_crew", "acme", "lc_histories", "langchain")
    add_crew(conn, "s0_crew", "beta", "s0_histories", "n8n_created_at")
    for table, shape in [
        ("n8n_histories", "n8n"),
        ("lc_histories", "langchain"),
        ("s0_histories", "n8n_created_at"),
    ]:
        session = "0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0001" if shape == "langchain" else "session-ü-1"
        other = "0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0002" if shape == "langchain" else "会話-2"
        insert(
            conn,
            table,
            shape,
            [
                (session, "human", DAY),
                (session, "ai", DAY + timedelta(seconds=5)),
                (other, "human", DAY + timedelta(minutes=1)),
                (session, "human", DAY + timedelta(minutes=3)),
            ],
        )

    report = discover(postgres.pool, mode="incremental")

    assert not report.failed
    assert report.total("sessions_new") == 6
    assert report.total("rows_scanned") == 12
    assert stored(conn, "lc_crew", with_times=True) == recount(conn, "lc_histories", True)
    assert stored(conn, "s0_crew", with_times=True) == recount(conn, "s0_histories", True)
    assert stored(conn, "n8n_crew", with_times=False) == recount(conn, "n8n_histories", False)
    # Sources without created_at are timed by discovery itself, and say so.
    sources = dict(
        conn.execute("SELECT crew_code, min(time_source) FROM discovered_sessions GROUP BY 1")
    )
    assert sources == {"n8n_crew": "discovery", "lc_crew": "created_at", "s0_crew": "created_at"}
    duration = conn.execute(
        "SELECT duration_seconds FROM discovered_sessions WHERE crew_code = 's0_crew' "
        "AND session_id = 'session-ü-1'"
    ).fetchone()[0]
    assert duration == 180.0

    # A second round only reads what is new and merges it into the stored rows.
    insert(
        conn, "s0_histories", "n8n_created_at", [("session-ü-1", "ai", DAY + timedelta(minutes=9))]
    )
    report = discover(postgres.pool, mode="incremental")
    assert report.total("rows_scanned") == 1
    assert report.total("sessions_updated") == 1
    assert stored(conn, "s0_crew", with_times=True) == recount(conn, "s0_histories", True)


def test_a_row_committed_late_below_the_watermark_is_still_discovered(conn, postgres, db_url):
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("early", "human")])
    discover(postgres.pool)

    with psycopg.connect(db_url) as slow_writer:  # a transaction that stays open
        slow_id = insert(slow_writer, "histories", "n8n", [("slow", "human")])[0]
        fast_ids = insert(conn, "histories", "n8n", [("fast", "human"), ("fast", "ai")])
        assert fast_ids[0] > slow_id

        report = discover(postgres.pool)
        assert report.total("rows_scanned") == 2
        state = conn.execute(
            "SELECT high_water_id, pending_ids::text FROM crew_discovery_state"
        ).fetchone()
        assert state[0] == fast_ids[-1]
        assert state[1] == f"{{[{slow_id},{slow_id + 1})}}"

        # Still open: runs keep waiting for it without losing or re-reading anything.
        discover(postgres.pool)
        assert "slow" not in stored(conn, "crew", with_times=False)
        slow_writer.commit()

    report = discover(postgres.pool)
    assert report.total("rows_scanned") == 1
    assert stored(conn, "crew", with_times=False) == recount(conn, "histories", False)
    assert conn.execute("SELECT pending_ids::text FROM crew_discovery_state").fetchone()[0] == "{}"


def test_ids_taken_before_the_writer_has_a_transaction_id_are_not_lost(conn, postgres, db_url):
    """COPY takes ids from the sequence for rows it buffers before its first write,
    so the writer has no xid yet when a later row commits and discovery runs."""
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("early", "human")])
    discover(postgres.pool)
    big = json.dumps({"type": "human", "content": "y" * 40_000})
    small = json.dumps({"type": "ai", "content": "ok"})
    with psycopg.connect(db_url) as bulk:
        with bulk.cursor().copy("COPY histories (session_id, message) FROM STDIN") as copy:
            copy.write_row(("bulk", big))
            bulk.pgconn.flush()
            time.sleep(0.3)  # the server has taken an id for the buffered row
            assert conn.execute(
                "SELECT backend_xid FROM pg_stat_activity WHERE pid = %s",
                (bulk.info.backend_pid,),
            ).fetchone() == (None,)
            insert(conn, "histories", "n8n", [("fast", "human")])
            discover(postgres.pool)  # the bulk row's id becomes pending
            for _ in range(2_000):  # fill the buffer: the writer gets its xid now
                copy.write_row(("bulk", small))
            bulk.pgconn.flush()
            time.sleep(0.3)
            discover(postgres.pool)  # its xid is newer than the run that saw the gap
            assert "bulk" not in stored(conn, "crew", with_times=False)
        bulk.commit()

    discover(postgres.pool)
    assert stored(conn, "crew", with_times=False) == recount(conn, "histories", False)
    assert stored(conn, "crew", with_times=False)["bulk"][0] == 2_001


def test_rolled_back_ids_leave_gaps_that_do_not_stall_progress(conn, postgres, db_url):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    with psycopg.connect(db_url) as aborted:
        insert(aborted, "histories", "n8n_created_at", [("ghost", "human"), ("ghost", "ai")])
        aborted.rollback()
    kept = insert(conn, "histories", "n8n_created_at", [("real", "human")])

    discover(postgres.pool)
    pending = conn.execute("SELECT pending_ids::text FROM crew_discovery_state").fetchone()[0]
    assert pending != "{}"  # the rolled-back ids, until no transaction can own them

    discover(postgres.pool)  # nothing older than the last run is running any more
    state = conn.execute("SELECT high_water_id, pending_ids::text FROM crew_discovery_state")
    assert state.fetchone() == (kept[0], "{}")
    assert stored(conn, "crew", with_times=True) == recount(conn, "histories", True)


def _random_round(conn, rng, crews, round_no):
    for crew_code, table, shape in crews:
        sessions = [f"{crew_code}-s{rng.randrange(12)}" for _ in range(rng.randrange(1, 15))]
        if shape == "langchain":
            sessions = [f"00000000-0000-4000-8000-{zlib.crc32(s.encode()):012d}" for s in sessions]
        base = DAY + timedelta(hours=round_no * 7)
        insert(
            conn,
            table,
            shape,
            [
                (s, rng.choice(["human", "ai", "system"]), base + timedelta(minutes=i))
                for i, s in enumerate(sessions)
            ],
        )
        roll = rng.random()
        if roll < 0.25:  # n8n's clear(): every row of one session goes
            victim = conn.execute(
                sql.SQL("SELECT session_id FROM {} ORDER BY random() LIMIT 1").format(
                    table_id(table)
                )
            ).fetchone()
            if victim:
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE session_id = %s").format(table_id(table)),
                    victim,
                )
        elif roll < 0.4:  # a partial delete
            conn.execute(
                sql.SQL(
                    "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY random() LIMIT 2)"
                ).format(t=table_id(table))
            )
    stats_flush(conn)


def _copy_sources(src: psycopg.Connection, dst: psycopg.Connection, crews) -> None:
    for crew_code, table, shape in crews:
        add_crew(dst, crew_code, "acme", table, shape)
        with (
            src.cursor().copy(sql.SQL("COPY {} TO STDOUT").format(table_id(table))) as out,
            dst.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(table_id(table))) as into,
        ):
            for chunk in out:
                into.write(chunk)


def test_incremental_rounds_equal_a_full_backfill_into_a_fresh_database(
    conn, postgres, other_db_url
):
    crews = [
        ("n8n_crew", "n8n_histories", "n8n"),
        ("lc_crew", "lc_histories", "langchain"),
        ("s0_crew", "demo.s0_histories", "n8n_created_at"),
    ]
    conn.execute("CREATE SCHEMA demo")
    for crew_code, table, shape in crews:
        add_crew(conn, crew_code, "acme", table, shape)
    rng = random.Random(20261123)
    for round_no in range(12):
        _random_round(conn, rng, crews, round_no)
        discover(postgres.pool, mode="incremental", batch_rows=7)  # many small batches

    with psycopg.connect(other_db_url, autocommit=True) as fresh:
        fresh.execute("CREATE SCHEMA demo")
        _copy_sources(conn, fresh, crews)
        fresh_pool = PostgresResource(database_url=other_db_url)
        try:
            report = discover(
                fresh_pool.pool,
                mode="full",
                window=(DAY - timedelta(days=1), DAY + timedelta(days=30)),
            )
        finally:
            fresh_pool.close()
        assert not report.failed
        for crew_code, table, shape in crews:
            with_times = shape != "n8n"  # n8n rows carry no time: discovery's clock
            incremental = stored(conn, crew_code, with_times=with_times)
            full = stored(fresh, crew_code, with_times=with_times)
            assert incremental == full, crew_code
            assert incremental == recount(conn, table, with_times) or not with_times
            assert len(incremental) > 5


def test_backfill_of_a_partition_corrects_deleted_and_changed_sessions(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    insert(
        conn,
        "histories",
        "n8n_created_at",
        [("kept", "human", DAY), ("kept", "ai", DAY), ("cleared", "human", DAY)]
        + [("trimmed", "human", DAY), ("trimmed", "ai", DAY), ("trimmed", "ai", DAY)],
    )
    discover(postgres.pool)
    # Deleted without the counters noticing yet: only a backfill can know.
    conn.execute("DELETE FROM histories WHERE session_id = 'cleared'")
    conn.execute(
        "DELETE FROM histories WHERE id = (SELECT max(id) FROM histories "
        "WHERE session_id = 'trimmed')"
    )
    day = (DAY.replace(hour=0), DAY.replace(hour=0) + timedelta(days=1))
    report = discover(postgres.pool, mode="full", window=day)

    assert report.total("sessions_deleted") == 1
    assert report.total("sessions_updated") == 1
    rows = dict(conn.execute("SELECT session_id, deleted_at IS NOT NULL FROM discovered_sessions"))
    assert rows == {"kept": False, "cleared": True, "trimmed": False}
    assert stored(conn, "crew", with_times=True) == recount(conn, "histories", True)

    again = discover(postgres.pool, mode="full", window=day)  # idempotent
    assert again.total("sessions_updated") + again.total("sessions_deleted") == 0


def test_incremental_run_reconciles_after_the_source_deleted_rows(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("a", "human"), ("a", "ai"), ("b", "human")])
    discover(postgres.pool)
    conn.execute("DELETE FROM histories WHERE session_id = 'a'")  # n8n clear()
    stats_flush(conn)
    time.sleep(0.2)

    report = discover(postgres.pool)

    assert report.outcomes[0].reconciled
    deleted = conn.execute(
        "SELECT session_id FROM discovered_sessions WHERE deleted_at IS NOT NULL"
    ).fetchall()
    assert deleted == [("a",)]
    # The session comes back when it gets new messages, counted from scratch.
    insert(conn, "histories", "n8n", [("a", "human")])
    discover(postgres.pool)
    assert stored(conn, "crew", with_times=False) == recount(conn, "histories", False)


def test_bad_rows_are_recorded_with_a_reason_and_the_rest_lands(conn, postgres):
    # A home-made table with looser types than n8n's: null and over-long ids occur.
    conn.execute(
        "CREATE TABLE loose_histories (id bigserial PRIMARY KEY, session_id text, message jsonb)"
    )
    conn.execute("INSERT INTO crews VALUES ('crew', 'acme', 'loose_histories')")
    insert(conn, "loose_histories", "n8n", [("good", "human"), ("good", "ai")])
    conn.execute(
        """INSERT INTO loose_histories (session_id, message) VALUES
           ('', '{"type": "human", "content": "empty session"}'),
           ('no-type', '{"content": "who said this?"}'),
           ('not-object', '"just a string"'),
           (repeat('x', 256), '{"type": "ai", "content": "long id"}'),
           (NULL, '{"type": "ai", "content": "no session"}'),
           ('null-message', NULL)"""
    )
    report = discover(postgres.pool)

    assert report.total("rejected_rows") == 6
    assert report.total("sessions_new") == 1
    reasons = [
        row[0] for row in conn.execute("SELECT reason FROM discovery_rejects ORDER BY message_id")
    ]
    assert reasons == [
        "session_id is empty",
        'message has no "type"',
        "message is not a JSON object",
        "session_id is longer than 255 characters",
        "session_id is null",
        "message is null",
    ]
    assert stored(conn, "crew", with_times=False)["good"][:3] == (2, 1, 1)


def test_invalid_hostile_or_missing_tables_fail_only_their_crew(conn, postgres):
    add_crew(conn, "good", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("s", "human")])
    conn.execute(
        """INSERT INTO crews (crew_code, client_code, histories_table) VALUES
           ('hostile', 'acme', 'histories; DROP TABLE crews'),
           ('upper', 'acme', 'Histories'),
           ('missing', 'beta', 'no_such_table'),
           ('deep', 'beta', 'a.b.c')"""
    )
    report = discover(postgres.pool)

    errors = {o.crew_code: o.error for o in report.failed}
    assert set(errors) == {"hostile", "upper", "missing", "deep"}
    assert "'histories; DROP TABLE crews' is invalid" in errors["hostile"]
    assert "'no_such_table' does not exist" in errors["missing"]
    assert [o.crew_code for o in report.succeeded] == ["good"]
    assert conn.execute("SELECT count(*) FROM crews").fetchone()[0] == 5
    recorded = dict(conn.execute("SELECT crew_code, last_error FROM crew_discovery_status"))
    assert recorded["good"] is None and "does not exist" in recorded["missing"]


def test_killing_the_run_mid_write_then_rerunning_leaves_the_table_exact(conn, postgres, db_url):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    insert(conn, "histories", "n8n_created_at", [(f"s{i % 40}", "human", DAY) for i in range(200)])
    discover(postgres.pool)
    insert(conn, "histories", "n8n_created_at", [(f"s{i % 60}", "ai", DAY) for i in range(300)])

    # Hold one session row so the run's upsert blocks in the middle of its write.
    with psycopg.connect(db_url) as blocker:
        blocker.execute("SELECT 1 FROM discovered_sessions WHERE session_id = 's39' FOR UPDATE")
        outcome: dict = {}
        run = threading.Thread(target=lambda: outcome.update(r=discover(postgres.pool)))
        run.start()
        victim = None
        for _ in range(200):
            victim = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock' AND query LIKE %s",
                ("cp-test-discovery", "%Reads the rows past the watermark%"),
            ).fetchone()
            if victim:
                break
            time.sleep(0.05)
        assert victim, "the run never reached its write"
        conn.execute("SELECT pg_terminate_backend(%s)", victim)
        run.join(timeout=30)
        blocker.rollback()

    assert outcome["r"].failed and "crew" in outcome["r"].failed[0].error
    assert conn.execute("SELECT high_water_id FROM crew_discovery_state").fetchone()[0] == 200

    report = discover(postgres.pool)  # the crew lock died with the killed connection
    assert not report.failed
    assert stored(conn, "crew", with_times=True) == recount(conn, "histories", True)
    assert conn.execute(
        "SELECT count(*), count(DISTINCT session_id) FROM discovered_sessions"
    ).fetchone() == (60, 60)


def test_probe_finds_new_work_and_its_days_without_reading_history(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    insert(conn, "histories", "n8n_created_at", [("old", "human", DAY)])
    discover(postgres.pool)
    assert probe_new_work(conn, {}) == ([], [])

    later = DAY + timedelta(days=2)
    ids = insert(
        conn, "histories", "n8n_created_at", [("old", "ai", later), ("new", "human", later)]
    )
    work, problems = probe_new_work(conn, {})
    assert problems == []
    assert [(w.crew_code, w.max_id) for w in work] == [("crew", ids[-1])]
    # "old" keeps its start day; "new" starts on its own.
    assert work[0].days == {DAY.date(), later.date()}
    # Already requested up to that id: nothing new for the next tick.
    assert probe_new_work(conn, {"crew": ids[-1]}) == ([], [])


def test_a_run_with_nothing_new_only_probes_and_writes_nothing(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("a", "human")])
    discover(postgres.pool)
    before = conn.execute("SELECT updated_at, xmin::text FROM crew_discovery_state").fetchone()

    report = discover(postgres.pool)

    assert report.idle_crews == ["crew"] and report.outcomes == []
    assert conn.execute("SELECT updated_at, xmin::text FROM crew_discovery_state").fetchone() == (
        before
    )
    insert(conn, "histories", "n8n", [("a", "ai")])
    assert discover(postgres.pool).idle_crews == []


def test_truncate_and_a_crew_moving_client_are_reconciled(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n_created_at")
    insert(conn, "histories", "n8n_created_at", [("a", "human", DAY), ("b", "ai", DAY)])
    discover(postgres.pool)

    conn.execute("TRUNCATE histories")  # invisible to the delete counters
    insert(conn, "histories", "n8n_created_at", [("c", "human", DAY)])
    report = discover(postgres.pool)
    assert report.outcomes[0].reconciled
    live = dict(conn.execute("SELECT session_id, deleted_at IS NULL FROM discovered_sessions"))
    assert live == {"a": False, "b": False, "c": True}

    conn.execute("UPDATE crews SET client_code = 'globex' WHERE crew_code = 'crew'")
    discover(postgres.pool)  # nothing new in the table, yet not idle
    clients = conn.execute(
        "SELECT DISTINCT client_code FROM discovered_sessions WHERE deleted_at IS NULL"
    ).fetchall()
    assert clients == [("globex",)]


def test_deletes_wait_for_the_reconcile_interval_then_are_reconciled(conn, postgres):
    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [("a", "human"), ("b", "human")])
    every = timedelta(minutes=15)
    discover(postgres.pool, reconcile_after=every)
    conn.execute("DELETE FROM histories WHERE session_id = 'a'")
    stats_flush(conn)

    report = discover(postgres.pool, reconcile_after=every)  # no rescan yet
    assert report.idle_crews == ["crew"]
    insert(conn, "histories", "n8n", [("b", "ai")])
    report = discover(postgres.pool, reconcile_after=every)  # new rows only
    assert not report.outcomes[0].reconciled and report.total("rows_scanned") == 1

    conn.execute("UPDATE crew_discovery_state SET reconciled_at = now() - interval '16 minutes'")
    report = discover(postgres.pool, reconcile_after=every)
    assert report.outcomes[0].reconciled
    assert stored(conn, "crew", with_times=False) == recount(conn, "histories", False)


def test_with_the_change_log_a_clear_recomputes_only_that_session(conn, postgres, db_url):
    from conversation_assets import cli

    add_crew(conn, "crew", "acme", "histories", "n8n")
    insert(conn, "histories", "n8n", [(f"s{i % 30}", "human") for i in range(120)])
    discover(postgres.pool)
    conn.execute("DELETE FROM histories WHERE session_id = 's3'")  # before tracking
    stats_flush(conn)

    os.environ["DATABASE_URL"] = db_url
    try:
        assert cli.main(["track-deletes", "--apply", "crew"]) == 0
    finally:
        del os.environ["DATABASE_URL"]
    assert stored(conn, "crew", with_times=False) == recount(conn, "histories", False)

    conn.execute("DELETE FROM histories WHERE session_id = 's7'")  # n8n clear()
    conn.execute(
        "UPDATE histories SET message = jsonb_set(message, '{type}', '\"ai\"') "
        "WHERE id = (SELECT min(id) FROM histories WHERE session_id = 's8')"
    )
    stats_flush(conn)
    report = discover(postgres.pool, reconcile_after=timedelta(minutes=15))

    outcome = report.outcomes[0]
    assert not outcome.reconciled  # no rescan of the table
    assert outcome.logged_sessions_recomputed == 2
    assert outcome.figures.sessions_deleted == 1 and outcome.figures.sessions_updated == 1
    assert stored(conn, "crew", with_times=False) == recount(conn, "histories", False)
    assert conn.execute("SELECT count(*) FROM discovery_changed_sessions").fetchone() == (0,)
    assert discover(postgres.pool, reconcile_after=timedelta(minutes=15)).idle_crews == ["crew"]
