"""Building conversations from discovered sessions.

Incremental runs drain `conversation_queue`, which discovery fills in the same
transaction as each session change, so what changed is never missed and cost
follows the changed sessions. Full runs (partition backfills) rebuild every
session filed under a day. Either way a batch is: read the sessions' messages
(one statement per crew table), build transcript, summary and metadata in
Python, then write everything and take the batch off the queue in one
transaction. A session that cannot be read or built (a message Python's JSON
parser refuses, a time Python cannot hold) is rejected with its reason and taken
off the queue like the others: one item never holds up the queue behind it.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.rows import dict_row
from psycopg.types.json import JsonbLoader
from psycopg_pool import ConnectionPool

from conversation_assets import locks
from conversation_assets.discovery import Crew, CrewSourceError, Source, inspect_source, utc_day
from conversation_assets.queries import query
from conversation_assets.store import (
    ConversationRecord,
    SessionReject,
    UpsertReport,
    record_session_rejects,
    soft_delete_gone,
    upsert_conversations,
)
from conversation_assets.transcripts import SessionMessage, build_content

ProgressLog = Callable[[str], None]
Summarize = Callable[[Sequence[str]], list[str | None]]
BuildMode = Literal["incremental", "full"]


@dataclass
class BuildReport:
    mode: BuildMode
    sessions: int = 0
    written: UpsertReport = field(default_factory=UpsertReport)
    soft_deleted: int = 0
    without_messages: int = 0
    batches: int = 0
    crew_errors: dict[str, str] = field(default_factory=dict)
    summarizer_errors: list[str] = field(default_factory=list)
    touched_days: set[date] = field(default_factory=set)
    read_seconds: float = 0.0
    build_seconds: float = 0.0
    write_seconds: float = 0.0
    seconds: float = 0.0
    queue_left: int = 0

    @property
    def reject_reasons(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.written.rejects))


@dataclass
class _Batch:
    """What one batch writes, and which queue entries it settles."""

    records: list[ConversationRecord] = field(default_factory=list)
    gone: list[tuple[str, str, datetime | None]] = field(default_factory=list)
    settled: list[tuple[str, str]] = field(default_factory=list)
    # Sessions that cannot be built: rejected with their reason, and settled too (a
    # change to the session queues it again), so they never hold up the queue.
    rejects: list[SessionReject] = field(default_factory=list)


class UnreadableMessage:
    """Stands for a message Python's JSON parser refuses (nested deeper than its
    recursion limit, though valid jsonb): its session is rejected, not the batch."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _TolerantJsonbLoader(JsonbLoader):
    """psycopg's jsonb loader, except that a value it cannot parse becomes an
    UnreadableMessage instead of an exception out of the fetch loop, which would fail
    every session of the batch and leave it first in the queue. The same work as
    the stock loader on a readable message (a try costs nothing until it raises)."""

    def load(self, data: Buffer) -> Any:
        if not isinstance(data, bytes):
            data = bytes(data)
        try:
            return self.loads(data)
        except (RecursionError, ValueError) as error:
            kind = "nested too deeply" if isinstance(error, RecursionError) else "not parsable"
            return UnreadableMessage(f"message is {kind} for Python's JSON parser: {error}")


# Errors of one fetch that come from the rows read (a value that cannot be cast or
# loaded), not from the crew's table: the sessions are fetched apart to find the one.
_ROW_ERRORS = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)


def _session_match(source: Source) -> sql.Composable:
    """h.session_id = s.session_id by discovery's rule (Source.session_id_sides): in
    the column's own type where its index can serve, and a stored id that is no
    value of that type (a crew pointed at another table) matches no row."""
    column, value = source.session_id_sides(sql.Identifier("s", "session_id"))
    return sql.SQL("{column} = {value}").format(column=column, value=value)


