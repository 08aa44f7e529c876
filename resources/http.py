"""JSON over HTTP for the model backends: one retrying POST and a pool of sessions.

`post_json` times out per request and retries through tenacity on transient
failures only (connection errors, timeouts, HTTP 408/429/5xx), waiting what the
server asks in `Retry-After` (bounded) or else an exponential backoff; any other
4xx fails at once. Every failure is raised as the caller's error class, so each
resource reports in its own terms, and every URL it shows has its credentials
removed (`redact_url`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import tenacity

# Server roots (no /api or /v1 suffix) of the HTTP backends when `base_url` is unset.
DEFAULT_BASE_URL = {"ollama": "http://127.0.0.1:11434", "openai": "https://api.openai.com"}
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
# The server read the request and refused what it holds (too long, malformed): the
# same request fails again, whatever the server's state.
REFUSED_STATUS = frozenset({400, 413, 422})
MAX_BACKOFF_SECONDS = 30.0
# A server asking for a longer pause gets this much; the retries run out after it.
MAX_RETRY_AFTER_SECONDS = 120.0

# Field descriptions shared by the resources that post through this module.
BASE_URL_DESCRIPTION = (
    "Server root for HTTP backends (no /api or /v1 suffix); defaults to "
    "http://127.0.0.1:11434 for ollama and https://api.openai.com for openai."
)
API_KEY_DESCRIPTION = "Bearer token for the openai backend, sent only when set."


def redact_url(url: str) -> str:
    """The URL with any ``user:password@`` replaced by ``***@``, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def json_headers(api_key: str | None = None) -> dict[str, str]:
    """JSON content type, plus `Authorization: Bearer` only when a key is given."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class _Transient(Exception):
    """One attempt failed in a way worth retrying; `retry_after` is the server's ask."""

    def __init__(self, problem: str, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds (delta or HTTP date), bounded; None when absent or bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _wait(backoff_seconds: float) -> Callable[[tenacity.RetryCallState], float]:
    """The server's Retry-After when it gave one, else backoff doubling up to 30 s."""
    exponential = tenacity.wait_exponential(multiplier=backoff_seconds, max=MAX_BACKOFF_SECONDS)

    def wait(state: tenacity.RetryCallState) -> float:
        problem = state.outcome.exception() if state.outcome else None
        if isinstance(problem, _Transient) and problem.retry_after is not None:
            return problem.retry_after
        return exponential(state)

    return wait


def post_json(
    session: requests.Session,
    url: str,
    payload: Any,
    headers: dict[str, str],
    *,
    timeout_seconds: float,
    max_retries: int,
    backoff_seconds: float,
    what: str,
    error_cls: type[Exception],
    model: str | None = None,
    refused_cls: type[Exception] | None = None,
) -> Any:
    """POST `payload` as JSON and return the decoded JSON answer.

    Up to `max_retries` retries follow the first attempt. `what` names the request
    in messages ("ollama embedding request"); `model`, when given, is named on an
    HTTP error. `refused_cls`, when given, is raised for a request the server refused
    for what it holds (`REFUSED_STATUS`), `error_cls` for any other failure.
    """
    shown = redact_url(url)

    def attempt() -> Any:
        try:
            response = session.post(url, json=payload, headers=headers, timeout=timeout_seconds)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code in RETRYABLE_STATUS:
            raise _Transient(
                f"HTTP {response.status_code}: {response.text[:300]}",
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        if response.status_code >= 400:
            model_note = f" (model {model!r})" if model is not None else ""
            refused = refused_cls is not None and response.status_code in REFUSED_STATUS
            raise (refused_cls if refused else error_cls)(  # type: ignore[misc]
                f"{what} to {shown} failed with HTTP {response.status_code}{model_note}: "
                f"{response.text[:500]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise error_cls(f"{shown} returned an unexpected body: {response.text[:300]}") from exc

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Transient),
        stop=tenacity.stop_after_attempt(max_retries + 1),
        wait=_wait(backoff_seconds),
        reraise=True,
    )
    try:
        return retrying(attempt)
    except _Transient as last:
        raise error_cls(
            f"{what} to {shown} failed after {max_retries + 1} attempts "
            f"(timeout {timeout_seconds:g} s each); last: {last}"
        ) from None


class SessionPool:
    """`requests.Session`s for worker threads: one session is used by one thread at a time.

    A session is not guaranteed thread-safe, so each call borrows its own; sessions
    are kept (with their keep-alive connections) for later calls until `close()`.
    """

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue[requests.Session] = queue.SimpleQueue()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    @contextmanager
    def session(self) -> Iterator[requests.Session]:
        try:
            session = self._idle.get_nowait()
        except queue.Empty:
            session = requests.Session()
            with self._lock:
                self._all.append(session)
        try:
            yield session
        finally:
            self._idle.put(session)

    def close(self) -> None:
        with self._lock:
            sessions, self._all = self._all, []
            self._idle = queue.SimpleQueue()
        for session in sessions:
            session.close()
