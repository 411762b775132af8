"""Stage 6, report: what a run (or a sweep) found, rebuilt from the DuckDB file alone.

In: a run id or a sweep id. Out: a self-contained HTML page and a markdown summary under
KDFLOW_HOME/reports/, and tables on the terminal.
Tables: reads runs, stage_runs, datasets, teachers, models, training_metrics, evaluations,
evaluation_models, metrics, reliability_bins, cascade_points and the sweep tables (sql/report.sql,
sql/sweep.sql); writes none.

Modules: run_report (one run), sweep_report (a sweep's comparison), terminal (ingest and run listings).
"""