def fetch_messages(
    conn: psycopg.Connection,
    source: Source,
    sessions: Sequence[dict[str, Any]],
    unreadable: dict[str, str] | None = None,
) -> dict[str, list[SessionMessage]]:
    """The messages of `sessions` (discovered rows), by session id, in id order.

    Each session's rows lie between its first and last message id. With an index
    on session_id, or when the sessions' ranges are apart, each range is read on
    its own; when they overlap (a day's sessions, interleaved) one scan of the
    shared range costs less. A message Python cannot parse is an UnreadableMessage;
    `unreadable`, when given, gets why for each session holding one (the first).
    """
    if not sessions:
        return {}
    low = min(s["first_message_id"] for s in sessions)
    high = max(s["last_message_id"] for s in sessions)
    spans = sum(s["last_message_id"] - s["first_message_id"] + 1 for s in sessions)
    session_ids = [s["session_id"] for s in sessions]
    # The rows as discovery reads them, and its rule for which it leaves out.
    parts = {
        "histories": source.table,
        "created_at": source.created_at,
        "message": source.message,
        "message_text": source.message_text,
        "message_join": source.message_join,
    }
    if source.has_session_index or spans <= high - low + 1:
        statement = query(
            "session_messages_by_session", session_match=_session_match(source), **parts
        )
        params: dict[str, Any] = {
            "session_ids": session_ids,
            "first_ids": [s["first_message_id"] for s in sessions],
            "last_ids": [s["last_message_id"] for s in sessions],
        }
    else:
        statement = query("session_messages_by_range", **parts)
        params = {"session_ids": session_ids, "low": low, "high": high}
    messages: dict[str, list[SessionMessage]] = defaultdict(list)
    with conn.cursor() as cur:
        cur.adapters.register_loader("jsonb", _TolerantJsonbLoader)
        for session_id, message_id, message, created_at in cur.execute(statement, params):
            if type(message) is UnreadableMessage and unreadable is not None:
                unreadable.setdefault(session_id, f"histories row {message_id}: {message.reason}")
            messages[session_id].append(SessionMessage(message_id, message, created_at))
    return messages


def _fetch_apart(
    conn: psycopg.Connection,
    source: Source,
    sessions: Sequence[dict[str, Any]],
    unreadable: dict[str, str],
) -> dict[str, list[SessionMessage]]:
    """fetch_messages, except that a row error (a value PostgreSQL cannot cast, or
    psycopg cannot load) is narrowed down to its sessions by halving the batch: they
    are named in `unreadable` and the others are read. Costs more statements only
    when a fetch fails."""
    try:
        return fetch_messages(conn, source, sessions, unreadable)
    except _ROW_ERRORS as error:
        if len(sessions) == 1:
            reason = f"its messages cannot be read: {str(error).strip()}"
            unreadable[sessions[0]["session_id"]] = reason
            return {}
    half = len(sessions) // 2
    found = _fetch_apart(conn, source, sessions[:half], unreadable)
    found.update(_fetch_apart(conn, source, sessions[half:], unreadable))
    return found


def _record(session: dict[str, Any], messages: Sequence[SessionMessage]) -> ConversationRecord:
    content = build_content(messages)
    metadata = dict(content.metadata)
    sentiment = metadata.get("sentiment") or {}
    return ConversationRecord(
        client_code=session["client_code"],
        crew_code=session["crew_code"],
        session_id=session["session_id"],
        user_id=content.user_id or session["session_id"],
        channel=content.channel or "web",
        full_conversation=content.full_conversation,
        summary=content.summary,
        metadata=metadata,
        status="handoff_complete" if content.handed_off else "active",
        message_count=len(messages),
        sentiment=sentiment.get("compound"),
        language=metadata.get("language"),
        created_at=session["started_at"],
        last_message_at=session["ended_at"],
        source_updated_at=session["updated_at"],
    )


def _sessions_apart(
    cur: psycopg.Cursor[dict[str, Any]], keys: Sequence[tuple[str, str]], batch: _Batch
) -> list[dict[str, Any]]:
    """The discovered rows of `keys` (sessions_to_build). A row psycopg cannot load (a
    time Python cannot hold, such as infinity) is narrowed down by halving the keys
    and rejected into `batch`; more statements only when a read fails."""
    try:
        return cur.execute(
            query("sessions_to_build"),
            {"crew_codes": [k[0] for k in keys], "session_ids": [k[1] for k in keys]},
        ).fetchall()
    except _ROW_ERRORS as error:
        if len(keys) == 1:
            reason = f"its discovered session cannot be read: {str(error).strip()}"
            batch.rejects.append(SessionReject(None, keys[0][0], keys[0][1], reason[:2000]))
            return []
    half = len(keys) // 2
    return _sessions_apart(cur, keys[:half], batch) + _sessions_apart(cur, keys[half:], batch)


