"""The Graph API resource: where Messenger is read from, with which page tokens.

Tokens come from MESSENGER_PAGE_TOKENS (a JSON object, page id to token) or a
mounted secret file of the same shape (MESSENGER_PAGE_TOKENS_FILE, what Docker or
Kubernetes secrets give), never from a table. Dagster gets the variable's name,
so the UI shows `MESSENGER_PAGE_TOKENS`, not the value; no message, log line or
metadata this project writes holds a token (`messenger_api.scrub`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
from pydantic import Field

from conversation_assets.messenger_api import GraphClient, Say, Sleep

DEFAULT_GRAPH_URL = "https://graph.facebook.com/v23.0"


class MessengerTokenError(ValueError):
    """The token configuration cannot be read; the message never holds a token."""


# A page access token is printable ASCII without spaces: anything else could not go in
# an Authorization header, and an HTTP library's error would then quote it.
_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class PageTokens:
    """The usable tokens, and why each unusable entry cannot be used (by page id): one
    bad entry stops its own page, never the others."""

    tokens: dict[str, str] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)

    def merged(self, other: PageTokens) -> PageTokens:
        """`other` wins, entry by entry, usable or not."""
        tokens = {k: v for k, v in self.tokens.items() if k not in other.unusable}
        unusable = {k: v for k, v in self.unusable.items() if k not in other.tokens}
        return PageTokens({**tokens, **other.tokens}, {**unusable, **other.unusable})


def parse_tokens(text: str, where: str) -> PageTokens:
    """`{"<page id>": "<token>", ...}`. Not an object at all: MessengerTokenError. No
    message names a token, only `where` and the page id."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise MessengerTokenError(
            f"{where} is not JSON: expected an object of page id to token"
        ) from None
    if not isinstance(value, dict):
        raise MessengerTokenError(f"{where} must be a JSON object of page id to token")
    tokens: dict[str, str] = {}
    unusable: dict[str, str] = {}
    for key, token in value.items():
        page_id = key.strip()
        if isinstance(token, str) and _TOKEN_SHAPE.fullmatch(token.strip()):
            tokens[page_id] = token.strip()
        else:
            shape = "not text"
            if isinstance(token, str):
                shape = "text with spaces or control characters"
            unusable[page_id] = f"page {page_id}: its token in {where} is {shape}"
    return PageTokens(tokens, unusable)


class MessengerResource(dg.ConfigurableResource):
    """Reads each registered page's Messenger inbox through the Graph API."""

    graph_url: str = Field(
        default=DEFAULT_GRAPH_URL,
        description="Graph API root with its pinned version (MESSENGER_GRAPH_URL).",
    )
    page_tokens: str | None = Field(
        default=None,
        description="JSON object of page id to page access token (MESSENGER_PAGE_TOKENS).",
    )
    page_tokens_file: str | None = Field(
        default=None,
        description="A mounted secret file holding the same JSON (MESSENGER_PAGE_TOKENS_FILE).",
    )
    app_secret: str | None = Field(
        default=None,
        description="The app secret: each call then carries appsecret_proof "
        "(MESSENGER_APP_SECRET).",
    )
    timeout_seconds: float = Field(default=30.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(default=4, ge=0, description="Retries of a transient failure.")
    backoff_seconds: float = Field(default=1.0, ge=0, description="First retry backoff.")
    usage_threshold_percent: float = Field(
        default=75.0,
        gt=0,
        le=100,
        description="Past this usage (any usage header) calls are paced.",
    )
    slowdown_max_seconds: float = Field(
        default=30.0, ge=0, description="Pause before a call at 100% usage (linear from 0)."
    )
    max_throttle_wait_seconds: float = Field(
        default=900.0,
        ge=0,
        description="Longest pause a run takes when throttled; past it the page stops, "
        "its progress kept.",
    )
    throttle_backoff_seconds: float = Field(
        default=30.0, ge=0, description="Pause after a throttling error that names no wait."
    )

    def load_tokens(self) -> PageTokens:
        """From the variable, then the file (the file wins, entry by entry)."""
        found = PageTokens()
        if self.page_tokens:
            found = found.merged(parse_tokens(self.page_tokens, "MESSENGER_PAGE_TOKENS"))
        if self.page_tokens_file:
            path = Path(self.page_tokens_file)
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as error:
                why = error.strerror if isinstance(error, OSError) else "not UTF-8"
                raise MessengerTokenError(
                    f"MESSENGER_PAGE_TOKENS_FILE {path} cannot be read: {why}"
                ) from None
            found = found.merged(parse_tokens(text, f"MESSENGER_PAGE_TOKENS_FILE {path}"))
        return found

    def tokens(self) -> dict[str, str]:
        """Page id -> token, the usable ones."""
        return self.load_tokens().tokens

    def client(
        self, page_id: str, token: str, *, say: Say | None = None, sleep: Sleep = time.sleep
    ) -> GraphClient:
        return GraphClient(
            base_url=self.graph_url,
            token=token,
            page_id=page_id,
            timeout_seconds=self.timeout_seconds,
            max_retries=self.max_retries,
            backoff_seconds=self.backoff_seconds,
            usage_threshold=self.usage_threshold_percent,
            slowdown_max_seconds=self.slowdown_max_seconds,
            max_throttle_wait=self.max_throttle_wait_seconds,
            throttle_backoff_seconds=self.throttle_backoff_seconds,
            app_secret=self.app_secret,
            say=say,
            sleep=sleep,
        )


def messenger_resource(current: Any, *, for_dagster: bool) -> MessengerResource:
    """From the settings. For Dagster, the secrets are their variables' names
    (`dg.EnvVar`, shown by name in the UI and resolved when a run starts)."""
    from conversation_assets import settings

    def secret(name: str) -> Any:
        value = getattr(current, name.lower())
        if value is None or not for_dagster:
            return value
        return settings.secret(name)

    tokens_file = current.messenger_page_tokens_file
    return MessengerResource(
        graph_url=current.messenger_graph_url or DEFAULT_GRAPH_URL,
        page_tokens=secret("MESSENGER_PAGE_TOKENS"),
        page_tokens_file=str(tokens_file) if tokens_file is not None else None,
        app_secret=secret("MESSENGER_APP_SECRET"),
        timeout_seconds=float(current.messenger_timeout_seconds),
        usage_threshold_percent=float(current.messenger_usage_threshold_percent),
        max_throttle_wait_seconds=float(current.messenger_max_throttle_wait_seconds),
    )
