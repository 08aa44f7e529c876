"""Messenger sync: each page's threads and messages, exact, incremental and resumable.

The page's threads are listed most recently updated first (the platform has no
time-based paging). An incremental pass stops at the first thread older than the
page's watermark minus an overlap, and for each changed thread reads only the
messages newer than what is stored (the nested `messages.limit(N)` usually holds
them; one `/messages` call per 100 more otherwise). A full pass lists every thread
and every message, then marks what the platform no longer has as deleted.

Each API page of threads is written in one transaction (a COPY into staging
tables, then one upsert for the threads and one for the messages), while a
second thread already fetches the next API page: the list's cursor makes fetching
sequential, and writing hides behind it. The watermark moves only in the
transaction of the last page a pass covers, so a run killed anywhere leaves the
stored state whole and the next run re-reads from the old watermark; whatever
committed stays, and an upsert never duplicates it. No paging cursor is stored.

Every changed thread is queued (same transaction) for `build_thread_conversations`,
which writes it into `conversations` through `store.upsert_conversations`, the
write path of discovered sessions, with `channel = 'messenger'`.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
import psycopg
from psycopg_pool import ConnectionPool

from conversation_assets import locks
from conversation_assets.messenger_api import (
    ApiStats,
    GraphApiError,
    GraphClient,
    MalformedResponse,
    RawPage,
    ThrottleTooLong,
    TokenInvalid,
    is_node_id,
    next_cursor,
    scrub,
)
from conversation_assets.queries import query
from conversation_assets.store import (
    ConversationRecord,
    UpsertReport,
    soft_delete_gone,
    upsert_conversations,
)
from conversation_assets.transcripts import SessionMessage, build_content

Mode = Literal["incremental", "full"]
Say = Callable[[str], None]

# `to` is left out: it is the page or the contact, which the thread already says.
MESSAGE_FIELDS = "id,message,from,created_time,attachments,sticker,shares"
THREAD_FIELDS = "id,updated_time,message_count,unread_count,snippet,participants,senders,can_reply"
CREW_PREFIX = "messenger:"  # conversations.crew_code of a page's threads
CHANNEL = "messenger"
_MAX_ID = 255
_EXCERPT = 500


def crew_code(page_id: str) -> str:
    """The `conversations.crew_code` of a page's threads (session_id: the contact)."""
    return f"{CREW_PREFIX}{page_id}"


@dataclass(frozen=True)
class Page:
    page_id: str
    client_code: str
    label: str | None
    enabled: bool
    watermark: datetime | None
    last_sync_at: datetime | None
    last_full_sync_at: datetime | None
    throttled_until: datetime | None


def load_pages(conn: psycopg.Connection, page_ids: Sequence[str] | None = None) -> list[Page]:
    rows = conn.execute(
        query("messenger_pages_with_state"),
        {"page_ids": list(page_ids) if page_ids is not None else None},
    ).fetchall()
    return [Page(*row) for row in rows]


# --- parsing ------------------------------------------------------------------------


@dataclass(slots=True)
class ThreadRow:
    page_id: str
    sender_id: str
    client_code: str
    thread_id: str
    participant_name: str | None
    updated_time: datetime
    message_count: int | None
    unread_count: int | None
    snippet: str | None
    can_reply: bool | None

    def row(self) -> tuple[Any, ...]:
        return (
            self.page_id, self.sender_id, self.client_code, self.thread_id,
            self.participant_name, self.updated_time, self.message_count, self.unread_count,
            self.snippet, self.can_reply,
        )  # fmt: skip


@dataclass(slots=True)
class EventRow:
    message_id: str
    page_id: str
    sender_id: str
    client_code: str
    thread_id: str
    direction: str
    from_id: str | None
    from_name: str | None
    created_time: datetime
    text: str | None
    attachment_kind: str | None

    def row(self) -> tuple[Any, ...]:
        return (
            self.message_id, self.page_id, self.sender_id, self.client_code, self.thread_id,
            self.direction, self.from_id, self.from_name, self.created_time, self.text,
            self.attachment_kind,
        )  # fmt: skip


@dataclass(slots=True)
class RejectRow:
    kind: str  # thread, message, response
    key: str
    reason: str
    excerpt: str | None


def _excerpt(raw: Any) -> str:
    try:
        text = orjson.dumps(raw, default=repr).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = repr(raw)
    return clean_text(text)[:_EXCERPT] or ""


def _hash_key(raw: Any) -> str:
    return "sha256:" + hashlib.sha256(_excerpt(raw).encode()).hexdigest()


def clean_text(value: str) -> str:
    """Text PostgreSQL can hold: no NUL, no lone surrogate (replaced)."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        cleaned = clean_text(value).strip()
        return cleaned or None
    return None


def _identifier(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        value = clean_text(value).strip()
        if value and len(value) <= _MAX_ID:
            return value
    return None


def _count(value: Any) -> int | None:
    """An integer count; a numeric string is read, anything else is unknown."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 2**31 else None
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
        return number if number < 2**31 else None
    return None


