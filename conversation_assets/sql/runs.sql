-- The pipeline's run records: one row per run and asset (pipeline_runs), read by
-- performance_stats and the metrics server.

-- name: record_pipeline_run
INSERT INTO pipeline_runs AS p (
    run_id, asset, partition_key, duration_ms, rows_scanned, items, batches, model_ms)
VALUES (%(run_id)s, %(asset)s, %(partition_key)s, %(duration_ms)s, %(rows_scanned)s,
        %(items)s, %(batches)s, %(model_ms)s)
ON CONFLICT (run_id, asset) DO UPDATE
SET partition_key = EXCLUDED.partition_key, finished_at = now(),
    duration_ms = EXCLUDED.duration_ms, rows_scanned = EXCLUDED.rows_scanned,
    items = EXCLUDED.items, batches = EXCLUDED.batches, model_ms = EXCLUDED.model_ms;
