"""The LLM summarizer against a real local chat server (Ollama and OpenAI protocols)."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest

from resources.summarizer import SummarizerError, SummarizerResource, system_prompt
from tests.fakes import CHAT_PATHS, ModelServer, closed_port_url, fake_summary


def _summarizer(server: ModelServer, backend: str, **overrides: Any) -> SummarizerResource:
    config: dict[str, Any] = {
        "backend": backend,
        "base_url": server.url,
        "timeout_seconds": 2.0,
        "max_retries": 2,
        "backoff_seconds": 0.01,
    }
    return SummarizerResource(**(config | overrides))


TRANSCRIPTS = [f"user: my order {i} is late\nassistant: sorry, refund number {i}" for i in range(9)]


def test_extractive_makes_no_request() -> None:
    resource = SummarizerResource(base_url=closed_port_url(), max_retries=0)
    assert resource.backend == "extractive" and resource.name == "extractive"
    assert resource.summarize(["user: hello", "", "user: bye"]) == [None, None, None]
    assert resource.summarize([]) == []


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_chat_request_bodies_and_answers(model_server: ModelServer, backend: str) -> None:
    resource = _summarizer(model_server, backend, max_words=40, concurrency=1)
    summaries = resource.summarize(TRANSCRIPTS[:2])
    assert summaries == [fake_summary(t) for t in TRANSCRIPTS[:2]]  # stripped
    model = "llama3.2" if backend == "ollama" else "gpt-4o-mini"
    assert resource.name == f"{backend}:{model}"
    messages = [
        {"role": "system", "content": system_prompt(40)},
        {"role": "user", "content": TRANSCRIPTS[0]},
    ]
    if backend == "ollama":
        expected = {
            "model": model,
            "messages": messages,
            "stream": False,
            "options": {"temperature": 0},
        }
    else:
        expected = {"model": model, "messages": messages, "temperature": 0}
    assert [r["path"] for r in model_server.requests] == [CHAT_PATHS[backend]] * 2
    assert model_server.requests[0]["payload"] == expected
    assert "Authorization" not in model_server.requests[0]["headers"]
    prompt = system_prompt(40)
    assert "40 words" in prompt and "language of the conversation" in prompt


def test_openai_sends_the_api_key_and_model(model_server: ModelServer) -> None:
    resource = _summarizer(model_server, "openai", api_key="sk-test-9", model="local-llm")
    assert resource.summarize(["user: hi"]) == [fake_summary("user: hi")]
    assert resource.name == "openai:local-llm"
    assert model_server.requests[0]["headers"].get("Authorization") == "Bearer sk-test-9"
    assert model_server.requests[0]["payload"]["model"] == "local-llm"


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_concurrent_requests_keep_order(model_server: ModelServer, backend: str) -> None:
    model_server.barrier = threading.Barrier(4)  # no answer until 4 requests are in flight together
    transcripts = TRANSCRIPTS[:4] + ["  "] + TRANSCRIPTS[4:8]
    resource = _summarizer(model_server, backend, concurrency=4)
    expected = [fake_summary(t) if t.strip() else "" for t in transcripts]
    assert resource.summarize(transcripts) == expected
    assert len(model_server.requests) == 8
    assert sorted(r["payload"]["messages"][1]["content"] for r in model_server.requests) == sorted(
        TRANSCRIPTS[:8]
    )
    resource.close()  # sessions closed; a later call opens new ones
    model_server.barrier = None
    assert resource.summarize(TRANSCRIPTS[8:]) == [fake_summary(TRANSCRIPTS[8])]


def test_empty_transcripts_send_no_request(model_server: ModelServer) -> None:
    assert _summarizer(model_server, "ollama").summarize(["", "   \n\t"]) == ["", ""]
    assert model_server.requests == []


def test_long_transcript_is_cut_to_its_tail(model_server: ModelServer) -> None:
    long = "user: " + " ".join(f"word{i}" for i in range(100)) + " outcome: refunded"
    short = "x" * 50
    resource = _summarizer(model_server, "ollama", max_input_chars=50, concurrency=1)
    resource.summarize([long, short])
    sent = [r["payload"]["messages"][1]["content"] for r in model_server.requests]
    assert sent == ["…" + long[-50:], short]
    assert sent[0].endswith("outcome: refunded")


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_retries_a_503_then_succeeds(model_server: ModelServer, backend: str) -> None:
    model_server.script.append((503, '{"error": "model loading"}', 0.0))
    assert _summarizer(model_server, backend).summarize(["user: hi"]) == [fake_summary("user: hi")]
    assert len(model_server.requests) == 2  # the 503, then the same request again
    assert model_server.requests[0]["payload"] == model_server.requests[1]["payload"]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_400_raises_at_once_naming_backend_model_and_status(
    model_server: ModelServer, backend: str
) -> None:
    model_server.script.append((400, '{"error": "model \\"nope\\" not found"}', 0.0))
    resource = _summarizer(model_server, backend, model="nope")
    url = re.escape(f"{model_server.url}{CHAT_PATHS[backend]}")
    pattern = (
        rf"{backend} summary request with model 'nope' to {url} failed with HTTP 400.*not found"
    )
    with pytest.raises(SummarizerError, match=pattern):
        resource.summarize(["user: hi"])
    assert len(model_server.requests) == 1  # not retried


def test_timeout_gives_up_after_max_retries(model_server: ModelServer) -> None:
    model_server.script.extend([(200, "{}", 0.4)] * 2)  # every attempt outlives the timeout
    resource = _summarizer(model_server, "ollama", timeout_seconds=0.1, max_retries=1)
    with pytest.raises(SummarizerError, match=r"after 2 attempts \(timeout 0.1 s each\).*Timeout"):
        resource.summarize(["user: are you there?"])
    assert len(model_server.requests) == 2


def test_connection_refused_is_retried_then_reported() -> None:
    resource = SummarizerResource(
        backend="openai", base_url=closed_port_url(), max_retries=1, backoff_seconds=0.01
    )
    with pytest.raises(SummarizerError, match=r"openai summary request.*after 2 attempts"):
        resource.summarize(["user: hi"])


@pytest.mark.parametrize(
    ("backend", "body", "problem"),
    [
        ("ollama", '{"done": true}', "unexpected body"),
        ("openai", '{"choices": []}', "unexpected body"),
        ("openai", '{"choices": [{"message": {"content": null}}]}', "empty summary"),
        ("ollama", '{"message": {"content": "  \\n "}}', "empty summary"),
        ("ollama", "<html>proxy error</html>", "unexpected body"),
    ],
)
def test_malformed_answer_raises(
    model_server: ModelServer, backend: str, body: str, problem: str
) -> None:
    model_server.script.append((200, body, 0.0))
    url = re.escape(f"{model_server.url}{CHAT_PATHS[backend]}")
    with pytest.raises(SummarizerError, match=rf"{url} returned an {problem}: .*") as info:
        _summarizer(model_server, backend).summarize(["user: hi"])
    assert len(model_server.requests) == 1
    excerpt = str(info.value).split(": ", 1)[1]
    assert excerpt and (excerpt in body or excerpt in str(json.loads(body)))
