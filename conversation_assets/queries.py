"""Named SQL blocks, loaded once from ``sql/*.sql`` (``-- name: <block>`` headers).

Values always travel as parameters. Table names are spliced in only as
``psycopg.sql.Identifier`` through ``{placeholders}``, never formatted as text.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from psycopg import sql

SQL_DIR = Path(__file__).parent / "sql"
_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        parts = _HEADER.split(path.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in blocks:
                raise ValueError(f"SQL block {name!r} is defined twice (in {path.name})")
            blocks[name] = body.strip()
    return blocks


def text(name: str) -> str:
    return _blocks()[name]


def query(name: str, **parts: sql.Composable) -> sql.Composed:
    """The block with its ``{placeholders}`` filled by identifiers or other blocks."""
    return sql.SQL(text(name)).format(**parts)  # type: ignore[arg-type]
