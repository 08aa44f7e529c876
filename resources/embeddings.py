"""The embedding resource: a bundled offline model by default, Ollama or OpenAI in production.

The `local` backend is WordLlama's 256-d token table, which ships inside the
`wordllama` wheel. WordLlama's own `load()` may reach for Hugging Face, so the
bundled tokenizer and weights are opened by path with `tokenizers` and
`safetensors`: nothing downloads at run time. The HTTP backends batch, time out
per request and retry with exponential backoff on transient failures only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import numpy as np
import requests
from psycopg import sql
from pydantic import Field, PrivateAttr

from resources.http import (
    API_KEY_DESCRIPTION,
    BASE_URL_DESCRIPTION,
    DEFAULT_BASE_URL,
    json_headers,
    post_json,
    redact_url,
)

LOCAL_MODEL = "l2_supercat_256"
_DEFAULT_MODEL = {
    "local": LOCAL_MODEL,
    "ollama": "nomic-embed-text",
    "openai": "text-embedding-3-small",
}
# Local models bundled in the wordllama wheel: name -> (tokenizer file, weights file).
_BUNDLED = {
    "l2_supercat_256": (
        "tokenizers/l2_supercat_tokenizer_config.json",
        "weights/l2_supercat_256.safetensors",
    ),
}


class EmbeddingError(RuntimeError):
    """An embedding request failed for good (bad request, or retries exhausted)."""


class EmbeddingRefused(EmbeddingError):
    """The server refused the texts of a request (HTTP 400, 413, 422: one too long for
    the model, say): sending them again fails again; the others may pass alone."""


class DimensionMismatchError(ValueError):
    """The model's vectors do not fit the database column."""


def check_dimension(model_dim: int, column_dim: int, table: str, column: str) -> None:
    """Fail before any write when the model and the `vector(N)` column disagree.

    The message carries the migration: existing vectors came from another model
    and cannot be cast, so they are nulled (to be re-embedded) before the type change.
    """
    if int(model_dim) == int(column_dim):
        return
    table_id = sql.Identifier(*table.split("."))
    column_id = sql.Identifier(column)
    command = sql.SQL(
        "UPDATE {table} SET {column} = NULL WHERE {column} IS NOT NULL; "
        "ALTER TABLE {table} ALTER COLUMN {column} TYPE vector({dim});"
    ).format(table=table_id, column=column_id, dim=sql.Literal(int(model_dim)))
    raise DimensionMismatchError(
        f"The embedding model produces {model_dim}-d vectors but {table}.{column} is "
        f"vector({column_dim}). Migrate the column (existing vectors are nulled and must be "
        f"re-embedded with the new model):\n  {command.as_string()}"
    )


def _wordllama_root() -> Path:
    """The installed wordllama package directory, found without importing it.

    Importing `wordllama` runs `logging.basicConfig` at import time; the files are all we need.
    """
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError("The local backend needs the `wordllama` package (pip install).")
    return Path(next(iter(spec.submodule_search_locations)))


class _LocalModel:
    """Mean of WordLlama token vectors, L2-normalized, with no padding to the longest text."""

    def __init__(self, tokenizer_path: Path, weights_path: Path) -> None:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        with safe_open(str(weights_path), framework="np", device="cpu") as f:
            weights = f.get_tensor("embedding.weight")
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)

    @property
    def dimension(self) -> int:
        return int(self.weights.shape[1])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        top = self.weights.shape[0] - 1
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        # One gather and sum per text: np.add.reduceat over all texts' rows at once
        # took four times as long (a batch of 1,000 chats: 577 ms against 124 ms).
        for row, encoding in enumerate(encodings):
            if encoding.ids:  # an empty text embeds to the zero vector
                ids = np.asarray(encoding.ids, dtype=np.intp)
                np.clip(ids, 0, top, out=ids)
                out[row] = self.weights[ids].sum(axis=0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, np.maximum(norms, 1e-12), out=out)
        return out


@lru_cache(maxsize=4)
def _load_local(model: str) -> _LocalModel:
    """One copy of the 16 MB table per process, however many resources are built."""
    if model not in _BUNDLED:
        raise EmbeddingError(
            f"Unknown local embedding model {model!r}; bundled models: {sorted(_BUNDLED)}."
        )
    root = _wordllama_root()
    tokenizer_path, weights_path = (root / part for part in _BUNDLED[model])
    for path in (tokenizer_path, weights_path):
        if not path.is_file():
            raise EmbeddingError(f"Bundled WordLlama file missing: {path}")
    return _LocalModel(tokenizer_path, weights_path)


