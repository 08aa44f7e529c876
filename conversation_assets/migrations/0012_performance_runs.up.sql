-- The runs performance_stats counts: the hourly refresh sums them, and the schedules'
-- check asks whether one finished after an hour's row was written. One list for both.
CREATE VIEW performance_runs AS
SELECT r.run_id, r.asset, r.partition_key, r.finished_at, r.duration_ms, r.rows_scanned,
       r.items, r.batches, r.model_ms
FROM pipeline_runs AS r
WHERE r.asset IN ('discovered_sessions', 'conversations', 'conversation_embeddings',
                  'enriched_conversations');
