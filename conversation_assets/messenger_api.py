"""A Graph API client for one page: paging, usage headers, throttling, retries.

Every call reads the usage headers (`X-App-Usage`, `X-Page-Usage`,
`X-Business-Use-Case-Usage`), errors included. Past `usage_threshold` percent it
paces itself before the next call (longer the closer to 100 %); a throttling error
(codes 4, 17, 32, 613, 80001-80014, whatever the status) waits what the platform
says (`estimated_time_to_regain_access`, `Retry-After`, else a doubling backoff),
and when that is more than `max_throttle_wait` it stops with `ThrottleTooLong` so
the caller keeps its progress. Transient failures (connection errors, timeouts,
5xx, `is_transient`) are retried by tenacity with exponential backoff. Code 190 is
`TokenInvalid`. The token travels in the `Authorization` header only, never in a
URL, and no message this module makes contains it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import requests
import tenacity

from resources.http import redact_url, retry_after_seconds

THROTTLE_CODES = frozenset({4, 17, 32, 613}) | frozenset(range(80001, 80015))
TOKEN_CODES = frozenset({190, 102})
TRANSIENT_CODES = frozenset({1, 2})  # "unknown error", "service temporarily unavailable"
NOT_FOUND_CODE = 100
MAX_CONSECUTIVE_THROTTLES = 8
_SECRET_PARAMS = re.compile(r"(access_token|appsecret_proof|client_secret)=[^&\s\"'<>]+")

Sleep = Callable[[float], None]
Say = Callable[[str], None]


class GraphApiError(Exception):
    """A call failed for good; the message names the page and never holds a token."""


class TokenInvalid(GraphApiError):
    """Code 190: the page's token is invalid or expired."""


class ThrottleTooLong(GraphApiError):
    """The platform asked for a pause longer than a run waits; progress is kept."""

    def __init__(self, message: str, wait_seconds: float) -> None:
        super().__init__(message)
        self.wait_seconds = wait_seconds


class NotFound(GraphApiError):
    """Code 100 on a node: the object is gone (or never was)."""


class MalformedResponse(GraphApiError):
    """A 200 answer that is not the documented shape."""


class _Transient(Exception):
    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


class _Throttled(Exception):
    def __init__(self, problem: str, wait: float | None) -> None:
        super().__init__(problem)
        self.wait = wait


@dataclass
class Usage:
    """The highest usage figure of the three headers, and any wait they announce."""

    percent: float = 0.0
    regain_seconds: float = 0.0
    by_header: dict[str, float] = field(default_factory=dict)