# Times every reader can load back, whatever its session's time zone (Python's years
# are 1 to 9999): a day's margin at each end.
_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 30, tzinfo=UTC)


def parse_time(value: Any) -> datetime | None:
    """The platform's `2026-11-20T09:00:00+0000` (any ISO 8601 with an offset), in UTC."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value.strip())
        if at.tzinfo is None or at.utcoffset() is None:
            return None
        at = at.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    return at if _EARLIEST <= at <= _LATEST else None


def _people(value: Any) -> list[dict[str, Any]]:
    data = value.get("data") if isinstance(value, dict) else None
    return [p for p in data if isinstance(p, dict)] if isinstance(data, list) else []


def parse_thread(page: Page, raw: Any) -> ThreadRow | RejectRow:
    """A listed thread, or why it cannot be stored."""
    if not isinstance(raw, dict):
        return RejectRow(
            "thread", _hash_key(raw), "a thread that is not a JSON object", _excerpt(raw)
        )
    thread_id = _identifier(raw.get("id"))
    if thread_id is None:
        return RejectRow("thread", _hash_key(raw), "a thread without a usable id", _excerpt(raw))
    if not is_node_id(thread_id):
        reason = "a thread id the Graph API cannot be asked for (unexpected characters)"
        return RejectRow("thread", thread_id, reason, _excerpt(raw))
    updated = parse_time(raw.get("updated_time"))
    if updated is None:
        reason = (
            f"updated_time {raw.get('updated_time')!r:.80} is not a time with an offset "
            "(years 1 to 9999)"
        )
        return RejectRow("thread", thread_id, reason, _excerpt(raw))
    contact = None
    for person in _people(raw.get("participants")) + _people(raw.get("senders")):
        person_id = _identifier(person.get("id"))
        if person_id is not None and person_id != page.page_id:
            contact = (person_id, _text(person.get("name")))
            break
    if contact is None:
        reason = "no participant other than the page"
        return RejectRow("thread", thread_id, reason, _excerpt(raw))
    can_reply = raw.get("can_reply")
    return ThreadRow(
        page_id=page.page_id,
        sender_id=contact[0],
        client_code=page.client_code,
        thread_id=thread_id,
        participant_name=contact[1],
        updated_time=updated,
        message_count=_count(raw.get("message_count")),
        unread_count=_count(raw.get("unread_count")),
        snippet=_text(raw.get("snippet")),
        can_reply=can_reply if isinstance(can_reply, bool) else None,
    )


def _attachment_kind(raw: dict[str, Any]) -> str | None:
    if raw.get("sticker"):
        return "sticker"
    for item in _people(raw.get("attachments")):
        mime = item.get("mime_type")
        if isinstance(mime, str) and "/" in mime:
            major = mime.split("/", 1)[0]
            if major in ("image", "video", "audio"):
                return major
        if "image_data" in item:
            return "image"
        if "video_data" in item:
            return "video"
        return "file"
    if _people(raw.get("shares")):
        return "share"
    return None


def parse_message(page: Page, thread: ThreadRow, raw: Any) -> EventRow | RejectRow:
    """A message of a thread, or why it cannot be stored."""
    if not isinstance(raw, dict):
        return RejectRow(
            "message", _hash_key(raw), "a message that is not a JSON object", _excerpt(raw)
        )
    message_id = _identifier(raw.get("id"))
    if message_id is None:
        reason = f"a message of thread {thread.thread_id} without a usable id"
        return RejectRow("message", _hash_key(raw), reason, _excerpt(raw))
    created = parse_time(raw.get("created_time"))
    if created is None:
        reason = (
            f"created_time {raw.get('created_time')!r:.80} is not a time with an offset "
            "(years 1 to 9999)"
        )
        return RejectRow("message", message_id, reason, _excerpt(raw))
    sender = raw.get("from")
    from_id = _identifier(sender.get("id")) if isinstance(sender, dict) else None
    if from_id is None:
        return RejectRow(
            "message", message_id, "a message without a sender (from.id)", _excerpt(raw)
        )
    kind = _attachment_kind(raw)
    body = raw.get("message")
    if body is not None and not isinstance(body, str) and kind is None:
        reason = f"message is {type(body).__name__}, not text, and there is no attachment"
        return RejectRow("message", message_id, reason, _excerpt(raw))
    return EventRow(
        message_id=message_id,
        page_id=page.page_id,
        sender_id=thread.sender_id,
        client_code=page.client_code,
        thread_id=thread.thread_id,
        direction="outbound" if from_id == page.page_id else "inbound",
        from_id=from_id,
        from_name=_text(sender.get("name")),
        created_time=created,
        text=_text(body),
        attachment_kind=kind,
    )


# --- one page's sync ----------------------------------------------------------------


@dataclass(kw_only=True)
class PageOutcome(ApiStats):
    """One page's sync: what it wrote, and (from ApiStats) what its calls cost."""

    page_id: str
    client_code: str
    mode: Mode
    status: str = "ok"  # ok, failed, throttled, skipped
    error: str | None = None
    threads_listed: int = 0
    threads_new: int = 0
    threads_updated: int = 0
    threads_deleted: int = 0
    messages_new: int = 0
    messages_updated: int = 0
    messages_deleted: int = 0
    rejects: int = 0
    api_pages: int = 0
    watermark_before: datetime | None = None
    watermark_after: datetime | None = None
    resume_after: datetime | None = None
    seconds: float = 0.0
    db_seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        """Plain values for run metadata (no token can be among them)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, float):
                value = round(value, 3)
            out[key] = value
        return out


# Binary COPY types of the staging tables, in their column order.
_THREAD_TYPES = (
    *("text",) * 5, "timestamptz", "int4", "int4", "text", "bool", "timestamptz", "timestamptz",
)  # fmt: skip
_EVENT_TYPES = (*("text",) * 8, "timestamptz", "text", "text")
_NO_SPAN: tuple[None, None] = (None, None)


def _spans(
    events: Sequence[EventRow], complete: set[str]
) -> dict[str, tuple[datetime | None, datetime | None]]:
    """First and last message of each thread read whole (every live message in hand)."""
    spans: dict[str, tuple[datetime | None, datetime | None]] = {}
    for event in events:
        if event.sender_id in complete:
            first, last = spans.get(event.sender_id, (event.created_time, event.created_time))
            spans[event.sender_id] = (
                min(first, event.created_time),  # type: ignore[type-var]
                max(last, event.created_time),  # type: ignore[type-var]
            )
    return spans


@dataclass
class _Batch:
    threads: list[ThreadRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    rejects: list[RejectRow] = field(default_factory=list)
    complete: list[str] = field(default_factory=list)  # every message of these was read
    gone: list[str] = field(default_factory=list)  # threads deleted at the source
    final: bool = False  # the pass ends with this batch: the watermark moves with it
    listed: int = 0


@dataclass(frozen=True)
class SyncOptions:
    mode: Mode = "incremental"
    overlap: timedelta = timedelta(minutes=5)
    page_size: int = 100
    nested_messages: int = 25
    message_page_size: int = 100
    # Batches written at once, each on its own connection: the database's share of a
    # page (about 60 ms for 100 threads of 20 messages) then hides behind one 50 ms call.
    writers: int = 2

    @property
    def connections(self) -> int:
        """Pool connections one page's sync holds at most: its lock connection (the
        fetcher reads on it) and one per writer."""
        return 1 + self.writers


class ClientConflict(ValueError):
    """The page's stored threads belong to another client than its registration's."""


class _Stop(Exception):
    """The writer failed: the fetcher stops."""


class PageSync:
    """One page: a fetching thread lists and reads, this thread writes."""

    def __init__(
        self,
        pool: ConnectionPool,
        client: GraphClient,
        page: Page,
        options: SyncOptions,
        say: Say,
    ) -> None:
        self.pool = pool
        self.client = client
        self.page = page
        self.options = options
        self.say = say
        full = options.mode == "full" or page.watermark is None
        self.full = full
        self.outcome = PageOutcome(
            page_id=page.page_id,
            client_code=page.client_code,
            mode="full" if full else "incremental",
        )
        self.outcome.watermark_before = page.watermark
        self.top: datetime | None = None  # the newest thread listed, up to `clock`
        self.clock: datetime | None = None  # the database's, when the sync began
        self.hold: datetime | None = None  # the oldest thread left unwritten
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self.messages_so_far = 0
        self.has_rejects = True  # until the page is looked at (run)
        self._reader: psycopg.Connection | None = None
        self._lock = threading.Lock()

    @property
    def thread_fields(self) -> str:
        nested = f"messages.limit({self.options.nested_messages}){{{MESSAGE_FIELDS}}}"
        return f"{THREAD_FIELDS},{nested}"

    # --- fetching (its own thread) ------------------------------------------------
    def batches(self) -> Iterator[_Batch]:
        cutoff = None
        if not self.full and self.page.watermark is not None:
            cutoff = self.page.watermark - self.options.overlap
        for body, after in self._listing():
            if self._stop.is_set():
                raise _Stop
            self.outcome.api_pages += 1
            batch = _Batch()
            data = body.get("data")
            last = after is None
            if not isinstance(data, list):
                batch.rejects.append(
                    RejectRow(
                        "response",
                        _hash_key(body),
                        "a list response without a data array",
                        _excerpt(body),
                    )
                )
                data = []
            threads: list[tuple[ThreadRow, Any]] = []
            for raw in data:
                parsed = parse_thread(self.page, raw)
                if isinstance(parsed, RejectRow):
                    batch.rejects.append(parsed)
                    continue
                if (self.top is None or parsed.updated_time > self.top) and (
                    self.clock is None or parsed.updated_time <= self.clock
                ):
                    # A thread stamped past the database's clock never sets the
                    # watermark: every later change would sit below it.
                    self.top = parsed.updated_time
                if cutoff is not None and parsed.updated_time < cutoff:
                    last = True  # newest first: every thread after this one is older
                    break
                threads.append((parsed, raw.get("messages")))
            batch.listed = len(data)
            self._read_messages(threads, batch)
            batch.final = last and not self.full
            yield batch
            if last:
                break
        if self.full:
            yield self._verify_unseen()

    def _listing(self) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Each list response and its cursor. A full pass needs every page, so the next
        call goes out as soon as a page's cursor is read (from the end of its body),
        while this thread decodes and reads the page. An incremental pass decides from
        each page whether to go on, so it asks for one page at a time: never a call
        more than the change needs."""
        fields, limit = self.thread_fields, self.options.page_size
        if not self.full:
            for body in self.client.list_threads(fields, limit):
                yield body, next_cursor(body)
            return
        pages: queue.Queue[RawPage | BaseException | None] = queue.Queue(maxsize=3)
        done = threading.Event()
        path = f"{self.page.page_id}/conversations"

        def lister() -> None:
            params: dict[str, Any] = {"platform": "messenger", "fields": fields, "limit": limit}
            try:
                while not done.is_set():
                    page = self.client.get("list", path, params, raw=True)
                    _put(pages, page, done)
                    if page.after is None:
                        break
                    params = {**params, "after": page.after}
                _put(pages, None, done)
            except BaseException as error:  # noqa: BLE001 - handed to the reader
                _put(pages, error, done)

        thread = threading.Thread(target=lister, name=f"messenger-list-{self.page.page_id}")
        thread.start()
        try:
            while True:
                item = pages.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                try:
                    body = item.body()
                except MalformedResponse:
                    body = {}  # rejected by the caller as a response without data
                yield body, item.after
        finally:
            done.set()
            thread.join()

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection]:
        """The page's lock connection when the sync holds one (a page then needs one
        connection beside its writers'), else one from the pool."""
        if self._reader is not None:
            yield self._reader
        else:
            with self.pool.connection() as conn:
                yield conn

    def _stored(self, senders: list[str]) -> dict[str, tuple[Any, ...]]:
        if self.full or not senders:
            return {}
        with self._reading() as conn:
            rows = conn.execute(
                query("stored_threads"), {"page_id": self.page.page_id, "sender_ids": senders}
            ).fetchall()
        return {row[0]: row[1:] for row in rows}

    def _read_messages(self, threads: list[tuple[ThreadRow, Any]], batch: _Batch) -> None:
        # A thread listed twice (it moved while the listing ran): the newer view wins.
        latest: dict[str, tuple[ThreadRow, Any]] = {}
        for thread, nested in threads:
            held = latest.get(thread.sender_id)
            if held is None or thread.updated_time >= held[0].updated_time:
                latest[thread.sender_id] = (thread, nested)
        stored = self._stored(list(latest))
        for thread, nested in latest.values():
            self.seen.add(thread.sender_id)
            before = stored.get(thread.sender_id)
            # Times have a second's resolution: a message in the stored second shows
            # in the count.
            changed = (
                self.full
                or before is None
                or before[3]
                or thread.updated_time > before[1]
                or (thread.message_count is not None and thread.message_count != before[4])
            )
            stored_last = None if before is None or before[3] else before[2]
            if self._thread_messages(thread, nested, changed, stored_last, batch):
                batch.threads.append(thread)
            elif self.hold is None or thread.updated_time < self.hold:
                # Not written: the next pass must list it again.
                self.hold = thread.updated_time

    def _thread_messages(
        self,
        thread: ThreadRow,
        nested: Any,
        changed: bool,
        stored_last: datetime | None,
        batch: _Batch,
    ) -> bool:
        """The nested messages, plus `/messages` pages while they are needed: a full
        pass reads them all; a changed thread until one older than the stored last.
        False when a `/messages` answer could not be read: the thread is left as stored
        (no message of it written, none marked deleted) for the next pass."""
        raw_messages: list[Any] = []
        after: str | None = None
        more = False
        if isinstance(nested, dict) and isinstance(nested.get("data"), list):
            raw_messages = nested["data"]
            try:
                after = next_cursor(nested)
            except MalformedResponse:
                after = None  # read the edge from the start instead
                more = True
            more = more or after is not None
        else:
            more = True  # no usable nested field: read the edge from the start
        events = self._parse_messages(thread, raw_messages, batch)

        def reached_stored() -> bool:
            return stored_last is not None and any(e.created_time < stored_last for e in events)

        if more and changed and (self.full or not reached_stored()):
            pages = self.client.thread_messages(
                thread.thread_id, MESSAGE_FIELDS, self.options.message_page_size, after
            )
            unreadable: Any = None
            try:
                for body in pages:
                    data = body.get("data")
                    if not isinstance(data, list):
                        unreadable = body
                        break
                    events.extend(self._parse_messages(thread, data, batch))
                    if not self.full and reached_stored():
                        break
                else:
                    more = False
            except MalformedResponse as error:
                unreadable = str(error)
            if unreadable is not None:
                reason = (
                    f"a messages response of thread {thread.thread_id} that cannot be read: "
                    "the thread is left as stored, for the next pass"
                )
                batch.rejects.append(
                    RejectRow("response", _hash_key(unreadable), reason, _excerpt(unreadable))
                )
                return False
        batch.events.extend(events)
        if self.full and not more:
            batch.complete.append(thread.sender_id)
        self.messages_so_far += len(events)
        return True

    def _parse_messages(self, thread: ThreadRow, data: list[Any], batch: _Batch) -> list[EventRow]:
        events = []
        for raw in data:
            parsed = parse_message(self.page, thread, raw)
            if isinstance(parsed, RejectRow):
                batch.rejects.append(parsed)
            else:
                events.append(parsed)
        return events

    def _verify_unseen(self) -> _Batch:
        """Threads stored live but not listed: each is asked for by id. Gone: marked
        deleted. Still there (it moved past the cursor while the listing ran): synced."""
        batch = _Batch(final=True)
        with self._reading() as conn:
            unseen = conn.execute(
                query("threads_not_seen"),
                {"page_id": self.page.page_id, "seen": sorted(self.seen)},
            ).fetchall()
        found: list[tuple[ThreadRow, Any]] = []
        for sender_id, thread_id in unseen:
            # An id the API cannot be asked for (stored before ids were checked): the
            # complete listing did not show it, so it is gone.
            raw = (
                self.client.thread(thread_id, self.thread_fields) if is_node_id(thread_id) else None
            )
            if raw is None:
                batch.gone.append(sender_id)
                continue
            parsed = parse_thread(self.page, raw)
            if isinstance(parsed, RejectRow):
                batch.rejects.append(parsed)
            else:
                found.append((parsed, raw.get("messages")))
        self._read_messages(found, batch)
        return batch

    # --- writing (this thread) ----------------------------------------------------
    def write(self, conn: psycopg.Connection, batch: _Batch) -> None:
        """One API page of threads in one transaction: COPY into staging tables, one
        upsert for the threads and one for the messages, then what they changed."""
        page_id = self.page.page_id
        counts: Counter[str] = Counter()
        started = time.perf_counter()
        events = sorted(
            {e.message_id: e for e in batch.events}.values(),
            key=lambda e: (e.sender_id, e.message_id),
        )
        # Threads in key order: two writers touching one thread lock it in one order.
        threads = sorted(batch.threads, key=lambda t: t.sender_id)
        complete = set(batch.complete)
        spans = _spans(events, complete)
        with conn.transaction(), conn.cursor() as cur:
            if not batch.final:
                # No WAL flush wait: a crash of the server loses a suffix of the WAL, so
                # a batch lost with it can never be covered by a watermark that stayed
                # (the last batch, which moves it, commits after all others, flushed).
                cur.execute(query("commit_without_flush"))
            touched: set[str] = set()
            if threads:
                cur.execute(query("create_thread_stage"))
                with cur.copy(query("copy_thread_stage")) as copy:
                    copy.set_types(_THREAD_TYPES)
                    for thread in threads:
                        copy.write_row((*thread.row(), *spans.get(thread.sender_id, _NO_SPAN)))
                for sender_id, inserted in cur.execute(query("upsert_staged_threads")):
                    touched.add(sender_id)
                    counts["threads_new" if inserted else "threads_updated"] += 1
            if events or complete:
                cur.execute(query("create_event_stage"))
                with cur.copy(query("copy_event_stage")) as copy:
                    copy.set_types(_EVENT_TYPES)
                    for event in events:
                        copy.write_row(event.row())
                for sender_id, new, changed in cur.execute(query("upsert_staged_events")):
                    touched.add(sender_id)
                    counts["messages_new"] += new
                    counts["messages_updated"] += changed - new
                if counts["messages_new"] < len(events):  # else every one was new here
                    for message_id, other in cur.execute(query("events_of_other_pages")):
                        reason = (
                            f"message id already stored under page {other}: a write never "
                            "moves a message to another page"
                        )
                        batch.rejects.append(RejectRow("message", message_id, reason, None))
                if complete:
                    rows = cur.execute(
                        query("delete_missing_messages"),
                        {"page_id": page_id, "sender_ids": sorted(complete)},
                    ).fetchall()
                    counts["messages_deleted"] += len(rows)
                    touched.update(row[0] for row in rows)
            if batch.gone:
                gone_threads, gone_messages = cur.execute(
                    query("delete_threads"), {"page_id": page_id, "sender_ids": batch.gone}
                ).fetchone()
                counts["threads_deleted"] += gone_threads
                counts["messages_deleted"] += gone_messages
                touched.update(batch.gone)
            if touched:
                # First and last message: known for threads read whole (in the stage
                # row), looked up for the others.
                lookup = sorted(t for t in touched if t not in spans)
                if lookup:
                    cur.execute(
                        query("refresh_thread_times"), {"page_id": page_id, "sender_ids": lookup}
                    )
                cur.execute(
                    query("queue_messenger_threads"),
                    {"page_id": page_id, "sender_ids": sorted(touched)},
                )
            counts["rejects"] += self._settle_rejects(cur, batch, events)
            watermark = None
            if batch.final:
                row = cur.execute(
                    query("save_sync_state"),
                    {
                        "page_id": page_id,
                        "watermark": self.watermark(),
                        "full": self.full,
                        "mode": self.outcome.mode,
                    },
                ).fetchone()
                watermark = row[0] if row else None
        with self._lock:
            out = self.outcome
            for name, value in counts.items():
                setattr(out, name, getattr(out, name) + value)
            if batch.final:
                out.watermark_after = watermark
            out.db_seconds += time.perf_counter() - started

    def watermark(self) -> datetime | None:
        """The newest thread listed (up to the database's clock), kept below any thread
        left unwritten: the next pass lists down to it again."""
        if self.hold is not None and (self.top is None or self.hold <= self.top):
            return self.hold - timedelta(microseconds=1)
        return self.top

    def _settle_rejects(self, cur: psycopg.Cursor, batch: _Batch, events: list[EventRow]) -> int:
        page_id = self.page.page_id
        stored_kinds = ["thread"] * len(batch.threads) + ["message"] * len(events)
        stored_keys = [t.thread_id for t in batch.threads] + [e.message_id for e in events]
        if stored_keys and self.has_rejects:
            cur.execute(
                query("clear_messenger_rejects"),
                {"page_id": page_id, "kinds": stored_kinds, "keys": stored_keys},
            )
        if batch.rejects:
            unique = list({(r.kind, r.key): r for r in batch.rejects}.values())
            cur.execute(
                query("record_messenger_rejects"),
                {
                    "page_id": page_id,
                    "kinds": [r.kind for r in unique],
                    "keys": [r.key[:600] for r in unique],
                    "reasons": [r.reason for r in unique],
                    "excerpts": [r.excerpt for r in unique],
                },
            )
            self.has_rejects = True
            return len(unique)
        return 0

    # --- the pipeline -------------------------------------------------------------
    def run(self) -> PageOutcome:
        """Fetch in a thread; write in `writers` others, each batch on its own connection
        and transaction (at most two API pages wait in between)."""
        started = time.perf_counter()
        handoff: queue.Queue[_Batch | BaseException | None] = queue.Queue(maxsize=2)

        def fetch() -> None:
            try:
                for batch in self.batches():
                    handoff.put(batch)
                handoff.put(None)
            except _Stop:
                handoff.put(None)
            except BaseException as error:  # noqa: BLE001 - handed to the writer
                handoff.put(error)

        fetcher = threading.Thread(target=fetch, name=f"messenger-fetch-{self.page.page_id}")
        try:
            # One sync of a page at a time (a launched full sync waits for the sensor's).
            with (
                self.pool.connection() as conn,
                locks.session_lock(conn, f"messenger_sync:{self.page.page_id}"),
            ):
                self._start(conn)
                self._reader = conn  # idle while the sync runs: the fetcher reads on it
                pending: deque[Future[None]] = deque()
                writers = ThreadPoolExecutor(
                    self.options.writers, thread_name_prefix=f"messenger-write-{self.page.page_id}"
                )
                try:
                    fetcher.start()
                    while True:
                        item = handoff.get()
                        if item is None:
                            break
                        if isinstance(item, BaseException):
                            raise item
                        # The pass's last batch moves the watermark: it commits only after
                        # every batch it covers has.
                        limit = 0 if item.final else self.options.writers - 1
                        while len(pending) > limit:
                            pending.popleft().result()
                        pending.append(writers.submit(self._write_one, item))
                    while pending:
                        pending.popleft().result()
                finally:
                    self._stop.set()
                    while fetcher.is_alive():  # unblock a fetcher waiting to hand off
                        try:
                            handoff.get(timeout=0.05)
                        except queue.Empty:
                            pass
                    writers.shutdown(wait=True, cancel_futures=True)
        finally:
            self._stop.set()
            self._finish(started)
        return self.outcome

    def _start(self, conn: psycopg.Connection) -> None:
        page = self.page
        other, self.has_rejects, self.clock = conn.execute(
            query("page_sync_start"),
            {"page_id": page.page_id, "client_code": page.client_code},
        ).fetchone()  # type: ignore[misc]
        if other is not None:
            raise ClientConflict(
                f"page {page.page_id}: its threads are stored under client {other}, but "
                f"messenger_pages now gives {page.client_code}; a sync never moves a "
                "conversation to another client (give the page its client back, or delete "
                "its rows first)"
            )

    def _write_one(self, batch: _Batch) -> None:
        with self.pool.connection() as conn:
            self.write(conn, batch)
        with self._lock:
            self._progress(batch)

    def _progress(self, batch: _Batch) -> None:
        out, stats = self.outcome, self.client.stats
        waits = (
            f"; throttled {stats.throttle_waits}x ({stats.throttle_seconds:.1f} s)"
            if stats.throttle_waits
            else ""
        ) + (
            f"; paced {stats.slowdown_waits}x ({stats.slowdown_seconds:.1f} s)"
            if stats.slowdown_waits
            else ""
        )
        what = (
            "deletion check"
            if batch.gone or (batch.final and self.full)
            else (f"API page {out.api_pages}")
        )
        self.say(
            f"page {self.page.page_id} ({out.mode}): {what}: {len(self.seen)} threads and "
            f"{self.messages_so_far} messages read so far ({out.threads_new} new, "
            f"{out.threads_updated} updated, {out.threads_deleted} deleted threads; "
            f"{out.messages_new} new messages); {stats.calls} API calls, usage "
            f"{stats.usage_percent:.0f}%{waits}"
        )

    def _finish(self, started: float) -> None:
        out, stats = self.outcome, self.client.stats
        out.threads_listed = len(self.seen)
        for counter in fields(ApiStats):
            setattr(out, counter.name, getattr(stats, counter.name))
        out.seconds = time.perf_counter() - started
        if out.watermark_after is None:
            out.watermark_after = out.watermark_before


