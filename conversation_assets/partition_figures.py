"""Each partition's own figures, for a run that covers several (a range or a backfill).

Dagster gives every partition of a range run the metadata the asset returns. Figures
of the run as a whole (rows scanned, batches, durations) are the run's, so they go
under ``run_totals`` for every partition, and each partition adds what is its own:
its rows as they stand after the run and how many of them the run wrote, counted in
the output table by the partition's day or hour (timestamps at or after ``since``,
the database's clock when the run began).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
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


def figures_by_partition(
    context: dg.AssetExecutionContext, pool: ConnectionPool, block: str, since: datetime | None
) -> dict[str, dict[str, int]]:
    """``block`` of sql/automation.sql for each partition of the run (partitions without
    rows: zeros). Its first column is the partition's start: a day, or an hour."""
    window = context.partition_time_window
    with pool.connection() as conn:
        cursor = conn.execute(
            query(block), {"start": window.start, "end": window.end, "since": since}
        )
        names = [column.name for column in cursor.description or []][1:]
        found = {row[0]: row[1:] for row in cursor.fetchall()}
    partitions_def = context.assets_def.partitions_def
    assert isinstance(partitions_def, dg.TimeWindowPartitionsDefinition)
    figures: dict[str, dict[str, int]] = {}
    for key in context.partition_keys:
        start = partitions_def.time_window_for_partition_key(key).start
        values = found.get(start, found.get(start.date(), (0,) * len(names)))
        figures[key] = {n: int(v) for n, v in zip(names, values, strict=True)}
    return figures


def split_for_partitions(
    context: dg.AssetExecutionContext,
    metadata: Mapping[str, Any],
    run_figures: list[str],
    *,
    pool: ConnectionPool,
    block: str,
    since: datetime | None = None,
) -> dict[str, Any]:
    """The metadata to return. One partition: ``metadata`` as is. Several: the run's own
    figures (``run_figures``) move into ``run_totals``, and each partition gets its own
    figures from ``block`` (see figures_by_partition)."""
    keys = list(context.partition_keys) if context.has_partition_key_range else []
    if len(keys) <= 1:
        return dict(metadata)
    per_partition = figures_by_partition(context, pool, block, since)
    shared = {k: v for k, v in metadata.items() if k not in run_figures}
    shared["run_totals"] = dg.MetadataValue.json(
        {k: metadata[k] for k in run_figures if k in metadata}
    )
    shared["run_partitions"] = len(keys)
    for key in keys:
        context.add_asset_metadata(per_partition[key], partition_key=key)
    return shared
