"""The LLM summarizer against a real local chat server (Ollama and OpenAI protocols)."""

from __future__ import annotations

import io
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from test_embeddings import FakeServer, _handler  # tests/ is on sys.path under pytest

from resources.summarizer import SummarizerError, SummarizerResource, system_prompt

CHAT_PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}


def fake_summary(transcript: str) -> str:
    """Deterministic answer that identifies its transcript."""
    return f"{len(transcript)} chars ending with {transcript.split()[-1]}"


@dataclass
class ChatServer(FakeServer):
    """The embeddings test server's state, plus a barrier that holds requests together."""

    barrier: threading.Barrier | None = None


def _chat_handler(state: ChatServer) -> type[BaseHTTPRequestHandler]:
    class ChatHandler(_handler(state)):
        """Scripted replies are played by the embeddings handler; the rest answer a chat."""

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                scripted = bool(state.script)
            if scripted:  # the embeddings handler records the request and plays the script
                self.rfile = io.BytesIO(raw)
                super().do_POST()
                return
            payload = json.loads(raw)
            with state.lock:
                state.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "payload": payload}
                )
            if state.barrier is not None:
                state.barrier.wait(timeout=10)  # breaks (and fails the test) unless concurrent
            content = f"\n  {fake_summary(payload['messages'][-1]['content'])}  \n"
            message = {"role": "assistant", "content": content}
            if self.path == CHAT_PATHS["ollama"]:
                self._reply(200, json.dumps({"model": payload["model"], "message": message}))
            elif self.path == CHAT_PATHS["openai"]:
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self._reply(200, json.dumps({"object": "chat.completion", "choices": [choice]}))
            else:
                self._reply(404, '{"error": "not found"}')

    return ChatHandler


class _Server(ThreadingHTTPServer):
    """Closing waits for the handlers, so none outlives its test (a timed-out one included)."""

    daemon_threads = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the client hung up: expected
            super().handle_error(request, client_address)


@pytest.fixture
def chat() -> Iterator[ChatServer]:
    state = ChatServer()
    with _Server(("127.0.0.1", 0), _chat_handler(state)) as httpd:
        state.url = "http://{}:{}".format(*httpd.server_address)
        threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
        yield state
        httpd.shutdown()


def _summarizer(server: ChatServer, backend: str, **overrides: Any) -> SummarizerResource:
    config: dict[str, Any] = {
        "backend": backend,
        "base_url": server.url,
        "timeout_seconds": 2.0,
        "max_retries": 2,
        "backoff_seconds": 0.01,
    }
    return SummarizerResource(**(config | overrides))


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens after


TRANSCRIPTS = [f"user: my order {i} is late\nassistant: sorry, refund number {i}" for i in range(9)]


def test_extractive_makes_no_request() -> None:
    resource = SummarizerResource(base_url=_closed_port_url(), max_retries=0)
    assert resource.backend == "extractive" and resource.name == "extractive"
    assert resource.summarize(["user: hello", "", "user: bye"]) == [None, None, None]
    assert resource.summarize([]) == []


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_chat_request_bodies_and_answers(chat: ChatServer, backend: str) -> None:
    resource = _summarizer(chat, backend, max_words=40, concurrency=1)
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
    assert [r["path"] for r in chat.requests] == [CHAT_PATHS[backend]] * 2
    assert chat.requests[0]["payload"] == expected
    assert "Authorization" not in chat.requests[0]["headers"]
    prompt = system_prompt(40)
    assert "40 words" in prompt and "language of the conversation" in prompt


