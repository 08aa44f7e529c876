"""Exact, incremental discovery of chat sessions from crews' histories tables.

Each crew's histories table is read past a per-crew watermark (``id``, the one
column every known shape has), under a per-crew advisory lock and one
REPEATABLE READ snapshot per batch, so the rows read and the watermark that
covers them commit together. Ids below the watermark that were not visible yet
(a transaction still open, rolled back, or deleted) are kept as *pending* and
re-probed by primary key until every transaction that could still commit them
has ended (see ``discovery_pending_settled`` in the first migration). Deletes,
TRUNCATE and a crew moving client make the next run recompute the crew exactly.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from conversation_assets import locks
from conversation_assets.queries import query
from resources.postgres import repeatable_read

Mode = Literal["incremental", "full"]

_TABLE_PART = re.compile(r"^[a-z0-9_]+$")
_INTEGER_TYPES = {"int2", "int4", "int8"}
_TIMESTAMP_TYPES = {"timestamptz", "timestamp"}
_JSON_TYPES = {"jsonb", "json"}
# Session id types whose text form reads back as the same value: a recompute's
# candidates (text) are cast to the column's type, so an index on it serves.
# Any other type is compared as text (numeric '3e2' reads back as 300, not '3e2').
_EXACT_TEXT_TYPES = {"uuid", "int2", "int4", "int8"}
_TEXT_TYPES = {"text", "varchar"}

log = logging.getLogger(__name__)


class CrewSourceError(Exception):
    """A crew's histories table cannot be read; the message names crew and table."""


@dataclass(frozen=True)
class Crew:
    crew_code: str
    client_code: str
    histories_table: str
    high_water_id: int = 0
    pending_ids: str = "{}"
    source_changes: int | None = None
    source_filenode: int | None = None
    state_client_code: str | None = None
    reconciled_at: datetime | None = None
    pending_xid: str | None = None
    pending_vxids: list[str] | None = None


@dataclass(frozen=True)
class Source:
    """A validated histories table and how to read its timestamps."""

    crew: Crew
    table: sql.Identifier
    relid: int
    created_at: sql.Composable
    message: sql.Composable
    message_text: sql.Composable
    message_join: sql.Composable
    has_created_at: bool
    session_id_type: str
    has_session_index: bool
    tracks_changes: bool

    @property
    def time_source(self) -> str:
        """Where session times come from (see discovered_sessions.time_source)."""
        return "created_at" if self.has_created_at else "discovery"

    def query(self, name: str, **parts: sql.Composable) -> sql.Composed:
        return query(
            name,
            histories=self.table,
            created_at=self.created_at,
            source_row=query(
                "source_row",
                message=self.message,
                message_text=self.message_text,
                created_at=self.created_at,
            ),
            message_join=self.message_join,
            merge=query("merge_sessions", queue_merged=_queue_sessions("merged")),
            queue_gone=_queue_sessions("gone"),
            **parts,
        )

    def recompute_filters(self, every_session: bool) -> dict[str, sql.Composable]:
        if every_session:
            return {"source_filter": sql.SQL("TRUE"), "stored_filter": sql.SQL("TRUE")}
        return {
            "source_filter": self.session_in_candidates(),
            "stored_filter": sql.SQL("d.session_id IN (SELECT session_id FROM candidates)"),
        }

    def session_in_candidates(self) -> sql.Composable:
        """``h.session_id`` among the text ids of ``candidates``, for any column type.

        Compared in the column's own type where its text form reads back exactly (a
        uuid as uuid, an integer as integer), so an index on session_id serves the
        lookup; a candidate that is no value of that type (a crew pointed at another
        table keeps its old ids until recomputed) becomes NULL, which matches no row,
        instead of failing the cast: a CASE, since a WHERE beside it has no set order
        of evaluation. Any other type is compared as text."""
        column, value = self.session_id_sides(sql.SQL("session_id"))
        return sql.SQL("{column} IN (SELECT {value} FROM candidates)").format(
            column=column, value=value
        )

    def session_id_sides(self, text_id: sql.Composable) -> tuple[sql.Composable, sql.Composable]:
        """The two sides of comparing ``h.session_id`` with ``text_id``, a text
        session id (as discovery stores it), by the rule of session_in_candidates:
        (column, value), to be joined by ``=`` or ``IN``."""
        kind = self.session_id_type
        if kind in _TEXT_TYPES:
            return sql.SQL("h.session_id"), text_id
        if kind in _EXACT_TEXT_TYPES:
            value = sql.SQL(
                "CASE WHEN pg_input_is_valid({text_id}, {name}) THEN {text_id}::{kind} END"
            ).format(text_id=text_id, kind=sql.Identifier(kind), name=sql.Literal(kind))
            return sql.SQL("h.session_id"), value
        return sql.SQL("h.session_id::text"), text_id

    def index_advice(self) -> str | None:
        """Said, never done: the product's tables are the product's to change."""
        if self.has_session_index:
            return None
        command = sql.SQL("CREATE INDEX CONCURRENTLY ON {} (session_id);").format(self.table)
        return (
            f"crew {self.crew.crew_code}: {self.crew.histories_table} has no index on "
            f"session_id, so backfills and recomputes scan it whole; to make them follow "
            f"the sessions they touch, run: {command.as_string()}"
        )


