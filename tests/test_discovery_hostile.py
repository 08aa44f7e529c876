"""Hostile histories against real PostgreSQL: json that jsonb cannot hold, session ids
of any type, checks that must report rather than raise, crew codes that would break
printed SQL, and whitespace-only session ids."""

import json
from datetime import timedelta

import dagster as dg
import psycopg
import psycopg.rows
import pytest
from psycopg import errors, sql

from conversation_assets import cli, migrate
from conversation_assets.assets.discovery import (
    crews_discoverable,
    discovered_sessions,
    discovered_sessions_match_source,
)
from conversation_assets.conversations import build_conversations, fetch_messages
from conversation_assets.discovery import (
    discover,
    inspect_source,
    load_crews,
    probe_new_work,
    recount_sessions,
)
from tests.sources import DAY, add_crew, insert, stats_flush

WINDOW = (DAY.replace(hour=0), DAY.replace(hour=0) + timedelta(days=1))
INCREMENTAL = {"ops": {"discovered_sessions": {"config": {"mode": "incremental"}}}}


def _materialize(postgres, config=None, assets=(discovered_sessions,)):
    return dg.materialize(
        list(assets),
        partition_key=DAY.date().isoformat(),
        resources={"postgres": postgres},
        run_config=config or {},
    )


def _live(conn, crew_code: str) -> dict[str, tuple[int, int, int]]:
    """Live sessions of a crew: (messages, human, ai)."""
    rows = conn.execute(
        "SELECT session_id, message_count, human_message_count, ai_message_count "
        "FROM discovered_sessions WHERE crew_code = %s AND deleted_at IS NULL",
        (crew_code,),
    )
    return {row[0]: tuple(row[1:]) for row in rows}


# --- json messages that jsonb cannot hold --------------------------------------------

# Valid json (the json type stores its text as written), yet no jsonb value: a NUL
# escape, an unpaired surrogate escape, a number beyond numeric's range.
UNSTORABLE = [
    ('{"type": "human", "content": "nul \\u0000 here"}', "unsupported Unicode escape"),
    ('{"type": "ai", "content": "half an emoji \\ud800"}', "surrogate"),
    ('{"type": "ai", "content": "big", "n": 1e1000000}', "overflows numeric"),
]


def _json_crew(conn) -> None:
    conn.execute(
        "CREATE TABLE json_histories (id serial PRIMARY KEY, session_id varchar(255) NOT NULL, "
        "message json NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
    )
    conn.execute("INSERT INTO crews VALUES ('json_crew', 'acme', 'json_histories')")


def _insert_json(conn, rows: list[tuple[str, str]]) -> list[int]:
    """(session_id, json text) rows stamped DAY; their ids."""
    return [
        conn.execute(
            "INSERT INTO json_histories (session_id, message, created_at) "
            "VALUES (%s, %s::json, %s) RETURNING id",
            (session_id, body, DAY),
        ).fetchone()[0]
        for session_id, body in rows
    ]


def _good(kind: str) -> str:
    return json.dumps({"type": kind, "content": f"{kind} says hi \\u00e9"})


def _assert_rejected(conn, bad_ids: list[int]) -> None:
    rows = conn.execute(
        "SELECT message_id, reason FROM discovery_rejects WHERE crew_code = 'json_crew' "
        "ORDER BY message_id"
    ).fetchall()
    assert [row[0] for row in rows] == bad_ids
    for (_, reason), (_, expected) in zip(rows, UNSTORABLE, strict=True):
        assert reason.startswith("message cannot be stored as jsonb: ") and expected in reason


