"""The pipeline's run records: what each materialization did, one row per run and asset.

``performance_stats`` counts them per hour and the metrics server turns them into
latency histograms, so every asset records its run here, whichever process ran it.
"""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from conversation_assets.queries import query


def record_pipeline_run(
    pool: ConnectionPool,
    *,
    run_id: str,
    asset: str,
    partition_key: str | None,
    duration_ms: float,
    rows_scanned: int | None = None,
    items: int | None = None,
    batches: int | None = None,
    model_ms: float | None = None,
) -> None:
    """What a materialization did, for ``performance_stats`` (one row per run and asset)."""
    with pool.connection() as conn:
        conn.execute(
            query("record_pipeline_run"),
            {
                "run_id": run_id,
                "asset": asset,
                "partition_key": partition_key,
                "duration_ms": duration_ms,
                "rows_scanned": rows_scanned,
                "items": items,
                "batches": batches,
                "model_ms": model_ms,
            },
        )