def _queue_sessions(cte: str) -> sql.Composed:
    """The queue_sessions block on the sessions of CTE ``cte``."""
    return query("queue_sessions", sessions=sql.Identifier(cte))


def histories_identifier(crew_code: str, table_name: str) -> sql.Identifier:
    """Seed 000's rule, per part: ``^[a-z0-9_]+$``, optionally ``schema.table``."""
    parts = (table_name or "").split(".")
    if len(parts) > 2 or not all(_TABLE_PART.match(part) for part in parts):
        raise CrewSourceError(
            f"crew {crew_code!r}: histories table name {table_name!r} is invalid "
            "(expected lowercase letters, digits and underscores, optionally schema.table)"
        )
    return sql.Identifier(*parts)


def inspect_source(conn: psycopg.Connection, crew: Crew) -> Source:
    """Validate the crew's table and find out whether it has ``created_at``."""
    identifier = histories_identifier(crew.crew_code, crew.histories_table)
    row = conn.execute(query("histories_relid"), {"table_name": crew.histories_table}).fetchone()
    if row is None or row[0] is None:
        raise CrewSourceError(
            f"crew {crew.crew_code!r}: histories table {crew.histories_table!r} does not exist"
        )
    relid = int(row[0])
    columns = dict(conn.execute(query("source_columns"), {"relid": relid}).fetchall())
    problems = []
    if columns.get("id") not in _INTEGER_TYPES:
        problems.append("an integer `id` column")
    if "session_id" not in columns:
        problems.append("a `session_id` column")
    if columns.get("message") not in _JSON_TYPES:
        problems.append("a json or jsonb `message` column")
    if problems:
        raise CrewSourceError(
            f"crew {crew.crew_code!r}: histories table {crew.histories_table!r} lacks "
            + ", ".join(problems)
        )
    created_type = columns.get("created_at")
    if created_type == "timestamptz":
        created_at: sql.Composable = sql.Identifier("h", "created_at")
    elif created_type == "timestamp":
        # A naive timestamp is read as UTC, whatever the session's TimeZone.
        created_at = sql.Composed(
            [sql.Identifier("h", "created_at"), sql.SQL(" AT TIME ZONE 'UTC'")]
        )
    else:
        created_at = sql.SQL("NULL::timestamptz")
    message, message_text, message_join = _message_columns(columns["message"])
    features = _one_row(conn, query("source_features"), {"relid": relid})
    return Source(
        crew=crew,
        table=identifier,
        relid=relid,
        created_at=created_at,
        message=message,
        message_text=message_text,
        message_join=message_join,
        has_created_at=created_type in _TIMESTAMP_TYPES,
        session_id_type=columns["session_id"],
        has_session_index=features["has_session_index"],
        tracks_changes=features["tracks_changes"],
    )