@pytest.mark.parametrize("run", ["incremental", "partition", "recompute"])
def test_json_rows_jsonb_cannot_hold_are_rejected_and_the_crew_goes_on(conn, postgres, run):
    _json_crew(conn)
    add_crew(conn, "jsonb_crew", "acme", "histories", "n8n_created_at")
    insert(conn, "histories", "n8n_created_at", [("fine", "human", DAY)])
    _insert_json(conn, [("mixed", _good("human")), ("good", _good("human"))])
    assert not discover(postgres.pool).failed
    first = _insert_json(
        conn, [("mixed", UNSTORABLE[0][0]), ("only-bad", UNSTORABLE[1][0]), ("good", _good("ai"))]
    )
    second = _insert_json(conn, [("mixed", UNSTORABLE[2][0]), ("mixed", _good("ai"))])
    bad_ids = [first[0], first[1], second[0]]

    if run == "incremental":
        report = discover(postgres.pool)
    elif run == "partition":
        result = _materialize(postgres)  # mode full: catch up, then recompute the day
        metadata = result.asset_materializations_for_node("discovered_sessions")[-1].metadata
        assert metadata["crews_failed"].value == 0, metadata["crew_errors"].value
        report = discover(postgres.pool, mode="full", window=WINDOW)
    else:
        report = discover(postgres.pool, mode="full")  # every session, exactly

    assert not report.failed, report.errors
    _assert_rejected(conn, bad_ids)
    assert _live(conn, "json_crew") == {"mixed": (2, 1, 1), "good": (2, 1, 1)}
    assert _live(conn, "jsonb_crew") == {"fine": (1, 1, 0)}
    crew = next(c for c in load_crews(conn) if c.crew_code == "json_crew")
    assert recount_sessions(conn, crew, ["mixed", "good", "only-bad"]) == []
    assert discovered_sessions_match_source(postgres=postgres).passed


def test_json_rows_committed_late_are_rejected_too(conn, postgres, db_url):
    """Rows read as pending ids (a writer's transaction still open) go through the
    same safe cast as fresh ones."""
    _json_crew(conn)
    _insert_json(conn, [("a", _good("human"))])
    discover(postgres.pool)
    with psycopg.connect(db_url) as slow:
        bad = _insert_json(slow, [("a", UNSTORABLE[0][0])])
        _insert_json(conn, [("a", _good("ai"))])
        assert not discover(postgres.pool).failed
        slow.commit()
    report = discover(postgres.pool)
    assert not report.failed and report.total("rejected_rows") == 1
    assert conn.execute("SELECT message_id FROM discovery_rejects").fetchall() == [(bad[0],)]
    assert _live(conn, "json_crew") == {"a": (2, 1, 1)}


# --- session ids of any type -----------------------------------------------------------

SESSION_TYPES = {
    "integer": ["101", "202", "303"],
    "bigint": ["9000000000", "-1", "7"],
    "numeric": ["1.50", "2", "3e2"],
    "uuid": [
        "0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0001",
        "0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0002",
        "0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0003",
    ],
    "character(6)": ["ab", "cd ", "ef"],
}