def _put(into: queue.Queue[Any], item: Any, done: threading.Event) -> None:
    """Hand `item` over unless the reader has gone (`done`)."""
    while not done.is_set():
        try:
            into.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def sync_page(
    pool: ConnectionPool,
    client: GraphClient,
    page: Page,
    options: SyncOptions,
    say: Say | None = None,
) -> PageOutcome:
    """Sync one page; a failure is the page's outcome (named, scrubbed), never raised."""
    say = say or (lambda _message: None)
    worker = PageSync(pool, client, page, options, say)
    secrets = client.secrets
    try:
        return worker.run()
    except ThrottleTooLong as error:
        outcome = worker.outcome
        outcome.status = "throttled"
        outcome.error = scrub(str(error), secrets)
        outcome.resume_after = _now(pool) + timedelta(seconds=error.wait_seconds)
    except TokenInvalid as error:
        outcome = worker.outcome
        outcome.status = "failed"
        outcome.error = scrub(str(error), secrets)
    except (GraphApiError, psycopg.Error, OSError, ValueError) as error:
        outcome = worker.outcome
        outcome.status = "failed"
        text = scrub(str(error).strip() or type(error).__name__, secrets)
        outcome.error = (
            text if text.startswith(f"page {page.page_id}") else (f"page {page.page_id}: {text}")
        )
    say(outcome.error or "")
    try:
        with pool.connection() as conn:
            conn.execute(
                query("record_sync_error"),
                {
                    "page_id": page.page_id,
                    "error": outcome.error,
                    "throttled_until": outcome.resume_after,
                },
            )
    except psycopg.Error:
        pass  # the database is what failed: the outcome still says why
    return outcome