def _message_columns(
    message_type: str,
) -> tuple[sql.Composable, sql.Composable, sql.Composable]:
    """How a row's message is read (expression, text kept for a reject, join).

    A json column stores text jsonb may not hold (\\u0000, an unpaired surrogate, a
    number beyond numeric): cast in the statement, one such row would fail it
    whole, so it goes through discovery_json_message and becomes a reject. A jsonb
    column is read as is and pays nothing for that."""
    if message_type == "json":
        return (
            sql.Identifier("j", "message"),
            sql.SQL("h.message::text"),
            query("json_message_join"),
        )
    return sql.Identifier("h", "message"), sql.SQL("NULL::text"), sql.SQL("")


def load_crews(conn: psycopg.Connection, crew_codes: Sequence[str] | None = None) -> list[Crew]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            query("crews_with_state"), {"crew_codes": list(crew_codes) if crew_codes else None}
        ).fetchall()
    return [Crew(**row) for row in rows]


@dataclass
class StepFigures:
    rows_scanned: int = 0
    late_rows: int = 0
    rejected_rows: int = 0
    sessions_new: int = 0
    sessions_updated: int = 0
    sessions_deleted: int = 0
    touched_days: set[date] = field(default_factory=set)

    def add(self, row: dict[str, Any]) -> None:
        self.rows_scanned += row["fresh_rows"] + row["late_rows"]
        self.late_rows += row["late_rows"]
        self.rejected_rows += row["rejected_rows"]
        self.sessions_new += row["sessions_new"]
        self.sessions_updated += row["sessions_updated"]
        self.sessions_deleted += row["sessions_deleted"]
        self.touched_days.update(utc_day(at) for at in row["touched_starts"] or ())


def utc_day(at: datetime) -> date:
    return at.astimezone(UTC).date()


@dataclass
class CrewOutcome:
    crew_code: str
    client_code: str
    histories_table: str
    error: str | None = None
    figures: StepFigures = field(default_factory=StepFigures)
    watermark_before: int = 0
    watermark_after: int = 0
    pending_after: str = "{}"
    reconciled: bool = False
    seconds: float = 0.0
    advice: str | None = None
    logged_sessions_recomputed: int = 0


@dataclass
class DiscoveryReport:
    outcomes: list[CrewOutcome]
    seconds: float
    idle_crews: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[CrewOutcome]:
        return [o for o in self.outcomes if o.error]

    @property
    def errors(self) -> dict[str, str]:
        return {o.crew_code: o.error for o in self.outcomes if o.error}

    @property
    def succeeded(self) -> list[CrewOutcome]:
        return [o for o in self.outcomes if not o.error]

    def total(self, name: str) -> int:
        return sum(getattr(o.figures, name) for o in self.succeeded)

    @property
    def touched_days(self) -> set[date]:
        return set().union(*(o.figures.touched_days for o in self.succeeded))


ProgressLog = Callable[[str], None]


def _params(source: Source, **values: Any) -> dict[str, Any]:
    return {
        "crew_code": source.crew.crew_code,
        "client_code": source.crew.client_code,
        "time_source": source.time_source,
        **values,
    }


def _one_row(
    conn: psycopg.Connection, statement: sql.Composed, params: dict[str, Any]
) -> dict[str, Any]:
    """The single row every discovery statement returns, as a dict."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(statement, params).fetchone()
    assert row is not None, "discovery statements always return one row"
    return row


def _read_state(conn: psycopg.Connection, crew_code: str) -> dict[str, Any]:
    return _one_row(conn, query("read_state"), {"crew_code": crew_code})


def _incremental_step(
    conn: psycopg.Connection, source: Source, state: dict[str, Any], batch_rows: int
) -> dict[str, Any]:
    return _one_row(
        conn,
        source.query("incremental_step"),
        _params(
            source,
            replace=False,
            high_water=state["high_water_id"],
            pending=state["pending_ids"],
            pending_xid=state["pending_xid"],
            pending_vxids=state["pending_vxids"],
            batch_rows=batch_rows,
        ),
    )


def _recompute(
    conn: psycopg.Connection,
    source: Source,
    watermark: dict[str, Any],
    *,
    window: tuple[datetime, datetime] | None = None,
    session_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Recompute sessions from the rows ``watermark`` (a state or step row, read in
    this transaction's snapshot) covers."""
    every_session = window is None and session_ids is None
    return _one_row(
        conn,
        source.query("recompute_sessions", **source.recompute_filters(every_session)),
        _params(
            source,
            replace=True,
            high_water=watermark["high_water_id"],
            pending=watermark["pending_ids"],
            window_start=window[0] if window else None,
            window_end=window[1] if window else None,
            session_ids=list(session_ids) if session_ids is not None else None,
        ),
    )


