"""A local Graph API that speaks the documented Messenger format, for tests, demos and
the benchmark; the real API is one variable away (MESSENGER_GRAPH_URL).

What it does like the platform: `GET /{page-id}/conversations` (threads most
recently updated first, `fields` with a nested `messages.limit(N){...}`, cursor
paging with `next` only when more follow, pages sometimes shorter than `limit`),
`GET /{thread-id}/messages` (newest first) and `GET /{thread-id}`; page tokens in
`Authorization` or `access_token`; usage headers on every response, errors
included (`X-App-Usage`, `X-Page-Usage`, `X-Business-Use-Case-Usage`); throttling
errors (codes 4, 17, 32, 613, 80001) once a call budget is spent or when scripted;
code 190 for a bad token; deletes of threads and messages; and a simulated
latency per call (the answer leaves `latency` seconds after the request came in).

Cursors encode the last item's sort key, so a thread that moves to the top while
a listing runs is skipped by that listing (as on the platform) but never makes it
skip another. `POST /_sim/...` endpoints (not the platform's) let a benchmark or a
demo change the data from outside the process. Everything is deterministic for a
given random state; times come from a clock that tests can set.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import random
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson

from conversation_assets.queries import query

GRAPH_VERSION = "v23.0"
THROTTLE_CODES = {"app": 4, "user": 17, "page": 32, "custom": 613, "business": 80001}
_THROTTLE_MESSAGES = {
    4: "Application request limit reached",
    17: "User request limit reached",
    32: "Page request limit reached",
    613: "Calls to this api have exceeded the rate limit.",
    80001: "There have been too many calls to this Page account. Wait a bit and try again.",
}
DEFAULT_THREAD_FIELDS = "id,updated_time"
DEFAULT_MESSAGE_FIELDS = "id,created_time"


def graph_time(at: datetime) -> str:
    """The platform's timestamp format: ``2026-11-20T09:00:00+0000``."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


@dataclass
class SimMessage:
    id: str
    created_time: datetime
    from_id: str
    from_name: str | None
    to_id: str
    to_name: str | None
    text: str | None = None
    attachment: dict[str, Any] | None = None  # {"kind": "image"|"video"|..., ...}
    sticker: str | None = None
    share: str | None = None
    deleted: bool = False
    raw: Any = None  # replaces the whole object in answers (malformed-input tests)
    rendered: tuple[int, Any] | None = None  # (id of the fields asked, JSON fragment)

    def render(self, fields: dict[str, Any], plain: bool = False) -> Any:
        """to_json as a ready JSON fragment, kept until the message changes: a page of a
        big inbox is served again and again (the benchmark's simulator shares the CPU)."""
        if plain:
            return self.to_json(fields)
        if self.rendered is not None and self.rendered[0] == id(fields):
            return self.rendered[1]
        value = self.to_json(fields)
        try:
            value = orjson.Fragment(orjson.dumps(value))
        except TypeError:
            return value  # what orjson refuses (a lone surrogate) is written by json
        self.rendered = (id(fields), value)
        return value

    def to_json(self, fields: dict[str, Any]) -> Any:
        if self.raw is not None:
            return self.raw
        full: dict[str, Any] = {
            "id": self.id,
            "created_time": graph_time(self.created_time),
            "from": _person(self.from_id, self.from_name),
            "to": {"data": [_person(self.to_id, self.to_name)]},
        }
        if self.text is not None:
            full["message"] = self.text
        else:
            full["message"] = ""
        if self.sticker:
            full["sticker"] = self.sticker
        if self.attachment:
            kind = self.attachment["kind"]
            item: dict[str, Any] = {"id": f"{self.id}_a", "name": self.attachment.get("name")}
            if kind == "image":
                item["mime_type"] = "image/jpeg"
                item["image_data"] = {"url": "https://example.invalid/i.jpg", "width": 640}
            elif kind == "video":
                item["mime_type"] = "video/mp4"
                item["video_data"] = {"url": "https://example.invalid/v.mp4"}
            elif kind == "audio":
                item["mime_type"] = "audio/mpeg"
                item["file_url"] = "https://example.invalid/a.mp3"
            else:
                item["mime_type"] = "application/pdf"
                item["file_url"] = "https://example.invalid/f.pdf"
            full["attachments"] = {"data": [item]}
        if self.share:
            full["shares"] = {"data": [{"link": self.share, "name": "shared link"}]}
        return {k: v for k, v in full.items() if k in fields or k == "id"}