def database_now(conn: psycopg.Connection) -> datetime:
    """The database's clock: the current transaction's start (its rows' time)."""
    row = conn.execute(query("database_now")).fetchone()
    assert row is not None
    return row[0]


def _now(pool: ConnectionPool) -> datetime:
    with pool.connection() as conn:
        return database_now(conn)


def page_due_for_reconcile(page: Page, reconcile_after: timedelta, now: datetime) -> bool:
    """A page whose last full sync is older than `reconcile_after` (or never ran)."""
    return page.last_full_sync_at is None or now - page.last_full_sync_at >= reconcile_after


# --- the sensor's probe ---------------------------------------------------------------


def probe_page(conn: psycopg.Connection, client: GraphClient, page: Page, look: int = 10) -> bool:
    """Whether the page has changes to sync, for one light call: any of its `look`
    most recently updated threads unknown, newer than stored, or (in the stored second:
    times have a second's resolution) with another message count. An answer of the
    wrong shape raises MalformedResponse."""
    if page.watermark is None:
        return True
    body = client.get(
        "list",
        f"{page.page_id}/conversations",
        {"platform": "messenger", "fields": "id,updated_time,message_count", "limit": look},
    )
    data = body.get("data")
    if not isinstance(data, list):
        raise MalformedResponse(f"page {page.page_id}: a list response without a data array")
    listed: dict[str, tuple[datetime, int | None]] = {}
    for raw in data:
        if isinstance(raw, dict):
            thread_id, at = _identifier(raw.get("id")), parse_time(raw.get("updated_time"))
            if thread_id is not None and at is not None:
                listed[thread_id] = (at, _count(raw.get("message_count")))
    if not listed:
        return False
    stored = {
        row[0]: row[1:]
        for row in conn.execute(
            query("stored_thread_times"),
            {"page_id": page.page_id, "thread_ids": list(listed)},
        )
    }
    for thread_id, (at, count) in listed.items():
        held = stored.get(thread_id)
        if held is None or at > held[0] or (count is not None and count != held[1]):
            return True
    return False


