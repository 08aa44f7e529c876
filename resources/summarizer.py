"""The optional LLM summarizer: Ollama or any OpenAI-compatible chat server.

The default `extractive` backend makes no request at all: `summarize` answers
None for every transcript and the caller keeps its own deterministic extractive
summary. The HTTP backends send one chat request per transcript, a few in
flight at a time, with the same timeout, retry and backoff rules as the
embedding resource (`resources.http.post_json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import dagster as dg
from pydantic import Field, PrivateAttr

from resources.http import (
    API_KEY_DESCRIPTION,
    BASE_URL_DESCRIPTION,
    DEFAULT_BASE_URL,
    SessionPool,
    json_headers,
    post_json,
    redact_url,
)

_DEFAULT_MODEL = {"ollama": "llama3.2", "openai": "gpt-4o-mini"}
ELLIPSIS = "…"


class SummarizerError(RuntimeError):
    """A summary request failed for good (bad request, retries exhausted, unusable answer)."""


def system_prompt(max_words: int) -> str:
    """The instruction sent with every transcript."""
    return (
        "You summarize a conversation between a user and an assistant. Write one neutral "
        f"paragraph of at most {max_words} words, in the language of the conversation: what "
        "the user wanted and how the conversation ended. A transcript that starts with "
        f'"{ELLIPSIS}" was cut at its start. Reply with the summary only: no preamble, '
        "title, list or quotation marks."
    )


class SummarizerResource(dg.ConfigurableResource):
    """Summarizes conversation transcripts with an LLM, or leaves them to the caller.

    `summarize(transcripts)` returns one entry per transcript, in order: None for
    every one with the `extractive` backend (the caller's extractive summary
    stands), "" for an empty transcript, else the model's stripped answer. `name`
    ("extractive" or "backend:model") is what callers record in metadata.
    """

    backend: Literal["extractive", "ollama", "openai"] = Field(
        default="extractive",
        description="extractive (no LLM, no network: the caller's own summary), ollama or "
        "openai-compatible.",
    )
    model: str | None = Field(
        default=None,
        description="Chat model; defaults to llama3.2 (ollama) or gpt-4o-mini (openai).",
    )
    base_url: str | None = Field(default=None, description=BASE_URL_DESCRIPTION)
    api_key: str | None = Field(default=None, description=API_KEY_DESCRIPTION)
    timeout_seconds: float = Field(default=120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(
        default=3, ge=0, description="Retries after the first attempt on transient failures."
    )
    backoff_seconds: float = Field(
        default=0.5, ge=0, description="First retry delay; doubles each retry, capped at 30 s."
    )
    max_words: int = Field(default=60, ge=1, description="Longest summary asked of the model.")
    max_input_chars: int = Field(
        default=12000,
        ge=1,
        description="Longer transcripts are cut to their last max_input_chars characters (the "
        "end of a chat carries its outcome), marked by a leading ellipsis.",
    )
    concurrency: int = Field(default=4, ge=1, description="Summary requests in flight at once.")

    _sessions: SessionPool | None = PrivateAttr(default=None)

    @property
    def model_name(self) -> str | None:
        """The chat model; None for the extractive backend."""
        if self.backend == "extractive":
            return None
        return self.model or _DEFAULT_MODEL[self.backend]

    @property
    def name(self) -> str:
        """What produced the summaries: "extractive" or "backend:model"."""
        if self.backend == "extractive":
            return "extractive"
        return f"{self.backend}:{self.model_name}"

    @property
    def url(self) -> str | None:
        """The chat endpoint the HTTP backend posts to; None for the extractive backend."""
        if self.backend == "extractive":
            return None
        base = (self.base_url or DEFAULT_BASE_URL[self.backend]).rstrip("/")
        return f"{base}/api/chat" if self.backend == "ollama" else f"{base}/v1/chat/completions"

    def summarize(self, transcripts: Sequence[str]) -> list[str | None]:
        """One summary per transcript, in order (see the class docstring)."""
        transcripts = list(transcripts)
        if self.backend == "extractive":
            return [None] * len(transcripts)
        results: list[str | None] = [""] * len(transcripts)
        todo = [i for i, text in enumerate(transcripts) if text and text.strip()]
        if not todo:
            return results
        if self._sessions is None:
            self._sessions = SessionPool()
        sessions, workers = self._sessions, min(self.concurrency, len(todo))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="summarizer") as pool:
            futures = [pool.submit(self._summarize_one, sessions, transcripts[i]) for i in todo]
            try:
                for i, future in zip(todo, futures, strict=True):
                    results[i] = future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # the first failure ends the call: send no more
                raise
        return results

    def close(self) -> None:
        """Close the HTTP sessions (a later call opens new ones)."""
        if self._sessions is not None:
            self._sessions.close()
            self._sessions = None

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def _payload(self, transcript: str) -> dict[str, Any]:
        if len(transcript) > self.max_input_chars:
            transcript = ELLIPSIS + transcript[-self.max_input_chars :]
        messages = [
            {"role": "system", "content": system_prompt(self.max_words)},
            {"role": "user", "content": transcript},
        ]
        if self.backend == "ollama":
            options = {"stream": False, "options": {"temperature": 0}}
        else:
            options = {"temperature": 0}
        return {"model": self.model_name, "messages": messages, **options}

    def _summarize_one(self, sessions: SessionPool, transcript: str) -> str:
        url = str(self.url)
        shown = redact_url(url)
        with sessions.session() as session:
            body = post_json(
                session,
                url,
                self._payload(transcript),
                json_headers(self.api_key if self.backend == "openai" else None),
                timeout_seconds=self.timeout_seconds,
                max_retries=self.max_retries,
                backoff_seconds=self.backoff_seconds,
                what=f"{self.backend} summary request with model {self.model_name!r}",
                error_cls=SummarizerError,
            )
        try:
            if self.backend == "ollama":
                content = body["message"]["content"]
            else:
                content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise SummarizerError(
                f"{redact_url(url)} returned an unexpected body: {str(body)[:300]}"
            ) from exc
        if not isinstance(content, str) or not content.strip():
            raise SummarizerError(f"{shown} returned an empty summary: {str(body)[:300]}")
        return content.strip()
