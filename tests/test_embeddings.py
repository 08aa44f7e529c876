"""The embedding resource against a real local HTTP server per protocol, and offline locally."""

from __future__ import annotations

import math
import socket
import time
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
from tests.fakes import ModelServer, closed_port_url, fake_vector


def _resource(model_server: ModelServer, backend: str, **overrides: Any) -> EmbeddingResource:
    config: dict[str, Any] = {
        "backend": backend,
        "base_url": model_server.url,
        "batch_size": 4,
        "timeout_seconds": 2.0,
        "max_retries": 2,
        "backoff_seconds": 0.01,
    }
    config.update(overrides)
    return EmbeddingResource(**config)


TEXTS = [f"user: message number {i} {'x' * (i % 7)}" for i in range(10)]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_http_backends_batch_and_keep_order(model_server: ModelServer, backend: str) -> None:
    resource = _resource(model_server, backend)
    vectors = resource.embed(TEXTS)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 3)
    np.testing.assert_array_equal(vectors, np.array([fake_vector(t) for t in TEXTS], np.float32))
    assert len(model_server.requests) == math.ceil(len(TEXTS) / 4)
    path = "/api/embed" if backend == "ollama" else "/v1/embeddings"
    assert {r["path"] for r in model_server.requests} == {path}
    assert [t for r in model_server.requests for t in r["payload"]["input"]] == TEXTS
    default = "nomic-embed-text" if backend == "ollama" else "text-embedding-3-small"
    assert {r["payload"]["model"] for r in model_server.requests} == {default}
    assert resource.dimension() == 3
    assert resource.embed([]).shape == (0, 3)


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_retries_a_503_then_succeeds(model_server: ModelServer, backend: str) -> None:
    model_server.script.append((503, '{"error": "model loading"}', 0.0))
    vectors = _resource(model_server, backend).embed(TEXTS[:3])
    assert vectors.shape == (3, 3)
    assert len(model_server.requests) == 2  # the 503, then the same batch again
    assert model_server.requests[0]["payload"] == model_server.requests[1]["payload"]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_waits_what_retry_after_asks(model_server: ModelServer, status: int) -> None:
    # The backoff alone would retry after 10 ms; the server asks for a second.
    model_server.script.append((status, '{"error": "slow down"}', 0.0, {"Retry-After": "1"}))
    _resource(model_server, "openai").embed(["hello"])
    first, second = (r["at"] for r in model_server.requests)
    assert second - first >= 0.9


def test_credentials_in_a_base_url_never_reach_an_error(model_server: ModelServer) -> None:
    with_credentials = model_server.url.replace("http://", "http://alice:s3cr3t@")
    model_server.script.append((400, '{"error": "bad"}', 0.0))
    with pytest.raises(EmbeddingError) as error:
        _resource(model_server, "ollama", base_url=with_credentials).embed(["hello"])
    assert "s3cr3t" not in str(error.value) and "alice" not in str(error.value)
    assert "***@127.0.0.1" in str(error.value)
    resource = _resource(
        model_server, "ollama", base_url=closed_port_url().replace("//", "//u:pw@")
    )
    with pytest.raises(EmbeddingError) as error:
        resource.embed(["hello"])
    assert "pw@" not in str(error.value)


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_a_400_raises_at_once_with_status_and_body(model_server: ModelServer, backend: str) -> None:
    model_server.script.append((400, '{"error": "model \\"nope\\" not found"}', 0.0))
    with pytest.raises(EmbeddingError, match=r"HTTP 400.*model \\?\"nope\\?\" not found"):
        _resource(model_server, backend, model="nope").embed(["hello"])
    assert len(model_server.requests) == 1  # not retried


def test_timeout_gives_up_after_max_retries_in_bounded_time(model_server: ModelServer) -> None:
    model_server.script.extend([(200, "{}", 1.0)] * 3)  # every attempt outlives the timeout
    resource = _resource(model_server, "ollama", timeout_seconds=0.2, max_retries=1)
    started = time.perf_counter()
    with pytest.raises(EmbeddingError, match=r"after 2 attempts.*Timeout"):
        resource.embed(["slow"])
    assert time.perf_counter() - started < 1.5
    assert len(model_server.requests) == 2


def test_connection_refused_is_retried_then_reported() -> None:
    resource = EmbeddingResource(
        backend="ollama", base_url=closed_port_url(), max_retries=2, backoff_seconds=0.01
    )
    with pytest.raises(EmbeddingError, match=r"after 3 attempts.*ConnectionError"):
        resource.embed(["hello"])


def test_openai_sends_the_api_key_only_when_set(model_server: ModelServer) -> None:
    _resource(model_server, "openai", api_key="sk-test-123").embed(["a"])
    _resource(model_server, "openai").embed(["b"])
    assert model_server.requests[0]["headers"].get("Authorization") == "Bearer sk-test-123"
    assert "Authorization" not in model_server.requests[1]["headers"]


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