# --- threads into conversations --------------------------------------------------------


@dataclass
class BuildReport:
    threads: int = 0
    written: UpsertReport = field(default_factory=UpsertReport)
    soft_deleted: int = 0
    batches: int = 0
    seconds: float = 0.0
    queue_left: int = 0


def _thread_record(thread: dict[str, Any], events: Sequence[tuple[Any, ...]]) -> ConversationRecord:
    """A thread as a conversation: the contact speaks as User, the page as Assistant."""
    messages = []
    for number, (_mid, direction, created, text, kind) in enumerate(events):
        content = text if text is not None else f"[{kind or 'empty message'}]"
        messages.append(
            SessionMessage(
                number,
                {
                    "type": "human" if direction == "inbound" else "ai",
                    "content": content,
                    "additional_kwargs": {"user_id": thread["sender_id"], "channel": CHANNEL},
                },
                created,
            )
        )
    content = build_content(messages)
    metadata = dict(content.metadata)
    metadata.update(
        {
            "source": CHANNEL,
            "page_id": thread["page_id"],
            "thread_id": thread["thread_id"],
            "participant_name": thread["participant_name"],
            "unread_count": thread["unread_count"],
            "can_reply": thread["can_reply"],
            "first_message_id": events[0][0] if events else None,
            "last_message_id": events[-1][0] if events else None,
        }
    )
    sentiment = metadata.get("sentiment") or {}
    return ConversationRecord(
        client_code=thread["client_code"],
        crew_code=crew_code(thread["page_id"]),
        session_id=thread["sender_id"],
        user_id=thread["sender_id"],
        full_conversation=content.full_conversation,
        summary=content.summary,
        channel=CHANNEL,
        metadata=metadata,
        status="active",
        message_count=len(events),
        sentiment=sentiment.get("compound"),
        language=metadata.get("language"),
        created_at=thread["first_message_at"] or thread["updated_time"],
        last_message_at=thread["last_message_at"] or thread["updated_time"],
        source_updated_at=thread["updated_time"],
    )


