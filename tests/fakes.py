"""Local HTTP servers that speak the real model protocols, for the tests.

`ModelServer` answers Ollama's `/api/embed` and `/api/chat` and OpenAI's
`/v1/embeddings` and `/v1/chat/completions` with deterministic results; scripted
failures (status, body, delay) are played first, one per request.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}


def fake_vector(text: str) -> list[float]:
    """Deterministic 3-d vector that identifies its text."""
    return [float(len(text)), float(sum(map(ord, text)) % 997), 1.0]


def fake_summary(transcript: str) -> str:
    """Deterministic answer that identifies its transcript."""
    return f"{len(transcript)} chars ending with {transcript.split()[-1]}"


@dataclass
class ModelServer:
    """What the server saw, and what it will answer next."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Each entry answers one request: (status, body, delay_seconds[, headers]); then
    # success. A status of 0 only delays, then answers normally.
    script: list[tuple[Any, ...]] = field(default_factory=list)
    # Chat requests wait here together (the test fails unless they are concurrent).
    barrier: threading.Barrier | None = None
    # An embedding request holding a text longer than this is refused (HTTP 400, as a
    # model's context limit is): the server reads the texts, not a script.
    max_text_chars: int | None = None
    # Vector size answered: fake_vector's 3, padded with zeros to a column's size.
    dimension: int = 3
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: ModelServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "payload": payload,
                        "at": time.monotonic(),
                    }
                )
                scripted = state.script.pop(0) if state.script else None
            if scripted is not None:
                status, body, delay, *headers = scripted
                time.sleep(delay)
                if status:
                    self._reply(status, body, *headers)
                    return
            if self.path in CHAT_PATHS.values():
                self._chat(payload)
            else:
                self._embed(payload)

        def _embed(self, payload: dict[str, Any]) -> None:
            limit = state.max_text_chars
            if limit is not None and any(len(t) > limit for t in payload["input"]):
                error = {"message": f"input longer than {limit}", "type": "invalid_request_error"}
                self._reply(400, json.dumps({"error": error}))
                return
            pad = [0.0] * (state.dimension - 3)
            vectors = [fake_vector(t) + pad for t in payload["input"]]
            if self.path == "/api/embed":
                self._reply(200, json.dumps({"model": payload["model"], "embeddings": vectors}))
            elif self.path == "/v1/embeddings":
                # Reversed on purpose: the client must order by "index".
                data = [
                    {"object": "embedding", "index": i, "embedding": v}
                    for i, v in enumerate(vectors)
                ]
                self._reply(200, json.dumps({"object": "list", "data": data[::-1]}))
            else:
                self._reply(404, '{"error": "not found"}')

        def _chat(self, payload: dict[str, Any]) -> None:
            if state.barrier is not None:
                state.barrier.wait(timeout=10)  # breaks (and fails the test) unless concurrent
            content = f"\n  {fake_summary(payload['messages'][-1]['content'])}  \n"
            message = {"role": "assistant", "content": content}
            if self.path == CHAT_PATHS["ollama"]:
                self._reply(200, json.dumps({"model": payload["model"], "message": message}))
            else:
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self._reply(200, json.dumps({"object": "chat.completion", "choices": [choice]}))

    return Handler


class _Server(ThreadingHTTPServer):
    """Closing waits for the handlers, so none outlives its test (a timed-out one included)."""

    daemon_threads = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the client hung up: expected
            super().handle_error(request, client_address)


@contextmanager
def serve_models() -> Iterator[ModelServer]:
    state = ModelServer()
    with _Server(("127.0.0.1", 0), _handler(state)) as httpd:
        state.url = "http://{}:{}".format(*httpd.server_address)
        threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
        try:
            yield state
        finally:
            httpd.shutdown()


def closed_port_url() -> str:
    """A local URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"
