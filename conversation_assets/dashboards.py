"""Reads for the product's dashboards: a client's daily series, its top channels
and its last 24 hours. Each reads one client's rows through an index (the metrics
tables' primary keys, or conversations' client-by-date index), never raw history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import psycopg

from conversation_assets import arguments
from conversation_assets.queries import query


@dataclass(frozen=True)
class DayFigures:
    day: date
    conversations: int
    messages: int
    with_embeddings: int
    handed_off: int
    avg_sentiment: float | None  # weighted by conversations
    avg_duration_seconds: float | None  # weighted by conversations


@dataclass(frozen=True)
class ChannelFigures:
    channel: str
    conversations: int
    messages: int


def _check_days(first_day: date, last_day: date) -> None:
    arguments.day("first_day", first_day)
    arguments.day("last_day", last_day)
    if last_day < first_day:
        raise ValueError(f"last_day {last_day} is before first_day {first_day}")


def daily_series(
    conn: psycopg.Connection, client_code: str, first_day: date, last_day: date
) -> list[DayFigures]:
    """One entry per day that has conversations, from ``conversation_metrics``."""
    arguments.text("client_code", client_code)
    _check_days(first_day, last_day)
    rows = conn.execute(
        query("dashboard_daily_series"),
        {"client_code": client_code, "first_day": first_day, "last_day": last_day},
        prepare=False,
    ).fetchall()
    return [
        DayFigures(
            day=r[0],
            conversations=r[1],
            messages=r[2],
            with_embeddings=r[3],
            handed_off=r[4],
            avg_sentiment=None if r[5] is None else float(r[5]),
            avg_duration_seconds=None if r[6] is None else float(r[6]),
        )
        for r in rows
    ]


def top_channels(
    conn: psycopg.Connection, client_code: str, first_day: date, last_day: date, limit: int = 5
) -> list[ChannelFigures]:
    """The channels with the most conversations started in the days, most first."""
    arguments.text("client_code", client_code)
    _check_days(first_day, last_day)
    arguments.whole_number("limit", limit, 1)
    rows = conn.execute(
        query("dashboard_top_channels"),
        {"client_code": client_code, "first_day": first_day, "last_day": last_day, "limit": limit},
        prepare=False,
    ).fetchall()
    return [ChannelFigures(channel=r[0], conversations=r[1], messages=r[2]) for r in rows]


def last_24_hours(
    conn: psycopg.Connection, client_code: str, now: datetime | None = None
) -> list[tuple[datetime, int]]:
    """Conversations started in each of the 24 UTC hours up to ``now``, oldest first,
    zeros included: past hours from ``performance_stats`` when their figures are
    current, the current hour (and any stale one) counted live."""
    arguments.text("client_code", client_code)
    at = arguments.aware_time("now", now) or datetime.now(UTC)
    rows = conn.execute(
        query("dashboard_last_24_hours"), {"client_code": client_code, "now": at}, prepare=False
    ).fetchall()
    return [(r[0], int(r[1])) for r in rows]