def build_thread_conversations(
    pool: ConnectionPool,
    page_ids: Sequence[str],
    *,
    mode: Mode = "incremental",
    batch_threads: int = 500,
    say: Say | None = None,
) -> BuildReport:
    """Write the queued threads of these pages (incremental) or all of them (full) into
    `conversations`; each batch and its dequeue in one transaction."""
    say = say or (lambda _message: None)
    started = time.perf_counter()
    report = BuildReport()
    pages = list(page_ids)
    if mode == "full":
        with pool.connection() as conn:
            keys = [tuple(r) for r in conn.execute(query("page_thread_keys"), {"page_ids": pages})]
        chunks: Iterator[tuple[list[tuple[str, str]], dict[tuple[str, str], int] | None]] = (
            (keys[i : i + batch_threads], None) for i in range(0, len(keys), batch_threads)
        )
    else:
        chunks = _queued(pool, pages, batch_threads)
    for keys_chunk, versions in chunks:
        _build_batch(pool, keys_chunk, versions, report)
        say(
            f"conversations of messenger threads: batch {report.batches}, {report.threads} "
            f"threads; {report.written.inserted} inserted, {report.written.updated} updated, "
            f"{report.soft_deleted} soft-deleted, {report.written.rejected} rejected"
        )
    with pool.connection() as conn:
        row = conn.execute(query("messenger_queue_left"), {"page_ids": pages}).fetchone()
    report.queue_left = int(row[0]) if row else 0
    report.seconds = time.perf_counter() - started
    return report