def _catch_up(
    conn: psycopg.Connection, source: Source, outcome: CrewOutcome, batch_rows: int
) -> dict[str, Any]:
    """One incremental batch in the current transaction, counted in ``outcome``."""
    step = _incremental_step(conn, source, _read_state(conn, source.crew.crew_code), batch_rows)
    outcome.figures.add(step)
    outcome.watermark_after = step["high_water_id"]
    outcome.pending_after = step["pending_ids"]
    return step


def _crew_lock(conn: psycopg.Connection, crew_code: str) -> AbstractContextManager[bool]:
    """One discovery writer per crew at a time (sensor runs, schedule runs and
    backfills may overlap): a session lock, taken before any snapshot of the crew."""
    return locks.session_lock(conn, f"discovery:{crew_code}")


def discover_crew(
    conn: psycopg.Connection,
    crew: Crew,
    *,
    mode: Mode,
    window: tuple[datetime, datetime] | None,
    batch_rows: int,
    progress: ProgressLog,
    reconcile_after: timedelta = timedelta(0),
) -> CrewOutcome:
    """Catch the crew up past its watermark; in ``full`` mode also recompute the
    sessions starting in ``window`` exactly (all of them when ``window`` is None)."""
    started = time.monotonic()
    outcome = CrewOutcome(crew.crew_code, crew.client_code, crew.histories_table)
    source = inspect_source(conn, crew)
    conn.execute(query("ensure_state"), {"crew_code": crew.crew_code})
    with _crew_lock(conn, crew.crew_code):
        signature = _one_row(conn, query("source_signature"), {"relid": source.relid})
        first = _read_state(conn, crew.crew_code)
        outcome.watermark_before = first["high_water_id"]
        baseline, changes = first["source_changes"], signature["changes"]
        stats_reset = baseline is not None and changes < baseline
        if stats_reset:
            progress(
                f"crew {crew.crew_code}: the statistics of {crew.histories_table} were reset; "
                "deletes made since the last run are only corrected by a backfill"
            )
        reconcile = (
            mode == "incremental"
            and baseline is not None
            and not stats_reset
            and (
                # A table with the change log needs no rescan for deletes.
                (
                    changes > baseline
                    and not source.tracks_changes
                    and _due(first["reconciled_at"], reconcile_after)
                )
                or signature["filenode"] != first["source_filenode"]
                or crew.client_code != first["client_code"]
            )
        )
        while True:
            with repeatable_read(conn):
                step = _catch_up(conn, source, outcome, batch_rows)
            if step["fresh_rows"] < batch_rows:
                break
            progress(
                f"crew {crew.crew_code}: watermark {outcome.watermark_after}, "
                f"{outcome.figures.rows_scanned} rows so far"
            )
        if source.tracks_changes and not reconcile:
            _recompute_logged_sessions(conn, source, outcome, batch_rows)
        if mode == "full" or reconcile:
            if reconcile:
                progress(
                    f"crew {crew.crew_code}: {crew.histories_table} lost or changed rows, "
                    "or the crew changed client, since the last run; recomputing all its sessions"
                )
            # Same snapshot for the last catch-up and the recompute, so the rows
            # recomputed are exactly those the watermark covers.
            with repeatable_read(conn):
                step = _catch_up(conn, source, outcome, batch_rows)
                redo = _recompute(conn, source, step, window=window if mode == "full" else None)
            outcome.figures.add(redo)
            outcome.reconciled = True
            outcome.advice = source.index_advice()
            if outcome.advice:
                progress(outcome.advice)
        # A whole-crew recompute (or the very first run) makes the current
        # signature the baseline; a window recompute does not cover every session.
        settled = (
            reconcile
            or baseline is None
            or stats_reset
            or source.tracks_changes
            or (mode == "full" and window is None)
        )
        _record_success(
            conn,
            {
                "crew_code": crew.crew_code,
                "settled": settled,
                "source_changes": changes,
                "source_filenode": signature["filenode"],
                "client_code": crew.client_code,
            },
        )
    outcome.seconds = time.monotonic() - started
    return outcome


