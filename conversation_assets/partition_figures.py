"""Each partition's own figures, for a run that covers several (a range or a backfill).

Dagster gives every partition of a range run the metadata the asset returns. Figures
of the run as a whole (rows scanned, batches, durations) are the run's, so they go
under ``run_totals`` for every partition, and each partition adds what is its own:
its rows as they stand after the run and how many of them the run wrote, counted in
the output table by the partition's day (timestamps at or after ``since``, the
database's clock when the run began).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import Any

import dagster as dg
from psycopg_pool import ConnectionPool

from conversation_assets.queries import query


def database_now(pool: ConnectionPool) -> datetime:
    """The database's clock: what row timestamps written after it will exceed."""
    with pool.connection() as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def figures_by_day(
    pool: ConnectionPool, block: str, window: tuple[datetime, datetime], since: datetime
) -> dict[str, dict[str, int]]:
    """``block`` of sql/automation.sql per day of ``window`` (days without rows: zeros)."""
    with pool.connection() as conn:
        cursor = conn.execute(query(block), {"start": window[0], "end": window[1], "since": since})
        names = [column.name for column in cursor.description or []][1:]
        found = {row[0]: row[1:] for row in cursor.fetchall()}
    days: dict[str, dict[str, int]] = {}
    day: date = window[0].date()
    while day < window[1].date():  # a daily window: midnight to midnight (UTC)
        values = found.get(day, (0,) * len(names))
        days[day.isoformat()] = {n: int(v) for n, v in zip(names, values, strict=True)}
        day += timedelta(days=1)
    return days


def split_for_partitions(
    context: dg.AssetExecutionContext,
    metadata: Mapping[str, Any],
    run_figures: list[str],
    per_day: Mapping[str, Mapping[str, int]] | None,
) -> dict[str, Any]:
    """The metadata to return. One partition: ``metadata`` as is. Several: the run's own
    figures (``run_figures``) move into ``run_totals``, and each partition gets its
    day's figures from ``per_day``."""
    keys = list(context.partition_keys) if context.has_partition_key_range else []
    if len(keys) <= 1 or per_day is None:
        return dict(metadata)
    shared = {k: v for k, v in metadata.items() if k not in run_figures}
    shared["run_totals"] = dg.MetadataValue.json(
        {k: metadata[k] for k in run_figures if k in metadata}
    )
    shared["run_partitions"] = len(keys)
    for key in keys:
        context.add_asset_metadata(dict(per_day.get(key, {})), partition_key=key)
    return shared