def _figures(value: Any) -> list[float]:
    """Every numeric usage figure in a header's JSON (any nesting)."""
    found: list[float] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("call_count", "total_cputime", "total_time", "acc_id_util_pct"):
                if isinstance(item, int | float) and not isinstance(item, bool):
                    found.append(float(item))
            elif isinstance(item, dict | list):
                found.extend(_figures(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(_figures(item))
    return found


def _regain_minutes(value: Any) -> float:
    if isinstance(value, dict):
        own = value.get("estimated_time_to_regain_access")
        minutes = float(own) if isinstance(own, int | float) and not isinstance(own, bool) else 0
        return max([minutes, *(_regain_minutes(v) for v in value.values())])
    if isinstance(value, list):
        return max([0.0, *(_regain_minutes(v) for v in value)])
    return 0.0


def parse_usage(headers: Any) -> Usage:
    """Usage from a response's headers; a header that is not JSON is ignored."""
    usage = Usage()
    for name in ("X-App-Usage", "X-Page-Usage", "X-Ad-Account-Usage", "X-Business-Use-Case-Usage"):
        raw = headers.get(name)
        if not raw:
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        figures = _figures(value)
        if figures:
            usage.by_header[name] = max(figures)
            usage.percent = max(usage.percent, max(figures))
        usage.regain_seconds = max(usage.regain_seconds, _regain_minutes(value) * 60)
    return usage


@dataclass
class ApiStats:
    """What the calls of one page cost, for the run's log and metadata."""

    calls: int = 0
    list_calls: int = 0
    message_calls: int = 0
    node_calls: int = 0
    retries: int = 0
    throttle_waits: int = 0
    throttle_seconds: float = 0.0
    slowdown_waits: int = 0
    slowdown_seconds: float = 0.0
    api_seconds: float = 0.0
    usage_percent: float = 0.0


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` without credentials: token-like query parameters and any given secret."""
    text = _SECRET_PARAMS.sub(r"\1=***", text)
    for secret in secrets:
        if secret:
            # Also as a repr shows it (escaped), the way a library's error may quote it.
            for shown in {secret, repr(secret)[1:-1]}:
                text = text.replace(shown, "***")
    return text


def _decode(content: bytes) -> Any:
    """JSON by orjson, or by json where orjson refuses what the platform may send (an
    escaped lone surrogate); None when it is not JSON at all."""
    if not content:
        return None
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        try:
            return json.loads(content)
        except ValueError:
            return None


def _error(body: Any) -> dict[str, Any]:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    return {}


def _code(error: dict[str, Any]) -> int | None:
    code = error.get("code")
    return code if isinstance(code, int) and not isinstance(code, bool) else None


class GraphClient:
    """Calls of one page's token. Not shared between threads."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        page_id: str,
        timeout_seconds: float = 30.0,
        max_retries: int = 4,
        backoff_seconds: float = 1.0,
        usage_threshold: float = 75.0,
        slowdown_max_seconds: float = 30.0,
        max_throttle_wait: float = 900.0,
        throttle_backoff_seconds: float = 30.0,
        app_secret: str | None = None,
        session: requests.Session | None = None,
        sleep: Sleep = time.sleep,
        say: Say | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.page_id = page_id
        self.timeout_seconds = timeout_seconds
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.usage_threshold = usage_threshold
        self.slowdown_max_seconds = slowdown_max_seconds
        self.max_throttle_wait = max_throttle_wait
        self.throttle_backoff_seconds = throttle_backoff_seconds
        self.session = session or requests.Session()
        self.sleep = sleep
        self.say = say or (lambda _message: None)
        self.stats = ApiStats()
        self.usage = Usage()
        self._token = token
        self._proof = (
            hmac.new(app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()
            if app_secret
            else None
        )
        # What `scrub` takes out of every message about this client's calls.
        self.secrets = tuple(s for s in (token, app_secret, self._proof) if s)
        self._calling = threading.RLock()

    # --- one call -----------------------------------------------------------------
    def _shown(self, text: str) -> str:
        return scrub(redact_url(text) if "://" in text else text, self.secrets)

    def _pace(self) -> None:
        """Slow down before the limit: the closer usage is to 100 %, the longer."""
        wait = 0.0
        usage = self.usage
        if usage.percent >= self.usage_threshold:
            span = max(100.0 - self.usage_threshold, 1.0)
            share = min((usage.percent - self.usage_threshold) / span, 1.0)
            wait = self.slowdown_max_seconds * max(share, 0.05)
        if usage.regain_seconds > 0:
            if usage.regain_seconds > self.max_throttle_wait:
                raise ThrottleTooLong(
                    f"page {self.page_id}: the platform announces "
                    f"{usage.regain_seconds:.0f} s before access is regained, more than the "
                    f"{self.max_throttle_wait:.0f} s a run waits; progress is kept",
                    usage.regain_seconds,
                )
            wait = max(wait, usage.regain_seconds)
        if wait > 0:
            self.stats.slowdown_waits += 1
            self.stats.slowdown_seconds += wait
            self.say(
                f"page {self.page_id}: usage {usage.percent:.0f}% "
                f"(threshold {self.usage_threshold:.0f}%): pausing {wait:.1f} s"
            )
            self.sleep(wait)
            # The pause was taken for this reading; the next response tells again.
            self.usage = Usage(by_header=usage.by_header)

    def _attempt(self, url: str, params: dict[str, Any], raw: bool = False) -> Any:
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if self._proof:
            params = {**params, "appsecret_proof": self._proof}
        started = time.perf_counter()
        try:
            response = self.session.get(
                url, params=params, headers=headers, timeout=self.timeout_seconds
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(self._shown(f"{type(exc).__name__}: {exc}")) from None
        except (requests.RequestException, ValueError) as exc:
            # A request that cannot be made (a header value, a URL): no retry helps.
            raise GraphApiError(
                f"page {self.page_id}: " + self._shown(f"{type(exc).__name__}: {exc}")
            ) from None
        finally:
            self.stats.api_seconds += time.perf_counter() - started
            self.stats.calls += 1
        self.usage = parse_usage(response.headers)
        self.stats.usage_percent = self.usage.percent
        if raw and response.status_code == 200:
            after = tail_cursor(response.content)
            if after is not _UNKNOWN:
                return RawPage(response.content, after)  # type: ignore[arg-type]
        body = _decode(response.content)
        error = _error(body)
        code = _code(error)
        if response.status_code < 400 and not error and isinstance(body, dict):
            # The common case: nothing to look into.
            return RawPage(response.content, next_cursor(body), body) if raw else body
        message = self._shown(str(error.get("message") or response.text[:300]))
        if code in THROTTLE_CODES or (response.status_code == 429 and not error):
            wait = max(self.usage.regain_seconds, 0.0) or retry_after_seconds(
                response.headers.get("Retry-After")
            )
            raise _Throttled(f"HTTP {response.status_code} code {code}: {message}", wait or None)
        if response.status_code >= 500 or response.status_code == 408:
            raise _Transient(f"HTTP {response.status_code}: {message}")
        if error:
            trace = error.get("fbtrace_id")
            detail = f"code {code}" + (
                f" subcode {error['error_subcode']}" if error.get("error_subcode") else ""
            )
            text = f"page {self.page_id}: Graph API error {detail}: {message}"
            text += f" (fbtrace_id {trace})" if trace else ""
            if code in TOKEN_CODES:
                raise TokenInvalid(
                    f"page {self.page_id}: its access token is invalid or expired "
                    f"(Graph API code {code}): {message}. Give the page a new token "
                    "(MESSENGER_PAGE_TOKENS or MESSENGER_PAGE_TOKENS_FILE)."
                )
            if error.get("is_transient") is True or code in TRANSIENT_CODES:
                raise _Transient(text)
            if code == NOT_FOUND_CODE and error.get("error_subcode") == 33:
                raise NotFound(text)
            raise GraphApiError(text)
        if response.status_code >= 400:
            raise GraphApiError(
                f"page {self.page_id}: HTTP {response.status_code}: "
                f"{self._shown(response.text[:300])}"
            )
        if not isinstance(body, dict):
            raise _Transient(f"HTTP {response.status_code}: the body is not a JSON object")
        return body

    def get(self, kind: str, path: str, params: dict[str, Any], raw: bool = False) -> Any:
        """GET `path` under the base URL: retried when transient, paced, throttle-aware.

        `raw`: a `RawPage` (the body undecoded, and the cursor to go on with). One call
        at a time per client, whichever thread makes it: the pacing sees every call."""
        with self._calling:
            return self._get(kind, path, params, raw)

    def _get(self, kind: str, path: str, params: dict[str, Any], raw: bool) -> Any:
        url = f"{self.base_url}/{path.lstrip('/')}"
        consecutive = 0
        while True:
            self._pace()
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(_Transient),
                stop=tenacity.stop_after_attempt(self.max_retries + 1),
                wait=tenacity.wait_exponential(multiplier=self.backoff_seconds, max=60),
                sleep=self.sleep,
                before_sleep=self._count_retry,
                reraise=True,
            )
            try:
                body = retrying(self._attempt, url, params, raw)
            except _Transient as last:
                raise GraphApiError(
                    f"page {self.page_id}: GET {self._shown(url)} failed after "
                    f"{self.max_retries + 1} attempts; last: {last}"
                ) from None
            except _Throttled as throttled:
                consecutive += 1
                self._wait_out(throttled, consecutive)
                continue
            setattr(self.stats, f"{kind}_calls", getattr(self.stats, f"{kind}_calls") + 1)
            return body

    def _count_retry(self, state: tenacity.RetryCallState) -> None:
        self.stats.retries += 1
        problem = state.outcome.exception() if state.outcome else None
        self.say(f"page {self.page_id}: transient failure, retrying: {problem}")

    def _wait_out(self, throttled: _Throttled, consecutive: int) -> None:
        backoff = self.throttle_backoff_seconds * 2 ** (consecutive - 1)
        wait = throttled.wait if throttled.wait is not None else backoff
        if wait > self.max_throttle_wait or consecutive > MAX_CONSECUTIVE_THROTTLES:
            raise ThrottleTooLong(
                f"page {self.page_id}: throttled by the platform ({throttled}); it asks for "
                f"{wait:.0f} s, more than the {self.max_throttle_wait:.0f} s a run waits"
                + (f" (throttled {consecutive} times in a row)" if consecutive > 1 else "")
                + "; the run stops here with its progress kept",
                wait,
            )
        self.stats.throttle_waits += 1
        self.stats.throttle_seconds += wait
        self.say(f"page {self.page_id}: throttled ({throttled}); waiting {wait:.1f} s")
        self.sleep(wait)
        self.usage = Usage()

    # --- paging -------------------------------------------------------------------
    def _paged(self, kind: str, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Each page's body, following the `after` cursor until `next` is absent."""
        params = dict(params)
        while True:
            body = self.get(kind, path, params)
            yield body
            after = next_cursor(body)
            if after is None:
                return
            params["after"] = after

    def list_threads(self, fields: str, limit: int) -> Iterator[dict[str, Any]]:
        """The page's threads, most recently updated first, one response at a time."""
        params = {"platform": "messenger", "fields": fields, "limit": limit}
        return self._paged("list", f"{self.page_id}/conversations", params)

    def thread_messages(
        self, thread_id: str, fields: str, limit: int, after: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """A thread's messages after `after` (from the newest when None), newest first."""
        params: dict[str, Any] = {"fields": fields, "limit": limit}
        if after:
            params["after"] = after
        return self._paged("message", f"{_safe_id(thread_id)}/messages", params)

    def thread(self, thread_id: str, fields: str) -> dict[str, Any] | None:
        """One thread's fields, or None when it is gone."""
        try:
            return self.get("node", _safe_id(thread_id), {"fields": fields})
        except NotFound:
            return None


# An id that can be a URL path segment as it is: no encoding, no dot segment.
_NODE_ID = re.compile(r"(?!\.\.?$)[0-9A-Za-z_.:-]{1,200}")


def is_node_id(value: str) -> bool:
    """Whether the API can be asked for this node (a thread) by id."""
    return _NODE_ID.fullmatch(value) is not None


def _safe_id(node: str) -> str:
    if not is_node_id(node):
        raise MalformedResponse(f"a node id with unexpected characters: {node[:80]!r}")
    return node


_UNKNOWN = object()


@dataclass
class RawPage:
    """A 200 answer, decoded only when its items are wanted (`body`)."""

    content: bytes
    after: str | None  # the cursor to go on with; None: `next` is absent (the end)
    decoded: Any = None

    def body(self) -> dict[str, Any]:
        if self.decoded is None:
            self.decoded = _decode(self.content)
        if not isinstance(self.decoded, dict):
            raise MalformedResponse("a list response that is not a JSON object")
        return self.decoded


def tail_cursor(content: bytes) -> Any:
    """The top-level cursor without decoding the whole body, or _UNKNOWN.

    The platform writes `paging` after `data`. The last `"paging":` whose value, up to
    the body's closing brace, parses as JSON is the top-level member: a nested one is
    followed by the rest of `data`. Anything else: _UNKNOWN (decode it all)."""
    start = content.rfind(b'"paging":')
    end = content.rstrip().rfind(b"}")
    if start < 0 or end <= start:
        return _UNKNOWN
    try:
        tail = orjson.loads(b"{" + content[start:end] + b"}")
    except orjson.JSONDecodeError:
        return _UNKNOWN
    if (
        not isinstance(tail, dict)
        or set(tail) != {"paging"}
        or not isinstance(tail["paging"], dict)
    ):
        return _UNKNOWN
    return next_cursor(tail)


def next_cursor(body: Any) -> str | None:
    """The cursor to continue with, or None when `next` is absent (the end).

    Only `next` ends a listing: a short page is not the end. A `next` without an
    `after` cursor is malformed."""
    paging = body.get("paging") if isinstance(body, dict) else None
    if not isinstance(paging, dict) or not paging.get("next"):
        return None
    cursors = paging.get("cursors")
    after = cursors.get("after") if isinstance(cursors, dict) else None
    if isinstance(after, str) and after:
        return after
    # Some answers give only `next`: take its cursor (never its host or token).
    query = urlsplit(str(paging["next"])).query
    for part in query.split("&"):
        if part.startswith("after="):
            return unquote(part[len("after=") :])
    raise MalformedResponse("paging has `next` but no `after` cursor")
