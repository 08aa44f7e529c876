"""The embedding resource against a real local HTTP server per protocol, and offline locally."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from resources import embeddings
from resources.embeddings import (
    DimensionMismatchError,
    EmbeddingError,
    EmbeddingResource,
    check_dimension,
)


def fake_vector(text: str) -> list[float]:
    """Deterministic 3-d vector that identifies its text."""
    return [float(len(text)), float(sum(map(ord, text)) % 997), 1.0]


@dataclass
class FakeServer:
    """Speaks Ollama's /api/embed and OpenAI's /v1/embeddings; scripted failures come first."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Each entry answers one request: (status, body, delay_seconds); then success.
    script: list[tuple[int, str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "payload": payload}
                )
                scripted = state.script.pop(0) if state.script else None
            if scripted is not None:
                status, body, delay = scripted
                time.sleep(delay)
                if status:
                    self._reply(status, body)
                    return
            vectors = [fake_vector(t) for t in payload["input"]]
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

    return Handler


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def _resource(server: FakeServer, backend: str, **overrides: Any) -> EmbeddingResource:
    config: dict[str, Any] = {
        "backend": backend,
        "base_url": server.url,
        "batch_size": 4,
        "timeout_seconds": 2.0,
        "max_retries": 2,
        "backoff_seconds": 0.01,
    }
    config.update(overrides)
    return EmbeddingResource(**config)


TEXTS = [f"user: message number {i} {'x' * (i % 7)}" for i in range(10)]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_http_backends_batch_and_keep_order(server: FakeServer, backend: str) -> None:
    resource = _resource(server, backend)
    vectors = resource.embed(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 3)
    np.testing.assert_array_equal(vectors, np.array([fake_vector(t) for t in TEXTS], np.float32))
    assert len(server.requests) == math.ceil(len(TEXTS) / 4)
    path = "/api/embed" if backend == "ollama" else "/v1/embeddings"
    assert {r["path"] for r in server.requests} == {path}
    assert [t for r in server.requests for t in r["payload"]["input"]] == TEXTS
    default = "nomic-embed-text" if backend == "ollama" else "text-embedding-3-small"
    assert {r["payload"]["model"] for r in server.requests} == {default}
    assert resource.dimension() == 3
    assert resource.embed([]).shape == (0, 3)


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_retries_a_503_then_succeeds(server: FakeServer, backend: str) -> None:
    server.script.append((503, '{"error": "model loading"}', 0.0))
    vectors = _resource(server, backend).embed(TEXTS[:3])
    assert vectors.shape == (3, 3)
    assert len(server.requests) == 2  # the 503, then the same batch again
    assert server.requests[0]["payload"] == server.requests[1]["payload"]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_400_raises_at_once_with_status_and_body(server: FakeServer, backend: str) -> None:
    server.script.append((400, '{"error": "model \\"nope\\" not found"}', 0.0))
    with pytest.raises(EmbeddingError, match=r"HTTP 400.*model \\?\"nope\\?\" not found"):
        _resource(server, backend, model="nope").embed(["hello"])
    assert len(server.requests) == 1  # not retried


def test_timeout_gives_up_after_max_retries_in_bounded_time(server: FakeServer) -> None:
    server.script.extend([(200, "{}", 1.0)] * 3)  # every attempt outlives the timeout
    resource = _resource(server, "ollama", timeout_seconds=0.2, max_retries=1)
    started = time.perf_counter()
    with pytest.raises(EmbeddingError, match=r"after 2 attempts.*Timeout"):
        resource.embed(["slow"])
    assert time.perf_counter() - started < 1.5
    assert len(server.requests) == 2


def test_connection_refused_is_retried_then_reported() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    resource = EmbeddingResource(
        backend="ollama", base_url=f"http://127.0.0.1:{port}", max_retries=2, backoff_seconds=0.01
    )
    with pytest.raises(EmbeddingError, match=r"after 3 attempts.*ConnectionError"):
        resource.embed(["hello"])


def test_openai_sends_the_api_key_only_when_set(server: FakeServer) -> None:
    _resource(server, "openai", api_key="sk-test-123").embed(["a"])
    _resource(server, "openai").embed(["b"])
    assert server.requests[0]["headers"].get("Authorization") == "Bearer sk-test-123"
    assert "Authorization" not in server.requests[1]["headers"]


def test_local_backend_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads the bundled WordLlama files with every network connection refused."""

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    embeddings._load_local.cache_clear()  # load inside the blocked section

    resource = EmbeddingResource(batch_size=3)
    texts = ["I want a refund for my order", "Where is my package?", "I want a refund for my order"]
    texts += [f"customer {i}: password reset please" for i in range(4)]
    vectors = resource.embed(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 256)
    assert resource.dimension() == 256
    np.testing.assert_array_equal(vectors[0], vectors[2])  # same text, same vector
    np.testing.assert_array_equal(vectors[0], resource.embed([texts[0]])[0])  # batch-independent
    assert not np.allclose(vectors[0], vectors[1])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # Related texts are closer than unrelated ones.
    refund, package, reset = resource.embed(
        ["please refund my money", "where is my parcel, it has not arrived", "reset my password"]
    )
    query = resource.embed(["I would like my money back"])[0]
    assert query @ refund > query @ reset
    assert resource.embed([""]).tolist() == [[0.0] * 256]  # empty text: zero vector, no NaN


def test_check_dimension_names_both_sizes_and_the_migration() -> None:
    check_dimension(256, 256, "conversations", "embedding")  # equal: silent
    with pytest.raises(DimensionMismatchError) as info:
        check_dimension(768, 256, "public.conversations", "embedding")
    message = str(info.value)
    assert "768" in message and "vector(256)" in message
    assert (
        'UPDATE "public"."conversations" SET "embedding" = NULL WHERE "embedding" IS NOT NULL; '
        'ALTER TABLE "public"."conversations" ALTER COLUMN "embedding" TYPE vector(768);'
    ) in message
