"""Named SQL blocks, loaded once from ``sql/*.sql`` (``-- name: <block>`` headers).

Values always travel as parameters. Table names are spliced in only as
``psycopg.sql.Identifier`` through ``{placeholders}``, never formatted as text.
Braces in whole-line ``--`` comments are escaped when a block is loaded: a
placeholder named in a comment would otherwise be filled there too, and a value
holding a newline (a client code in an index predicate) would step out of the
comment into the SQL. The comments stay, so a running statement is recognisable
in ``pg_stat_activity``.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from psycopg import sql

SQL_DIR = Path(__file__).parent / "sql"
_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_COMMENT_LINE = re.compile(r"^[ \t]*--.*$", re.MULTILINE)


def _escape_braces(comment: re.Match[str]) -> str:
    return comment[0].replace("{", "{{").replace("}", "}}")


@cache
def _blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        parts = _HEADER.split(path.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in blocks:
                raise ValueError(f"SQL block {name!r} is defined twice (in {path.name})")
            blocks[name] = _COMMENT_LINE.sub(_escape_braces, body).strip()
    return blocks


def text(name: str) -> str:
    return _blocks()[name]


def query(name: str, **parts: sql.Composable) -> sql.Composed:
    """The block with its ``{placeholders}`` filled by identifiers or other blocks."""
    return sql.SQL(text(name)).format(**parts)  # type: ignore[arg-type]