def test_openai_sends_the_api_key_and_model(chat: ChatServer) -> None:
    resource = _summarizer(chat, "openai", api_key="sk-test-9", model="local-llm")
    assert resource.summarize(["user: hi"]) == [fake_summary("user: hi")]
    assert resource.name == "openai:local-llm"
    assert chat.requests[0]["headers"].get("Authorization") == "Bearer sk-test-9"
    assert chat.requests[0]["payload"]["model"] == "local-llm"


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_concurrent_requests_keep_order(chat: ChatServer, backend: str) -> None:
    chat.barrier = threading.Barrier(4)  # no answer until 4 requests are in flight together
    transcripts = TRANSCRIPTS[:4] + ["  "] + TRANSCRIPTS[4:8]
    resource = _summarizer(chat, backend, concurrency=4)
    expected = [fake_summary(t) if t.strip() else "" for t in transcripts]
    assert resource.summarize(transcripts) == expected
    assert len(chat.requests) == 8
    assert sorted(r["payload"]["messages"][1]["content"] for r in chat.requests) == sorted(
        TRANSCRIPTS[:8]
    )
    resource.close()  # sessions closed; a later call opens new ones
    chat.barrier = None
    assert resource.summarize(TRANSCRIPTS[8:]) == [fake_summary(TRANSCRIPTS[8])]


def test_empty_transcripts_send_no_request(chat: ChatServer) -> None:
    assert _summarizer(chat, "ollama").summarize(["", "   \n\t"]) == ["", ""]
    assert chat.requests == []


def test_long_transcript_is_cut_to_its_tail(chat: ChatServer) -> None:
    long = "user: " + " ".join(f"word{i}" for i in range(100)) + " outcome: refunded"
    short = "x" * 50
    resource = _summarizer(chat, "ollama", max_input_chars=50, concurrency=1)
    resource.summarize([long, short])
    sent = [r["payload"]["messages"][1]["content"] for r in chat.requests]
    assert sent == ["…" + long[-50:], short]
    assert sent[0].endswith("outcome: refunded")


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_retries_a_503_then_succeeds(chat: ChatServer, backend: str) -> None:
    chat.script.append((503, '{"error": "model loading"}', 0.0))
    assert _summarizer(chat, backend).summarize(["user: hi"]) == [fake_summary("user: hi")]
    assert len(chat.requests) == 2  # the 503, then the same request again
    assert chat.requests[0]["payload"] == chat.requests[1]["payload"]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_400_raises_at_once_naming_backend_model_and_status(
    chat: ChatServer, backend: str
) -> None:
    chat.script.append((400, '{"error": "model \\"nope\\" not found"}', 0.0))
    resource = _summarizer(chat, backend, model="nope")
    url = re.escape(f"{chat.url}{CHAT_PATHS[backend]}")
    pattern = (
        rf"{backend} summary request with model 'nope' to {url} failed with HTTP 400.*not found"
    )
    with pytest.raises(SummarizerError, match=pattern):
        resource.summarize(["user: hi"])
    assert len(chat.requests) == 1  # not retried


def test_timeout_gives_up_after_max_retries(chat: ChatServer) -> None:
    chat.script.extend([(200, "{}", 0.4)] * 2)  # every attempt outlives the timeout
    resource = _summarizer(chat, "ollama", timeout_seconds=0.1, max_retries=1)
    with pytest.raises(SummarizerError, match=r"after 2 attempts \(timeout 0.1 s each\).*Timeout"):
        resource.summarize(["user: are you there?"])
    assert len(chat.requests) == 2


def test_connection_refused_is_retried_then_reported() -> None:
    resource = SummarizerResource(
        backend="openai", base_url=_closed_port_url(), max_retries=1, backoff_seconds=0.01
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
def test_malformed_answer_raises(chat: ChatServer, backend: str, body: str, problem: str) -> None:
    chat.script.append((200, body, 0.0))
    url = re.escape(f"{chat.url}{CHAT_PATHS[backend]}")
    with pytest.raises(SummarizerError, match=rf"{url} returned an {problem}: .*") as info:
        _summarizer(chat, backend).summarize(["user: hi"])
    assert len(chat.requests) == 1
    excerpt = str(info.value).split(": ", 1)[1]
    assert excerpt and (excerpt in body or excerpt in str(json.loads(body)))