@pytest.mark.parametrize("indexed", [False, True], ids=["no-index", "session-index"])
@pytest.mark.parametrize("session_type", list(SESSION_TYPES))
def test_session_ids_of_any_type_work_in_every_kind_of_run(
    conn, postgres, db_url, session_type, indexed, monkeypatch
):
    conn.execute(
        sql.SQL(
            "CREATE TABLE typed_histories (id serial PRIMARY KEY, session_id {} NOT NULL, "
            "message jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.SQL(session_type))
    )
    if indexed:
        conn.execute("CREATE INDEX ON typed_histories (session_id)")
    conn.execute("INSERT INTO crews VALUES ('typed', 'acme', 'typed_histories')")
    a, b, c = SESSION_TYPES[session_type]
    rows = [(a, "human"), (a, "ai"), (b, "human"), (c, "human"), (c, "ai")]
    insert(conn, "typed_histories", "n8n_created_at", [(s, kind, DAY) for s, kind in rows])
    # How discovery names each session: the column's text form ('3e2' is '300').
    as_text = sql.SQL("SELECT %s::{}::text").format(sql.SQL(session_type))
    ta, tb, tc = (conn.execute(as_text, (value,)).fetchone()[0] for value in (a, b, c))

    # Incremental (the sensor's and the schedule's), then a partition run (a backfill).
    assert _materialize(postgres, INCREMENTAL).success
    assert _live(conn, "typed") == {ta: (2, 1, 1), tb: (1, 1, 0), tc: (2, 1, 1)}
    conn.execute("DELETE FROM typed_histories WHERE session_id = %s", (b,))
    result = _materialize(postgres)
    metadata = result.asset_materializations_for_node("discovered_sessions")[-1].metadata
    assert metadata["crews_failed"].value == 0, metadata["crew_errors"].value
    assert metadata["sessions_deleted"].value == 1
    assert _live(conn, "typed") == {ta: (2, 1, 1), tc: (2, 1, 1)}

    # The check recounts samples by session id; a whole-crew recompute changes nothing.
    check = discovered_sessions_match_source(postgres=postgres)
    assert check.passed, check.metadata
    report = discover(postgres.pool, mode="full")
    assert not report.failed, report.errors
    assert report.total("sessions_updated") + report.total("sessions_deleted") == 0

    # The change log hands recomputes text ids as well.
    monkeypatch.setenv("DATABASE_URL", db_url)
    assert cli.main(["track-deletes", "--apply", "typed"]) == 0
    conn.execute("DELETE FROM typed_histories WHERE session_id = %s", (c,))
    stats_flush(conn)
    report = discover(postgres.pool)
    assert not report.failed, report.errors
    assert report.outcomes[0].logged_sessions_recomputed == 1
    assert _live(conn, "typed") == {ta: (2, 1, 1)}

    # The conversations builder's message fetch finds the rows of each session.
    (crew,) = load_crews(conn, ["typed"])
    source = inspect_source(conn, crew)
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        sessions = cur.execute(
            "SELECT session_id, first_message_id, last_message_id FROM discovered_sessions "
            "WHERE crew_code = 'typed' AND deleted_at IS NULL"
        ).fetchall()
    messages = fetch_messages(conn, source, sessions)
    assert {s: len(m) for s, m in messages.items()} == {ta: 2}


def test_stored_ids_that_cannot_be_of_the_column_type_do_not_fail_a_recompute(conn, postgres):
    """A crew pointed at another table keeps its old sessions until a recompute: those
    ids need not parse as the new table's type (they simply match no row)."""
    add_crew(conn, "crew", "acme", "old_histories", "n8n_created_at")
    insert(conn, "old_histories", "n8n_created_at", [("not-a-uuid", "human", DAY)])
    discover(postgres.pool)
    add_crew(conn, "lc", "acme", "lc_histories", "langchain")
    conn.execute("UPDATE crews SET histories_table = 'lc_histories' WHERE crew_code = 'crew'")
    conn.execute("DELETE FROM crews WHERE crew_code = 'lc'")
    uuid = "0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0001"
    insert(conn, "lc_histories", "langchain", [(uuid, "human", DAY)])

    report = discover(postgres.pool, mode="full", window=WINDOW)

    assert not report.failed, report.errors
    (crew,) = load_crews(conn, ["crew"])
    assert recount_sessions(conn, crew, ["not-a-uuid", uuid]) == []


# --- checks report, never raise ----------------------------------------------------------


def test_checks_report_an_unreadable_crew_and_still_check_the_others(conn, postgres):
    add_crew(conn, "gone", "acme", "gone_histories", "n8n_created_at")
    add_crew(conn, "fine", "beta", "histories", "n8n")
    insert(conn, "gone_histories", "n8n_created_at", [("a", "human", DAY)])
    insert(conn, "histories", "n8n", [("b", "human")])
    discover(postgres.pool)
    conn.execute("DROP TABLE gone_histories")

    check = discovered_sessions_match_source(postgres=postgres)

    assert not check.passed
    errors = check.metadata["crew_errors"].value
    assert set(errors) == {"gone"} and "does not exist" in errors["gone"]
    assert check.metadata["sessions_sampled"].value == 1  # the other crew's session
    assert check.metadata["differences"].value == {}

    # Through Dagster: the run stays green, the check's evaluation says what is wrong.
    result = _materialize(
        postgres, INCREMENTAL, (discovered_sessions, discovered_sessions_match_source)
    )
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert "gone" in evaluation.metadata["crew_errors"].value
    assert not crews_discoverable(postgres=postgres).passed


# --- crew codes that would break printed SQL -------------------------------------------

VALID_CODES = ["crew", "crew-a", "acme_support", "n8n_crew", "x", "Crew.Ü:1/会話", "a" * 100]
INVALID_CODES = [
    "",
    "a" * 101,
    "two words",
    "line\nbreak",
    "tab\there",
    "cr\rhere",
    "nbsp\u00a0here",
    "line\u2028separator",
    "bidi\u202eoverride",
    "zero\u200bwidth",
    "del\x7fhere",
    "c1\x85here",
]


@pytest.mark.parametrize("column", ["crew_code", "client_code"])
def test_crew_and_client_codes_must_be_printable(conn, column):
    for i, code in enumerate(VALID_CODES):
        values = {"crew_code": f"c{i}", "client_code": "acme", column: code}
        conn.execute(
            "INSERT INTO crews (crew_code, client_code, histories_table) "
            "VALUES (%(crew_code)s, %(client_code)s, 'h')",
            values,
        )
    for code in INVALID_CODES:
        values = {"crew_code": "bad", "client_code": "acme", column: code}
        with pytest.raises(errors.CheckViolation):
            conn.execute(
                "INSERT INTO crews (crew_code, client_code, histories_table) "
                "VALUES (%(crew_code)s, %(client_code)s, 'h')",
                values,
            )


def test_the_migration_keeps_working_on_a_database_holding_an_older_bad_code(conn):
    migrate.downgrade(conn, 4)
    conn.execute("INSERT INTO crews VALUES ('old\ncode', 'acme', 'h')")
    assert 5 in [m.version for m in migrate.upgrade(conn)]  # and any later one
    validated = dict(
        conn.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'crews'::regclass "
            "AND conname LIKE 'crews_%%_printable'"
        )
    )
    assert validated == {"crews_crew_code_printable": False, "crews_client_code_printable": True}
    with pytest.raises(errors.CheckViolation):
        conn.execute("INSERT INTO crews VALUES ('new\ncode', 'acme', 'h')")