def discover(
    pool: ConnectionPool,
    *,
    mode: Mode = "incremental",
    window: tuple[datetime, datetime] | None = None,
    crew_codes: Sequence[str] | None = None,
    batch_rows: int = 200_000,
    reconcile_after: timedelta = timedelta(0),
    progress: ProgressLog = log.info,
) -> DiscoveryReport:
    """Run discovery for every enabled crew (or ``crew_codes``); one crew's
    failure is recorded and reported, and the others still run."""
    started = time.monotonic()
    with pool.connection() as conn:
        crews = load_crews(conn, crew_codes)
        idle = [
            crew.crew_code
            for crew in crews
            if mode == "incremental" and _idle(conn, crew, reconcile_after)
        ]
    outcomes = []
    for crew in (crew for crew in crews if crew.crew_code not in idle):
        try:
            with pool.connection() as conn:
                outcome = discover_crew(
                    conn,
                    crew,
                    mode=mode,
                    window=window,
                    batch_rows=batch_rows,
                    progress=progress,
                    reconcile_after=reconcile_after,
                )
        except (CrewSourceError, psycopg.Error) as error:
            message = str(error).strip() or type(error).__name__
            if not isinstance(error, CrewSourceError):
                message = f"crew {crew.crew_code!r} ({crew.histories_table}): {message}"
            progress(f"FAILED {message}")
            outcome = CrewOutcome(crew.crew_code, crew.client_code, crew.histories_table, message)
            _record_failure(pool, crew.crew_code, message)
        else:
            figures = outcome.figures
            progress(
                f"crew {crew.crew_code}: {figures.rows_scanned} rows, "
                f"{figures.sessions_new} new / {figures.sessions_updated} updated / "
                f"{figures.sessions_deleted} deleted sessions, {figures.rejected_rows} rejected, "
                f"watermark {outcome.watermark_before} -> {outcome.watermark_after} "
                f"in {outcome.seconds * 1000:.0f} ms"
            )
        outcomes.append(outcome)
    return DiscoveryReport(outcomes, time.monotonic() - started, idle)


def recount_sessions(conn: psycopg.Connection, crew: Crew, session_ids: Sequence[str]) -> list[str]:
    """Sessions among ``session_ids`` whose stored row differs from an exact
    recompute from the source (the recompute is rolled back, nothing changes)."""
    source = inspect_source(conn, crew)
    with _crew_lock(conn, crew.crew_code), repeatable_read(conn):
        state = _read_state(conn, crew.crew_code)
        with conn.transaction(force_rollback=True):
            row = _recompute(conn, source, state, session_ids=session_ids)
    return list(row["changed_sessions"] or [])


def _recompute_logged_sessions(
    conn: psycopg.Connection, source: Source, outcome: CrewOutcome, batch_rows: int
) -> None:
    """Sessions the change-log triggers recorded (track-deletes), recomputed exactly in
    the snapshot that takes them from the log: the cost follows what changed."""
    with repeatable_read(conn):
        step = _catch_up(conn, source, outcome, batch_rows)
        taken = _one_row(conn, query("take_changed_sessions"), {"relid": source.relid})
        session_ids = taken["session_ids"]
        if session_ids:
            outcome.figures.add(_recompute(conn, source, step, session_ids=session_ids))
            outcome.logged_sessions_recomputed = len(session_ids)


def _record_success(conn: psycopg.Connection, params: dict[str, Any]) -> None:
    """Bookkeeping only: it need not wait for its commit to reach the disk."""
    with conn.transaction():
        conn.execute(query("commit_without_flush"))
        conn.execute(query("record_success"), params)


def _due(reconciled_at: datetime | None, reconcile_after: timedelta) -> bool:
    return reconciled_at is None or datetime.now(UTC) - reconciled_at >= reconcile_after


