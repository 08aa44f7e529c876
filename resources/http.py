"""JSON over HTTP for the model backends: one retrying POST and a pool of sessions.

`post_json` times out per request and retries with exponential backoff on
transient failures only (connection errors, timeouts, HTTP 408/429/5xx); any
other 4xx fails at once. Every failure is raised as the caller's error class,
so each resource reports in its own terms.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

# Server roots (no /api or /v1 suffix) of the HTTP backends when `base_url` is unset.
DEFAULT_BASE_URL = {"ollama": "http://127.0.0.1:11434", "openai": "https://api.openai.com"}
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
MAX_BACKOFF_SECONDS = 30.0

# Field descriptions shared by the resources that post through this module.
BASE_URL_DESCRIPTION = (
    "Server root for HTTP backends (no /api or /v1 suffix); defaults to "
    "http://127.0.0.1:11434 for ollama and https://api.openai.com for openai."
)
API_KEY_DESCRIPTION = "Bearer token for the openai backend, sent only when set."


def json_headers(api_key: str | None = None) -> dict[str, str]:
    """JSON content type, plus `Authorization: Bearer` only when a key is given."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


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
) -> Any:
    """POST `payload` as JSON and return the decoded JSON answer.

    Up to `max_retries` retries follow the first attempt, after `backoff_seconds`
    doubling each time (capped at 30 s). `what` names the request in messages
    ("ollama embedding request"); `model`, when given, is named on an HTTP error.
    """
    attempts = max_retries + 1
    last_problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))
        try:
            response = session.post(url, json=payload, headers=headers, timeout=timeout_seconds)
        except (requests.ConnectionError, requests.Timeout) as exc:
            last_problem = f"{type(exc).__name__}: {exc}"
            continue
        if response.status_code in RETRYABLE_STATUS:
            last_problem = f"HTTP {response.status_code}: {response.text[:300]}"
            continue
        if response.status_code >= 400:
            model_note = f" (model {model!r})" if model is not None else ""
            raise error_cls(
                f"{what} to {url} failed with HTTP {response.status_code}{model_note}: "
                f"{response.text[:500]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise error_cls(f"{url} returned an unexpected body: {response.text[:300]}") from exc
    raise error_cls(
        f"{what} to {url} failed after {attempts} attempts "
        f"(timeout {timeout_seconds:g} s each); last: {last_problem}"
    )


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