def test_track_deletes_prints_sql_where_a_crew_code_cannot_add_statements(
    conn, db_url, monkeypatch, capsys
):
    # A code from before the constraint existed (see the migration's NOT VALID).
    conn.execute("ALTER TABLE crews DROP CONSTRAINT IF EXISTS crews_crew_code_printable")
    hostile = "crew\nDROP TABLE discovered_sessions; --\r\nDROP TABLE crews;"
    add_crew(conn, hostile, "acme", "histories", "n8n")
    monkeypatch.setenv("DATABASE_URL", db_url)

    assert cli.main(["track-deletes"]) == 0

    printed = capsys.readouterr()
    # What `track-deletes | psql` would run (a note on stdout, as there once was,
    # is left out here: it is checked on its own below).
    script = "".join(
        line
        for line in printed.out.splitlines(keepends=True)
        if not line.startswith("[conversation-pipeline]")
    )
    conn.execute(script)
    tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables")}
    assert {"crews", "discovered_sessions"} <= tables
    triggers = conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'histories'::regclass ORDER BY 1"
    ).fetchall()
    assert triggers == [("discovery_track_deletes",), ("discovery_track_updates",)]
    header = conn.execute(script.split(";\n", 1)[0]).fetchone()
    assert header == (hostile, "histories")
    assert script == printed.out and "nothing changed" in printed.err


# --- whitespace-only session ids ----------------------------------------------------------

