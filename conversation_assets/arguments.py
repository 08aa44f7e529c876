"""Checks of the read API's arguments: a wrong type or value is a ValueError naming it.

The product calls the read modules with values from its own requests; a clear
ValueError (never a TypeError from deep inside, nor a database error) is what it
can turn into a 400 for its caller.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from typing import Any


def whole_number(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An int (not a bool, not a numeric string) from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def text(name: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def aware_time(name: str, value: Any) -> datetime | None:
    """A timezone-aware datetime, or None: a naive one would be read in the session's zone."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {value!r}")
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware, got {value.isoformat()}")
    return value


def day(name: str, value: Any) -> date:
    """A date (a datetime is refused: which day it means depends on its zone)."""
    if isinstance(value, datetime) or not isinstance(value, date):
        raise ValueError(f"{name} must be a date, got {value!r}")
    return value


def strings(name: str, values: Iterable[str] | None, *, optional: bool = False) -> list[str]:
    """A collection of strings; None is an empty one where the argument is optional."""
    if values is None and optional:
        return []
    if isinstance(values, str | bytes):
        raise ValueError(f"{name} must be a collection of strings, not one string")
    if not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a collection of strings, got {values!r}")
    items = list(values)
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{name}: {item!r} is not a string")
    return items