class _Builder:
    """Shared by both modes: read, build, write one batch of sessions."""

    def __init__(
        self,
        pool: ConnectionPool,
        report: BuildReport,
        summarize: Summarize | None,
        summarizer_name: str,
        progress: ProgressLog,
    ) -> None:
        self.pool = pool
        self.report = report
        self.summarize = summarize
        self.summarizer_name = summarizer_name
        self.progress = progress
        self.sources: dict[str, Source | CrewSourceError] = {}

    def _source(self, conn: psycopg.Connection, session: dict[str, Any]) -> Source:
        crew_code = session["crew_code"]
        if crew_code not in self.sources:
            crew = Crew(crew_code, session["client_code"], session["histories_table"])
            try:
                self.sources[crew_code] = inspect_source(conn, crew)
            except CrewSourceError as error:
                self.sources[crew_code] = error
        found = self.sources[crew_code]
        if isinstance(found, CrewSourceError):
            raise found
        return found

    def read(self, keys: Sequence[tuple[str, str]]) -> _Batch:
        """The batch's records, built from the sessions' messages (no transaction held)."""
        batch = _Batch()
        started = time.perf_counter()
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            sessions = _sessions_apart(cur, keys, batch)
            found = {(s["crew_code"], s["session_id"]) for s in sessions}
            # Queued keys with no discovered row (a crew removed), or whose row was
            # rejected: nothing to build.
            batch.settled.extend(k for k in keys if k not in found)
            by_crew: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for session in sessions:
                for at in (session["started_at"], session["stored_created_at"]):
                    if at is not None:
                        self.report.touched_days.add(utc_day(at))
                key = (session["crew_code"], session["session_id"])
                if session["deleted_at"] is not None:
                    batch.gone.append((*key, session["updated_at"]))
                    batch.settled.append(key)
                else:
                    by_crew[session["crew_code"]].append(session)
            messages: dict[tuple[str, str], list[SessionMessage]] = {}
            unreadable: dict[tuple[str, str], str] = {}
            for crew_code, crew_sessions in by_crew.items():
                crew_unreadable: dict[str, str] = {}
                try:
                    source = self._source(conn, crew_sessions[0])
                    found_messages = _fetch_apart(conn, source, crew_sessions, crew_unreadable)
                except (CrewSourceError, psycopg.Error) as error:
                    self.report.crew_errors[crew_code] = str(error).strip()
                    continue
                for session in crew_sessions:
                    key = (crew_code, session["session_id"])
                    messages[key] = found_messages.get(session["session_id"], [])
                unreadable.update(((crew_code, s), why) for s, why in crew_unreadable.items())
        self.report.read_seconds += time.perf_counter() - started
        self.report.sessions += len(sessions)

        started = time.perf_counter()
        for crew_sessions in by_crew.values():
            for session in crew_sessions:
                key = (session["crew_code"], session["session_id"])
                if key not in messages:
                    continue  # its crew failed: stays queued
                batch.settled.append(key)
                why = unreadable.get(key)
                if why is None and not messages[key]:
                    # Rows gone since discovery saw them: discovery will notice and
                    # mark the session deleted, which queues it again.
                    self.report.without_messages += 1
                    continue
                if why is None:
                    try:
                        batch.records.append(_record(session, messages[key]))
                        continue
                    except Exception as error:  # noqa: BLE001 - this session's, not the batch's
                        why = f"cannot be built: {type(error).__name__}: {error}"
                batch.rejects.append(
                    SessionReject(session["client_code"], key[0], key[1], why[:2000])
                )
        self._summarize(batch.records)
        self.report.build_seconds += time.perf_counter() - started
        return batch

    def _summarize(self, records: list[ConversationRecord]) -> None:
        """Replace extractive summaries by the LLM's; on failure keep them and say so."""
        if self.summarize is None or not records:
            return
        try:
            summaries = list(self.summarize([r.full_conversation or "" for r in records]))
            if len(summaries) != len(records):
                raise ValueError(f"{len(summaries)} summaries for {len(records)} transcripts")
        except Exception as error:  # noqa: BLE001 - any backend failure: keep extractive
            message = f"LLM summarizer failed, extractive summaries kept: {error}"
            self.report.summarizer_errors.append(message)
            self.progress(message)
            return
        for record, summary in zip(records, summaries, strict=True):
            # Anything but text keeps the extractive summary (never a reject).
            if isinstance(summary, str):
                record.summary = summary
                record.metadata["summarizer"] = self.summarizer_name

    def write(self, batch: _Batch, versions: dict[tuple[str, str], int] | None) -> None:
        """Records, soft deletes and queue removal: all or nothing."""
        started = time.perf_counter()
        with self.pool.connection() as conn, conn.transaction():
            written = upsert_conversations(conn, batch.records, source="pipeline")
            written.rejects.extend(record_session_rejects(conn, batch.rejects, "pipeline"))
            self.report.soft_deleted += soft_delete_gone(conn, batch.gone)
            if versions is not None and batch.settled:
                settled = [k for k in batch.settled if k in versions]
                conn.execute(
                    query("dequeue_built"),
                    {
                        "crew_codes": [k[0] for k in settled],
                        "session_ids": [k[1] for k in settled],
                        "versions": [versions[k] for k in settled],
                    },
                )
        self.report.written.add(written)
        self.report.write_seconds += time.perf_counter() - started
        self.report.batches += 1