def _idle(conn: psycopg.Connection, crew: Crew, reconcile_after: timedelta) -> bool:
    """Nothing new, nothing pending, nothing deleted: skip the crew (index probes only).
    A crew whose table cannot be probed is not idle: its run reports why."""
    try:
        probe = probe_crew(conn, crew)
    except (CrewSourceError, psycopg.Error):
        return False
    return not probe.has_rows_past(crew.high_water_id) and probe.matches_baseline(
        crew, reconcile_after
    )


def _record_failure(pool: ConnectionPool, crew_code: str, message: str) -> None:
    try:
        with pool.connection() as conn:
            conn.execute(query("record_failure"), {"crew_code": crew_code, "error": message})
    except psycopg.Error as error:  # the database itself is unreachable
        log.warning("could not record failure of crew %s: %s", crew_code, error)


# --- Is there new work, and for which days? (runs and the sensor) -----------


@dataclass(frozen=True)
class Probe:
    max_id: int
    late_rows: int
    source_changes: int
    source_filenode: int
    pending_expired: bool
    logged_changes: bool

    def has_rows_past(self, seen_id: int) -> bool:
        return self.max_id > seen_id or self.late_rows > 0

    def matches_baseline(self, crew: Crew, reconcile_after: timedelta) -> bool:
        """No pending ids to let go, no truncation or change of client, and no deletes
        (or deletes whose recompute is not due yet)."""
        return (
            not self.pending_expired
            and not self.logged_changes
            and crew.source_changes is not None
            and (
                self.source_changes == crew.source_changes
                or not _due(crew.reconciled_at, reconcile_after)
            )
            and self.source_filenode == crew.source_filenode
            and crew.client_code == crew.state_client_code
        )


def probe_crew(conn: psycopg.Connection, crew: Crew) -> Probe:
    """A few index lookups, whatever the table's size (the sensor's tick)."""
    identifier = histories_identifier(crew.crew_code, crew.histories_table)
    row = _one_row(
        conn,
        query("probe_crew", histories=identifier),
        {
            "pending": crew.pending_ids,
            "table_name": crew.histories_table,
            "pending_xid": crew.pending_xid,
            "pending_vxids": crew.pending_vxids,
        },
    )
    return Probe(
        max_id=row["max_id"] or 0,
        late_rows=row["late_rows"],
        source_changes=row["source_changes"] or 0,
        source_filenode=row["source_filenode"],
        pending_expired=row["pending_expired"],
        logged_changes=row["logged_changes"],
    )


@dataclass(frozen=True)
class CrewWork:
    crew_code: str
    max_id: int
    fingerprint: str
    days: frozenset[date]


def probe_new_work(
    conn: psycopg.Connection, cursor: dict[str, int], reconcile_after: timedelta = timedelta(0)
) -> tuple[list[CrewWork], list[str]]:
    """Crews with rows past ``cursor`` (or their watermark), or whose table lost rows,
    and the days their new rows' sessions start on (none known for lost rows).
    Returns the work found and the crews that could not be read."""
    work, problems = [], []
    for crew in load_crews(conn):
        seen = max(crew.high_water_id, cursor.get(crew.crew_code, 0))
        try:
            probe = probe_crew(conn, crew)
            new_rows = probe.has_rows_past(seen)
            if not new_rows and probe.matches_baseline(crew, reconcile_after):
                continue
            starts = []
            if new_rows:
                source = inspect_source(conn, crew)
                starts = conn.execute(
                    source.query("new_work_starts"),
                    _params(source, from_id=seen, pending=crew.pending_ids),
                ).fetchall()
        except (CrewSourceError, psycopg.Error) as error:
            problems.append(f"{crew.crew_code}: {str(error).strip()}")
            continue
        work.append(
            CrewWork(
                crew.crew_code,
                max(probe.max_id, seen),
                f"{crew.crew_code}={probe.max_id}+{probe.late_rows}"
                f"/{probe.source_changes}/{probe.source_filenode}/{crew.client_code}",
                frozenset(utc_day(r[0]) for r in starts),
            )
        )
    return work, problems