BLANK = ["", " ", "   ", "\n", "\t", "\r\n", "\x0b\x0c", "\u00a0", "\u3000 ", "\u2028", "\u0085"]
NOT_BLANK = ["a", " a ", "\x1f", "\u200b", "a\nb"]


def test_one_whitespace_rule_for_session_ids(conn, postgres):
    conn.execute(
        "CREATE TABLE loose_histories (id bigserial PRIMARY KEY, session_id text, "
        "message jsonb, created_at timestamptz)"
    )
    conn.execute("INSERT INTO crews VALUES ('crew', 'acme', 'loose_histories')")
    insert(conn, "loose_histories", "n8n_created_at", [("known", "human", DAY)])
    discover(postgres.pool)
    later = DAY + timedelta(days=2)
    insert(conn, "loose_histories", "n8n_created_at", [(s, "human", later) for s in BLANK])

    # The sensor's probe sees no session to discover on that day...
    work, problems = probe_new_work(conn, {})
    assert problems == [] and [w.days for w in work] == [frozenset()]
    # ...and the run rejects every one of those rows, for the same reason.
    report = discover(postgres.pool)
    assert report.total("rejected_rows") == len(BLANK)
    assert report.total("sessions_new") == 0
    reasons = conn.execute("SELECT DISTINCT reason FROM discovery_rejects").fetchall()
    assert reasons == [("session_id is empty",)]

    insert(conn, "loose_histories", "n8n_created_at", [(s, "ai", later) for s in NOT_BLANK])
    discover(postgres.pool)
    assert set(_live(conn, "crew")) == {"known", *NOT_BLANK}


def test_reject_rule_survives_a_downgrade_round_trip(conn):
    tab = "SELECT discovery_reject_reason(E'\\t', '{}')"
    migrate.downgrade(conn, 4)  # the first migration's rule: spaces only
    assert conn.execute(tab).fetchone() == ('message has no "type"',)
    migrate.upgrade(conn)
    assert conn.execute(tab).fetchone() == ("session_id is empty",)


# --- the builder reads what discovery reads ----------------------------------------------


@pytest.mark.parametrize("indexed", [False, True], ids=["one-range-scan", "per-session"])
def test_the_builder_reads_sessions_beside_json_rows_jsonb_cannot_hold(conn, postgres, indexed):
    """A json row jsonb cannot hold is discovery's reject; the builder leaves it out
    the same way, whichever fetch it takes, instead of failing on its cast."""
    _json_crew(conn)
    if indexed:
        conn.execute("CREATE INDEX ON json_histories (session_id)")
    ids = _insert_json(
        conn,
        [
            ("mixed", _good("human")),
            ("good", _good("human")),
            ("mixed", UNSTORABLE[0][0]),
            ("only-bad", UNSTORABLE[1][0]),
            ("good", _good("ai")),
            ("mixed", UNSTORABLE[2][0]),
            ("mixed", _good("ai")),
        ],
    )
    assert not discover(postgres.pool).failed

    report = build_conversations(postgres.pool)

    assert report.written.rejects == [] and report.queue_left == 0
    built = conn.execute(
        "SELECT session_id, message_count, full_conversation FROM conversations ORDER BY 1"
    ).fetchall()
    assert [row[:2] for row in built] == [("good", 2), ("mixed", 2)]
    assert all(f"{kind} says hi \\u00e9" in row[2] for row in built for kind in ("human", "ai"))
    _assert_rejected(conn, [ids[2], ids[3], ids[5]])