def _person(person_id: str, name: str | None) -> dict[str, Any]:
    person: dict[str, Any] = {"id": person_id}
    if name is not None:
        person["name"] = name
        person["email"] = f"{person_id}@facebook.com"
    return person


@dataclass
class SimThread:
    id: str
    page_id: str
    page_name: str
    participant_id: str
    participant_name: str | None
    updated_time: datetime
    messages: list[SimMessage] = field(default_factory=list)  # oldest first
    unread_count: int = 0
    can_reply: bool = True
    deleted: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # malformed fields, for tests
    version: int = 0  # bumped when messages come or go
    cache: tuple[int, list[SimMessage]] | None = None

    def live_messages(self) -> list[SimMessage]:
        return [m for m in self.messages if not m.deleted]

    def sort_key(self) -> tuple[datetime, str]:
        return (self.updated_time, self.id)

    def to_json(self, fields: dict[str, Any], messages: Callable[..., Any]) -> dict[str, Any]:
        live = self.live_messages()
        participants = [_person(self.participant_id, self.participant_name)]
        participants.append(_person(self.page_id, self.page_name))
        full: dict[str, Any] = {
            "id": self.id,
            "updated_time": graph_time(self.updated_time),
            "message_count": len(live),
            "unread_count": self.unread_count,
            "snippet": (live[-1].text or "")[:100] if live else "",
            "participants": {"data": participants},
            "senders": {"data": participants[:1]},
            "can_reply": self.can_reply,
            "link": f"/{self.page_id}/inbox/{self.id}",
        }
        out = {k: v for k, v in full.items() if k in fields or k == "id"}
        if "messages" in fields:
            out["messages"] = messages(self, fields["messages"])
        for key, value in self.overrides.items():
            if value is _DROP:
                out.pop(key, None)
            else:
                out[key] = value
        return out


_DROP = object()


@dataclass
class SimPage:
    page_id: str
    name: str
    token: str
    threads: dict[str, SimThread] = field(default_factory=dict)
    version: int = 0  # bumped by every change of a thread's order or liveness
    cache: tuple[int, list[SimThread]] | None = None

    def listing(self) -> list[SimThread]:
        """Live threads, most recently updated first; sorted again only after a change."""
        state = self.version
        if self.cache is None or self.cache[0] != state:
            live = (t for t in self.threads.values() if not t.deleted)
            self.cache = (state, sorted(live, key=SimThread.sort_key, reverse=True))
        return self.cache[1]


class GraphError(Exception):
    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        subcode: int | None = None,
        transient: bool = False,
        kind: str = "OAuthException",
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.subcode = status, code, subcode
        self.transient, self.kind = transient, kind

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": str(self),
            "type": self.kind,
            "code": self.code,
            "is_transient": self.transient,
            "fbtrace_id": hashlib.sha1(str(self).encode()).hexdigest()[:11],
        }
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        return {"error": error}


@dataclass
class Scripted:
    """One scripted answer: an error (status + body), or a raw body (malformed), and
    extra headers. `match`: a substring of the path it applies to (any when empty)."""

    status: int = 200
    body: Any = None  # dict: JSON; bytes: sent as is
    headers: dict[str, str] = field(default_factory=dict)
    match: str = ""