class EmbeddingResource(dg.ConfigurableResource):
    """Turns transcripts into float32 vectors for the `embedding vector(N)` column.

    `local` needs no service and no network, so a fresh checkout embeds out of the
    box; `ollama` and `openai` (any OpenAI-compatible server) are the production
    backends. `dimension()` is what the column's N must equal (see `check_dimension`).
    """

    backend: Literal["local", "ollama", "openai"] = Field(
        default="local", description="local (bundled WordLlama), ollama or openai-compatible."
    )
    model: str | None = Field(
        default=None,
        description="Model name; defaults to l2_supercat_256, nomic-embed-text or "
        "text-embedding-3-small by backend.",
    )
    base_url: str | None = Field(default=None, description=BASE_URL_DESCRIPTION)
    api_key: str | None = Field(default=None, description=API_KEY_DESCRIPTION)
    batch_size: int = Field(default=256, ge=1, description="Texts per model call or request.")
    timeout_seconds: float = Field(default=60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(
        default=4, ge=0, description="Retries after the first attempt on transient failures."
    )
    backoff_seconds: float = Field(
        default=0.5, ge=0, description="First retry delay; doubles each retry, capped at 30 s."
    )

    _dimension: int | None = PrivateAttr(default=None)
    _session: requests.Session | None = PrivateAttr(default=None)

    @property
    def model_name(self) -> str:
        return self.model or _DEFAULT_MODEL[self.backend]

    @property
    def url(self) -> str:
        """The endpoint the HTTP backend posts to."""
        base = (self.base_url or DEFAULT_BASE_URL[self.backend]).rstrip("/")
        return f"{base}/api/embed" if self.backend == "ollama" else f"{base}/v1/embeddings"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts` in order: float32 array of shape (len(texts), dimension())."""
        texts = list(texts)
        if self.backend == "local":
            model = _load_local(self.model_name)
            if not texts:
                return np.zeros((0, model.dimension), dtype=np.float32)
            parts = [
                model.embed(texts[i : i + self.batch_size])
                for i in range(0, len(texts), self.batch_size)
            ]
            return np.concatenate(parts)
        if not texts:
            return np.zeros((0, self.dimension()), dtype=np.float32)
        parts = [
            self._embed_remote(texts[i : i + self.batch_size])
            for i in range(0, len(texts), self.batch_size)
        ]
        vectors = np.concatenate(parts)
        self._dimension = int(vectors.shape[1])
        return vectors

    def dimension(self) -> int:
        """The model's vector size; an HTTP backend is asked once with a probe text."""
        if self._dimension is None:
            if self.backend == "local":
                self._dimension = _load_local(self.model_name).dimension
            else:
                self._dimension = int(self._embed_remote(["dimension probe"]).shape[1])
        return self._dimension

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _embed_remote(self, batch: list[str]) -> np.ndarray:
        body = self._post({"model": self.model_name, "input": batch})
        try:
            if self.backend == "ollama":
                rows = body["embeddings"]
            else:
                items = sorted(body["data"], key=lambda item: item["index"])
                rows = [item["embedding"] for item in items]
            vectors = np.asarray(rows, dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingError(
                f"{redact_url(self.url)} returned an unexpected body: {str(body)[:300]}"
            ) from exc
        if vectors.ndim != 2 or vectors.shape[0] != len(batch):
            got = vectors.shape[0] if vectors.ndim else 0
            raise EmbeddingError(
                f"{redact_url(self.url)} returned {got} vectors for {len(batch)} texts."
            )
        return vectors

    def _post(self, payload: dict[str, Any]) -> Any:
        """POST with a per-request timeout; retry connection errors, timeouts, 408/429/5xx."""
        if self._session is None:
            self._session = requests.Session()
        return post_json(
            self._session,
            self.url,
            payload,
            json_headers(self.api_key if self.backend == "openai" else None),
            timeout_seconds=self.timeout_seconds,
            max_retries=self.max_retries,
            backoff_seconds=self.backoff_seconds,
            what=f"{self.backend} embedding request",
            error_cls=EmbeddingError,
            model=self.model_name,
            refused_cls=EmbeddingRefused,
        )


def embed_each(
    embedder: EmbeddingResource, texts: Sequence[str]
) -> tuple[list[np.ndarray | None], dict[int, str]]:
    """Embed `texts`; a batch the server refuses is halved until the texts it refuses
    alone are found. Their vectors are None, their reasons keyed by position: one text
    a model cannot take never stops the others."""
    vectors: list[np.ndarray | None] = [None] * len(texts)
    refused: dict[int, str] = {}

    def embed(positions: list[int]) -> None:
        try:
            computed = embedder.embed([texts[i] for i in positions])
        except EmbeddingRefused as error:
            if len(positions) == 1:
                refused[positions[0]] = str(error)
                return
            half = len(positions) // 2
            embed(positions[:half])
            embed(positions[half:])
            return
        for position, values in zip(positions, computed, strict=True):
            vectors[position] = values

    if texts:
        embed(list(range(len(texts))))
    return vectors, refused
