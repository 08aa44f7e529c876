DROP VIEW IF EXISTS performance_runs;