class GraphSim:
    """The platform's state and its HTTP face. Thread-safe through one lock."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        random_state: int = 7,
        start: datetime | None = None,
        call_budget: int | None = None,
        budget_window: float = 3600.0,
        short_pages: bool = False,
    ) -> None:
        self.latency = latency
        self.rng = random.Random(random_state)
        self.pages: dict[str, SimPage] = {}
        self.threads: dict[str, SimThread] = {}
        self.lock = threading.RLock()
        self._clock = start or datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
        self._clock_real = start is None
        self._counter = 0
        self.call_budget = call_budget
        self.budget_window = budget_window
        self._calls_in_window: deque[float] = deque()
        self.short_pages = short_pages
        self.requests: list[dict[str, Any]] = []
        self.script: list[Scripted] = []
        self.usage: dict[str, Any] | None = None  # fixed usage figures, when set
        self.regain_minutes = 0
        # Called after a list page is answered, with (page_id, pages served so far):
        # tests change the data while a sync runs.
        self.after_list_page: Callable[[str, int], None] | None = None
        self.url = ""
        self._list_pages_served: dict[str, int] = {}
        self._plain = False  # answers without cached JSON fragments (see handle)

    # --- time ---------------------------------------------------------------------
    def now(self) -> datetime:
        """The platform's clock: real time, or a manual one advanced by each change."""
        if self._clock_real:
            return datetime.now(UTC).replace(microsecond=0)
        return self._clock

    def advance(self, seconds: float = 1.0) -> datetime:
        with self.lock:
            if self._clock_real:
                return self.now()
            self._clock += timedelta(seconds=seconds)
            return self._clock

    def _next_id(self, prefix: str) -> str:
        self._counter += 1
        digest = hashlib.sha1(f"{prefix}{self._counter}".encode()).hexdigest()[:12]
        return f"{prefix}{self._counter:09d}_{digest}"  # text order = creation order

    # --- changes ------------------------------------------------------------------
    def add_page(self, page_id: str, name: str, token: str | None = None) -> SimPage:
        with self.lock:
            page = SimPage(page_id, name, token or f"token-{page_id}-{self.rng.getrandbits(48):x}")
            self.pages[page_id] = page
            return page

    def add_thread(
        self,
        page_id: str,
        participant_name: str | None,
        participant_id: str | None = None,
        at: datetime | None = None,
    ) -> SimThread:
        with self.lock:
            page = self.pages[page_id]
            thread = SimThread(
                id=self._next_id("t_"),
                page_id=page_id,
                page_name=page.name,
                participant_id=participant_id or str(10**15 + self.rng.getrandbits(40)),
                participant_name=participant_name,
                updated_time=(at or self.advance()).replace(microsecond=0),
            )
            page.threads[thread.id] = thread
            page.version += 1
            self.threads[thread.id] = thread
            return thread

    def add_message(
        self,
        thread: SimThread,
        text: str | None,
        *,
        from_page: bool = False,
        at: datetime | None = None,
        attachment: str | None = None,
        sticker: bool = False,
        share: str | None = None,
    ) -> SimMessage:
        with self.lock:
            at = (at or self.advance()).replace(microsecond=0)
            page = self.pages[thread.page_id]
            user = (thread.participant_id, thread.participant_name)
            me = (page.page_id, page.name)
            sender, receiver = (me, user) if from_page else (user, me)
            message = SimMessage(
                id=self._next_id("m_"),
                created_time=at,
                from_id=sender[0],
                from_name=sender[1],
                to_id=receiver[0],
                to_name=receiver[1],
                text=text,
                attachment={"kind": attachment} if attachment else None,
                sticker="https://example.invalid/sticker.png" if sticker else None,
                share=share,
            )
            thread.messages.append(message)
            thread.version += 1
            page.version += 1
            thread.updated_time = max(thread.updated_time, at)
            if not from_page:
                thread.unread_count += 1
            return message

    def edit_message(self, message_id: str, text: str) -> None:
        with self.lock:
            for thread in self.threads.values():
                for message in thread.messages:
                    if message.id == message_id:
                        message.text = text
                        message.rendered = None
                        thread.updated_time = max(thread.updated_time, self.advance())
                        self.pages[thread.page_id].version += 1
                        return
            raise KeyError(message_id)

    def delete_message(self, message_id: str) -> None:
        """Gone from the thread; the thread's updated_time does not move."""
        with self.lock:
            for thread in self.threads.values():
                for message in thread.messages:
                    if message.id == message_id:
                        message.deleted = True
                        thread.version += 1
                        return
            raise KeyError(message_id)

    def delete_thread(self, thread: SimThread) -> None:
        with self.lock:
            thread.deleted = True
            self.pages[thread.page_id].version += 1

    def touch(self, thread: SimThread, **changes: Any) -> None:
        """Change thread-level fields (name, unread) and move its updated_time."""
        with self.lock:
            for key, value in changes.items():
                setattr(thread, key, value)
            thread.updated_time = max(thread.updated_time, self.advance())
            self.pages[thread.page_id].version += 1

    def fail_next(self, *answers: Scripted) -> None:
        with self.lock:
            self.script.extend(answers)

    def throttle_next(
        self,
        kind: str = "app",
        *,
        times: int = 1,
        regain_minutes: int = 0,
        status: int = 400,
        match: str = "",
    ) -> None:
        """The next `times` matching calls answer a throttling error of that kind."""
        code = THROTTLE_CODES[kind]
        body = GraphError(status, code, _THROTTLE_MESSAGES[code], transient=True).body()
        headers = self._usage_headers(next(iter(self.pages), "0"), 100, regain_minutes)
        self.fail_next(*[Scripted(status, body, headers, match) for _ in range(times)])

    def counts(self) -> dict[str, int]:
        with self.lock:
            kinds: dict[str, int] = {}
            for request in self.requests:
                kinds[request["kind"]] = kinds.get(request["kind"], 0) + 1
            return kinds

    # --- answers ------------------------------------------------------------------
    def _usage_percent(self) -> int:
        if self.call_budget is None:
            return min(99, len(self._calls_in_window) // 50)
        return int(100 * len(self._calls_in_window) / self.call_budget)

    def _usage_headers(self, page_id: str, percent: int, regain: int) -> dict[str, str]:
        if self.usage is not None:
            app = self.usage.get("app", percent)
            page = self.usage.get("page", percent)
            buc = self.usage.get("buc", percent)
            regain = self.usage.get("regain_minutes", regain)
        else:
            app = page = buc = percent
        usage = lambda p: {"call_count": p, "total_cputime": max(0, p - 5), "total_time": p}  # noqa: E731
        buc_entry = {"type": "pages", **usage(buc), "estimated_time_to_regain_access": regain}
        return {
            "X-App-Usage": orjson.dumps(usage(app)).decode(),
            "X-Page-Usage": orjson.dumps(usage(page)).decode(),
            "X-Business-Use-Case-Usage": orjson.dumps({page_id: [buc_entry]}).decode(),
        }

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        """One request: (status, body, headers). Scripted answers come first."""
        arrived = time.monotonic()
        parts = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = [p for p in parts.path.split("/") if p]
        if path and re.fullmatch(r"v\d+\.\d+", path[0]):
            path = path[1:]
        token = query.get("access_token") or _bearer(headers.get("authorization", ""))
        with self.lock:
            now = time.monotonic()
            self._calls_in_window.append(now)
            while self._calls_in_window and self._calls_in_window[0] < now - self.budget_window:
                self._calls_in_window.popleft()
            kind = (
                "list"
                if path[1:2] == ["conversations"]
                else ("messages" if path[1:2] == ["messages"] else "node")
            )
            self.requests.append(
                {"path": parts.path, "query": query, "kind": kind, "token": token, "at": arrived}
            )
            scripted = None
            for index, item in enumerate(self.script):
                if not item.match or item.match in raw_path:
                    scripted = self.script.pop(index)
                    break
            page_id = path[0] if path else "0"
            percent = self._usage_percent()
            try:
                if scripted is not None:
                    body = scripted.body
                    data = body if isinstance(body, bytes) else orjson.dumps(body)
                    answer = (
                        scripted.status,
                        data,
                        {**self._usage_headers(page_id, percent, 0), **scripted.headers},
                    )
                elif self.call_budget is not None and percent > 100:
                    raise GraphError(400, 32, _THROTTLE_MESSAGES[32], transient=True)
                else:
                    payload = self._route(path, query, token, raw_path)
                    try:
                        data = orjson.dumps(payload)
                    except TypeError:
                        # orjson refuses a lone surrogate: json escapes it, as the
                        # platform may send it (rendered again, without fragments).
                        self._plain = True
                        try:
                            data = json.dumps(self._route(path, query, token, raw_path)).encode()
                        finally:
                            self._plain = False
                    answer = (200, data, self._usage_headers(page_id, percent, 0))
            except GraphError as error:
                regain = self.regain_minutes if error.code in _THROTTLE_MESSAGES else 0
                answer = (
                    error.status,
                    orjson.dumps(error.body()),
                    self._usage_headers(page_id, percent, regain),
                )
            hook = self.after_list_page if kind == "list" and answer[0] == 200 else None
            if hook is not None:
                served = self._list_pages_served.get(page_id, 0) + 1
                self._list_pages_served[page_id] = served
        if hook is not None:
            hook(page_id, served)
        wait = self.latency - (time.monotonic() - arrived)
        if wait > 0:
            time.sleep(wait)
        return answer

    def _page_for_token(self, page_id: str, token: str | None) -> SimPage:
        page = self.pages.get(page_id)
        if page is None:
            raise GraphError(
                400,
                100,
                f"Unsupported get request. Object with ID '{page_id}' "
                "does not exist, cannot be loaded due to missing permissions, or "
                "does not support this operation.",
                subcode=33,
                kind="GraphMethodException",
            )
        if not token or token != page.token:
            raise GraphError(
                400,
                190,
                "Error validating access token: Session has expired or the token is invalid.",
                subcode=463,
            )
        return page

    def _route(
        self, path: list[str], query: dict[str, str], token: str | None, raw_path: str
    ) -> dict[str, Any]:
        if not path:
            raise GraphError(400, 100, "Unsupported get request.")
        node = path[0]
        edge = path[1] if len(path) > 1 else None
        if node in self.pages:
            page = self._page_for_token(node, token)
            if edge != "conversations":
                return {"id": page.page_id, "name": page.name}
            if query.get("platform", "messenger") != "messenger":
                raise GraphError(400, 100, "Invalid platform")
            fields = parse_fields(query.get("fields", DEFAULT_THREAD_FIELDS))
            threads = page.listing()
            limit = _limit(query.get("limit"), 25)
            return self._paged(
                threads,
                SimThread.sort_key,
                query,
                limit,
                raw_path,
                lambda t: t.to_json(fields, self._nested_messages),
            )
        thread = self.threads.get(node)
        if thread is None or thread.deleted:
            raise GraphError(
                400,
                100,
                f"Unsupported get request. Object with ID '{node}' does "
                "not exist, cannot be loaded due to missing permissions, or does "
                "not support this operation.",
                subcode=33,
                kind="GraphMethodException",
            )
        self._page_for_token(thread.page_id, token)
        if edge is None:
            fields = parse_fields(query.get("fields", DEFAULT_THREAD_FIELDS))
            return thread.to_json(fields, self._nested_messages)
        if edge != "messages":
            raise GraphError(400, 100, f"Unknown edge {edge}")
        fields = parse_fields(query.get("fields", DEFAULT_MESSAGE_FIELDS))
        messages = _newest_first(thread)
        limit = _limit(query.get("limit"), 25)
        return self._paged(
            messages, _message_key, query, limit, raw_path, lambda m: m.render(fields, self._plain)
        )

    def _nested_messages(self, thread: SimThread, spec: dict[str, Any]) -> dict[str, Any]:
        fields = spec.get("__fields__") or parse_fields(DEFAULT_MESSAGE_FIELDS)
        limit = _limit(spec.get("__limit__"), 25)

        def path() -> str:
            query = urlencode({"fields": ",".join(fields), "limit": limit})
            return f"/{GRAPH_VERSION}/{thread.id}/messages?{query}"

        return self._paged(
            _newest_first(thread),
            _message_key,
            {},
            limit,
            path,
            lambda m: m.render(fields, self._plain),
        )

    def _paged(
        self,
        items: list[Any],
        key: Callable[[Any], tuple[str, str]],
        query: dict[str, str],
        limit: int,
        raw_path: str | Callable[[], str],
        render: Callable[[Any], Any],
    ) -> dict[str, Any]:
        start = 0
        if query.get("after"):
            after = _decode_cursor(query["after"])
            # Items are in descending key order: the first one below the cursor's key.
            low, high = 0, len(items)
            while low < high:
                middle = (low + high) // 2
                if key(items[middle]) < after:
                    high = middle
                else:
                    low = middle + 1
            start = low
        size = limit
        if self.short_pages and limit > 2 and start + limit < len(items):
            size = limit - 1 - (start % 2)  # shorter than asked, and more follow
        chunk = items[start : start + size]
        paging: dict[str, Any] = {}
        if chunk and callable(raw_path) and (start + len(chunk) < len(items) or start > 0):
            raw_path = raw_path()
        if chunk:
            paging["cursors"] = {"before": _cursor(key(chunk[0])), "after": _cursor(key(chunk[-1]))}
            if start + len(chunk) < len(items):
                paging["next"] = _with_query(self.url, raw_path, after=paging["cursors"]["after"])
            if start > 0:
                paging["previous"] = _with_query(
                    self.url, raw_path, before=paging["cursors"]["before"]
                )
        return {"data": [render(item) for item in chunk], "paging": paging}


def _newest_first(thread: SimThread) -> list[SimMessage]:
    """Sorted once per change of the thread's messages (a long thread is paged often)."""
    if thread.cache is None or thread.cache[0] != thread.version:
        ordered = sorted(thread.live_messages(), key=_message_key, reverse=True)
        thread.cache = (thread.version, ordered)
    return thread.cache[1]


def _message_key(message: SimMessage) -> tuple[datetime, str]:
    return (message.created_time, message.id)


def _limit(value: Any, default: int) -> int:
    try:
        return max(1, min(100, int(value)))
    except (TypeError, ValueError):
        return default


def _bearer(value: str) -> str | None:
    for prefix in ("Bearer ", "OAuth "):
        if value.startswith(prefix):
            return value[len(prefix) :].strip()
    return None


def _cursor(key: tuple[datetime, str]) -> str:
    data = orjson.dumps([key[0].isoformat(), key[1]])
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[datetime, str]:
    try:
        padded = value + "=" * (-len(value) % 4)
        first, second = orjson.loads(base64.urlsafe_b64decode(padded))
        return (datetime.fromisoformat(first), str(second))
    except Exception as error:  # noqa: BLE001 - any bad cursor is the caller's error
        raise GraphError(400, 100, "Invalid cursor") from error


def _with_query(base: str, raw_path: str, **extra: str) -> str:
    parts = urlsplit(raw_path)
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    query.pop("after", None)
    query.pop("before", None)
    query.update(extra)
    root = urlsplit(base)
    return f"{root.scheme}://{root.netloc}{parts.path}?{urlencode(query)}"


@functools.lru_cache(maxsize=256)
def parse_fields(spec: str) -> dict[str, Any]:
    """`id,messages.limit(5){id,message}` -> {"id": {}, "messages": {"__limit__": "5",
    "__fields__": {...}}}: the Graph API's field expansion, as far as the sim needs it."""
    fields: dict[str, Any] = {}
    index = 0
    while index < len(spec):
        match = re.compile(r"\s*([a-z_]+)((?:\.[a-z_]+\([^)]*\))*)").match(spec, index)
        if not match or not match.group(1):
            raise GraphError(400, 100, f"Syntax error in fields near {spec[index : index + 20]!r}")
        name, modifiers = match.group(1), match.group(2)
        entry: dict[str, Any] = {}
        for modifier, value in re.findall(r"\.([a-z_]+)\(([^)]*)\)", modifiers):
            entry[f"__{modifier}__"] = value
        index = match.end()
        if index < len(spec) and spec[index] == "{":
            depth, end = 0, index
            for end in range(index, len(spec)):
                depth += {"{": 1, "}": -1}.get(spec[end], 0)
                if depth == 0:
                    break
            entry["__fields__"] = parse_fields(spec[index + 1 : end])
            index = end + 1
        fields[name] = entry
        while index < len(spec) and spec[index] in ", ":
            index += 1
    return fields


# --- HTTP ---------------------------------------------------------------------------


def _handler(sim: GraphSim) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the platform

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in two writes: without this, Nagle's algorithm
            # and the client's delayed ACK add 40 ms to every answer.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._send(*sim.handle("GET", self.path, headers))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            payload = orjson.loads(self.rfile.read(length) or b"{}")
            try:
                result = _admin(sim, self.path, payload)
            except (KeyError, ValueError) as error:
                self._send(400, orjson.dumps({"error": str(error)}), {})
                return
            self._send(200, orjson.dumps(result), {})

    return Handler


def _admin(sim: GraphSim, path: str, payload: dict[str, Any]) -> Any:
    """The simulator's own endpoints (not the platform's): change data, read counts."""
    if path == "/_sim/counts":
        return sim.counts()
    if path == "/_sim/reset_counts":
        with sim.lock:
            sim.requests.clear()
        return {}
    if path == "/_sim/touch":
        # {"page_id", "threads": n, "messages": k}: k new messages in n threads.
        page = sim.pages[payload["page_id"]]
        threads = [t for t in page.threads.values() if not t.deleted]
        chosen = sim.rng.sample(threads, min(int(payload.get("threads", 1)), len(threads)))
        for thread in chosen:
            for _ in range(int(payload.get("messages", 1))):
                sim.add_message(thread, sim.rng.choice(_TEXTS))
        return {"changed": [t.id for t in chosen]}
    raise KeyError(f"unknown endpoint {path}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def serve(sim: GraphSim, port: int = 0, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `sim` in a thread; yields the base URL with the pinned version."""
    with _Server((host, port), _handler(sim)) as httpd:
        sim.url = "http://{}:{}".format(*httpd.server_address[:2])
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield f"{sim.url}/{GRAPH_VERSION}"
        finally:
            httpd.shutdown()


# --- demo data ----------------------------------------------------------------------

_TEXTS = (
    "Hi! Is my order #4821 shipped yet?",
    "Bonjour, je n'ai pas reçu ma facture 🙏",
    "¿Tienen envío a Valencia?",
    "Danke, alles angekommen 👍",
    "注文した商品がまだ届いていません。",
    "Можно поменять размер?",
    "مرحبا، أريد إلغاء الطلب",
    "Thanks, that fixed it 🎉🎉",
    "Can I talk to a human please?",
    "Olá! Qual o prazo de entrega?",
)
_REPLIES = (
    "Thanks for reaching out! Let me check that for you.",
    "Your parcel left our warehouse this morning 📦",
    "I've forwarded this to billing; you'll hear from them today.",
    "Done! Anything else I can help with?",
)
_NAMES = ("Ana Souza", "李伟", "Jürgen Groß", "Fatima Zahra", "Ольга", None, "Sam O'Neil", "😀 Joy")

# (page_id, name, client_code, threads)
DEMO_PAGES = (
    ("104200000000001", "Acme Store", "acme", 40),
    ("104200000000002", "Globex Help", "globex", 30),
    ("104200000000003", "Initech Billing", "initech", 20),
)


def demo_token(page_id: str) -> str:
    """The demo pages' tokens: not secret (the simulator is local), never logged anyway."""
    return f"demo-page-token-{page_id}"


def fill_page(
    sim: GraphSim,
    page_id: str,
    threads: int,
    messages: int,
    start: datetime,
    spacing: timedelta = timedelta(minutes=7),
) -> None:
    """`threads` threads of `messages` messages each, updated `spacing` apart, with
    stickers, attachments, shares, nameless participants and many scripts."""
    rng = sim.rng
    at = start
    for n in range(threads):
        name = _NAMES[n % len(_NAMES)]
        thread = sim.add_thread(page_id, name, at=at)
        for k in range(messages):
            at += timedelta(seconds=rng.randint(5, 90))
            from_page = k % 2 == 1
            roll = rng.random()
            if roll < 0.03:
                sim.add_message(thread, None, from_page=from_page, at=at, sticker=True)
            elif roll < 0.06:
                sim.add_message(
                    thread,
                    None,
                    from_page=from_page,
                    at=at,
                    attachment=rng.choice(("image", "video", "audio", "file")),
                )
            elif roll < 0.07:
                sim.add_message(
                    thread, "look", from_page=from_page, at=at, share="https://example.invalid/p/1"
                )
            else:
                text = rng.choice(_REPLIES if from_page else _TEXTS)
                sim.add_message(thread, text, from_page=from_page, at=at)
        at += spacing


def demo_sim(*, latency: float = 0.0, start: datetime | None = None) -> GraphSim:
    """The deterministic demo pages (DEMO_PAGES), each with its demo token."""
    sim = GraphSim(latency=latency, start=start)
    base = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    for page_id, name, _client, threads in DEMO_PAGES:
        sim.add_page(page_id, name, demo_token(page_id))
        fill_page(sim, page_id, threads, 12, base)
    return sim


def demo_tokens_json() -> str:
    """MESSENGER_PAGE_TOKENS for the demo pages."""
    return orjson.dumps({page_id: demo_token(page_id) for page_id, *_ in DEMO_PAGES}).decode()


def register_demo_pages(conn: Any) -> int:
    """Register the demo pages in messenger_pages (idempotent); how many were new."""
    rows = conn.execute(
        query("register_demo_pages"),
        {
            "page_ids": [p[0] for p in DEMO_PAGES],
            "client_codes": [p[2] for p in DEMO_PAGES],
            "labels": [p[1] for p in DEMO_PAGES],
        },
    ).fetchall()
    return len(rows)


def live_traffic(sim: GraphSim, every: float, stop: threading.Event) -> None:
    """A new message in a random demo thread every `every` seconds (a live inbox)."""
    while not stop.wait(every):
        with sim.lock:
            threads = [t for t in sim.threads.values() if not t.deleted]
            thread = sim.rng.choice(threads)
            sim.add_message(thread, sim.rng.choice(_TEXTS))
            if sim.rng.random() < 0.5:
                sim.add_message(thread, sim.rng.choice(_REPLIES), from_page=True)


def main(argv: list[str] | None = None) -> int:
    """Run the local Graph API until interrupted (what `conversation-pipeline graph-sim`
    starts). Prints the MESSENGER_GRAPH_URL and MESSENGER_PAGE_TOKENS to use."""
    parser = argparse.ArgumentParser(prog="graph-sim", description=main.__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's options, for its own entry point and the project's CLI."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--live-every",
        type=float,
        default=0.0,
        help="seconds between new demo messages (0: no live traffic)",
    )
    parser.add_argument(
        "--bench-threads",
        type=int,
        default=0,
        help="serve one page of this many threads instead of the demo pages",
    )
    parser.add_argument("--bench-messages", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted, with the options add_arguments declares."""
    if args.bench_threads:
        sim = GraphSim(latency=args.latency_ms / 1000, start=datetime(2026, 11, 20, tzinfo=UTC))
        sim.add_page(BENCH_PAGE, "Benchmark page", demo_token(BENCH_PAGE))
        fill_page(
            sim,
            BENCH_PAGE,
            args.bench_threads,
            args.bench_messages,
            datetime(2025, 1, 1, tzinfo=UTC),
            spacing=timedelta(minutes=1),
        )
    else:
        sim = demo_sim(latency=args.latency_ms / 1000)
    stop = threading.Event()
    with serve(sim, args.port, args.host) as url:
        if args.live_every > 0:
            threading.Thread(
                target=live_traffic, args=(sim, args.live_every, stop), daemon=True
            ).start()
        print(f"MESSENGER_GRAPH_URL={url}", flush=True)
        tokens = {p: demo_token(p) for p in sim.pages}
        print(f"MESSENGER_PAGE_TOKENS={orjson.dumps(tokens).decode()}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
    return 0


BENCH_PAGE = "999000000000001"

if __name__ == "__main__":
    raise SystemExit(main())