def build_conversations(
    pool: ConnectionPool,
    *,
    mode: BuildMode = "incremental",
    window: tuple[datetime, datetime] | None = None,
    batch_sessions: int = 1000,
    max_batches: int | None = None,
    summarize: Summarize | None = None,
    summarizer_name: str = "extractive",
    progress: ProgressLog | None = None,
) -> BuildReport:
    """Build the conversations of queued sessions (incremental) or of a window (full)."""
    started = time.perf_counter()
    report = BuildReport(mode=mode)
    say = progress or (lambda _message: None)
    builder = _Builder(pool, report, summarize, summarizer_name, say)
    if mode == "full":
        if window is None:
            raise ValueError("a full build needs a window (a partition's start and end)")
        with pool.connection() as conn:
            keys = [
                (row[0], row[1])
                for row in conn.execute(
                    query("window_session_keys"),
                    {"window_start": window[0], "window_end": window[1]},
                )
            ]
        say(f"full build of {len(keys)} sessions filed under {window[0]:%Y-%m-%d}")
        for start in range(0, len(keys), batch_sessions):
            builder.write(builder.read(keys[start : start + batch_sessions]), versions=None)
            _say_batch(say, report)
    else:
        _drain_queue(pool, builder, batch_sessions, max_batches, say)
    with pool.connection() as conn:
        row = conn.execute(query("queue_backlog")).fetchone()
    report.queue_left = int(row[0]) if row else 0
    report.seconds = time.perf_counter() - started
    return report


def _drain_queue(
    pool: ConnectionPool,
    builder: _Builder,
    batch_sessions: int,
    max_batches: int | None,
    say: ProgressLog,
) -> None:
    report = builder.report
    # A session built in this run and changed again meanwhile waits for the next
    # run: a chat that never stops talking cannot keep one run going forever.
    built: set[tuple[str, str]] = set()
    # One queue drain at a time: overlapping sensor runs would only duplicate work
    # (correctness does not depend on it).
    with pool.connection() as lock_conn, locks.session_lock(lock_conn, "conversation_builder"):
        while max_batches is None or report.batches < max_batches:
            with pool.connection() as conn:
                entries = conn.execute(
                    query("peek_conversation_queue"),
                    {"limit": batch_sessions, "skip_crews": list(report.crew_errors)},
                ).fetchall()
            versions = {
                (crew, session): version
                for crew, session, version in entries
                if (crew, session) not in built
            }
            if not versions:
                break
            built.update(versions)
            failing = len(report.crew_errors)
            batch = builder.read(list(versions))
            if not batch.settled and len(report.crew_errors) == failing:
                break
            # Sessions of a crew that failed stay queued; the next peek skips them.
            builder.write(batch, versions)
            _say_batch(say, report)


def _say_batch(say: ProgressLog, report: BuildReport) -> None:
    written = report.written
    say(
        f"batch {report.batches}: {report.sessions} sessions so far; "
        f"{written.inserted} inserted, {written.updated} updated, {written.unchanged} "
        f"unchanged, {report.soft_deleted} soft-deleted, {written.rejected} rejected"
    )