def test_the_builder_reads_a_uuid_table_whose_stored_ids_are_not_all_uuids(conn, postgres):
    """A crew pointed at a uuid table keeps its older ids until recomputed: fetching
    one of them matches no row, as in discovery, instead of failing the cast."""
    conn.execute(
        "CREATE TABLE uuid_histories (id serial PRIMARY KEY, session_id uuid NOT NULL, "
        "message jsonb NOT NULL)"
    )
    conn.execute("CREATE INDEX ON uuid_histories (session_id)")  # a fetch per session
    conn.execute("INSERT INTO crews VALUES ('crew', 'acme', 'uuid_histories')")
    uuid = "0c6f6c58-9d3e-4a44-9d0e-1f4d5c8a0001"
    conn.execute(
        "INSERT INTO uuid_histories (session_id, message) VALUES (%s, %s)",
        (uuid, _good("human")),
    )
    (crew,) = load_crews(conn, ["crew"])
    source = inspect_source(conn, crew)
    sessions = [
        {"session_id": "not-a-uuid", "first_message_id": 1, "last_message_id": 1},
        {"session_id": uuid, "first_message_id": 1, "last_message_id": 1},
    ]
    messages = fetch_messages(conn, source, sessions)
    assert {s: len(m) for s, m in messages.items()} == {uuid: 1}


# --- times that are no session time ------------------------------------------------------

# Valid timestamps no session can start or end at: Python holds years 1 to 9999 only,
# and infinity minus infinity (a session's duration) is no interval.
UNUSABLE_TIMES = ["infinity", "-infinity", "294276-12-31 23:00:00", "10000-01-01", "0001-01-01"]


@pytest.mark.parametrize("column_type", ["timestamptz", "timestamp"])
@pytest.mark.parametrize("run", ["incremental", "recompute"])
def test_rows_whose_time_is_no_session_time_are_rejected_and_the_crew_goes_on(
    conn, postgres, column_type, run
):
    conn.execute(
        sql.SQL(
            "CREATE TABLE timed_histories (id serial PRIMARY KEY, session_id text NOT NULL, "
            "message jsonb NOT NULL, created_at {} NOT NULL)"
        ).format(sql.SQL(column_type))
    )
    conn.execute("INSERT INTO crews VALUES ('timed', 'acme', 'timed_histories')")
    conn.execute("SET TimeZone = 'UTC'")  # the naive column's text reads as UTC

    def add(session_id: str, kind: str, at: str) -> int:
        return conn.execute(
            "INSERT INTO timed_histories (session_id, message, created_at) "
            "VALUES (%s, %s, %s) RETURNING id",
            (session_id, _good(kind), at),
        ).fetchone()[0]

    day = DAY.strftime("%Y-%m-%d %H:%M:%S")
    add("good", "human", day)
    add("mixed", "human", day)
    bad = [add("mixed", "ai", at) for at in UNUSABLE_TIMES]
    bad += [add(f"only-{n}", "human", at) for n, at in enumerate(UNUSABLE_TIMES)]
    add("mixed", "ai", day)
    add("good", "ai", day)

    work, problems = probe_new_work(conn, {})
    assert problems == [] and [w.days for w in work] == [frozenset({DAY.date()})]
    report = discover(postgres.pool, mode="incremental" if run == "incremental" else "full")

    assert not report.failed, report.errors
    if run == "incremental":  # a recompute catches up first: both count the rejects
        assert report.total("rejected_rows") == len(bad)
    rows = conn.execute(
        "SELECT message_id, reason FROM discovery_rejects ORDER BY message_id"
    ).fetchall()
    assert [row[0] for row in rows] == sorted(bad)
    assert all(
        reason.startswith("created_at ") and "is no session time" in reason for _, reason in rows
    )
    assert _live(conn, "timed") == {"good": (2, 1, 1), "mixed": (2, 1, 1)}
    (crew,) = load_crews(conn, ["timed"])
    assert recount_sessions(conn, crew, ["good", "mixed", "only-0"]) == []
    assert discovered_sessions_match_source(postgres=postgres).passed

    built = build_conversations(postgres.pool)
    assert built.written.rejects == [] and built.queue_left == 0
    assert conn.execute(
        "SELECT session_id, message_count FROM conversations ORDER BY 1"
    ).fetchall() == [("good", 2), ("mixed", 2)]