def _queued(
    pool: ConnectionPool, pages: list[str], batch_threads: int
) -> Iterator[tuple[list[tuple[str, str]], dict[tuple[str, str], int]]]:
    built: set[tuple[str, str]] = set()
    while True:
        with pool.connection() as conn:
            rows = conn.execute(
                query("peek_messenger_queue"), {"page_ids": pages, "limit": batch_threads}
            ).fetchall()
        versions = {(p, s): v for p, s, v in rows if (p, s) not in built}
        if not versions:
            return
        built.update(versions)
        yield list(versions), versions


def _build_batch(
    pool: ConnectionPool,
    keys: list[tuple[str, str]],
    versions: dict[tuple[str, str], int] | None,
    report: BuildReport,
) -> None:
    params = {"page_ids": [k[0] for k in keys], "sender_ids": [k[1] for k in keys]}
    with pool.connection() as conn:
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            threads = cur.execute(query("threads_to_build"), params).fetchall()
        events: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        for page_id, sender_id, *event in conn.execute(query("thread_events"), params):
            events.setdefault((page_id, sender_id), []).append(tuple(event))
        records, gone = [], []
        for thread in threads:
            key = (thread["page_id"], thread["sender_id"])
            if thread["deleted_at"] is not None:
                gone.append((crew_code(key[0]), key[1], thread["updated_time"]))
            else:
                records.append(_thread_record(thread, events.get(key, [])))
        with conn.transaction():
            written = upsert_conversations(conn, records, source=CHANNEL)
            report.soft_deleted += soft_delete_gone(conn, gone)
            if versions is not None:
                conn.execute(
                    query("dequeue_messenger_built"),
                    {
                        "page_ids": [k[0] for k in keys],
                        "sender_ids": [k[1] for k in keys],
                        "versions": [versions[k] for k in keys],
                    },
                )
    report.written.add(written)
    report.threads += len(threads)
    report.batches += 1
