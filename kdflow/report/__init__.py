"""Stage 6, report: what a run (or a sweep) found, rebuilt from the DuckDB file alone.

In: a run id or a sweep id. Out: a self-contained HTML page, a markdown summary and summary.json (numbers
for programs, schema in README.md) under KDFLOW_HOME/reports/, and tables on the terminal.
Entry point: kdflow.report.run_report.build_report(store, run_id) -> ReportPaths (the sweep's:
sweep_report.build_sweep_report).
Tables: reads runs, stage_runs, datasets, questions, teachers, models, training_metrics, evaluations,
evaluation_models, metrics, predictions, reliability_bins, cascade_points, label_issue_scans, label_issues
and the sweep tables (sql/report.sql, sql/sweep.sql, sql/validation.sql, sql/ingest.sql); writes none.

Modules: run_report (one run: builds the HTML page, markdown and summary.json), run_data (reads a run's
evaluation, headline numbers), run_summary (markdown summary and terminal screen), summary_json (the JSON
document), quality (the data: label counts, suspect gold answers, accuracy without them), sections (the
page's tables and sentences), baseline (the untrained student: gain recovered, paired McNemar tests), seeds
(the students over the training seeds: the verdict), training (loss terms, smoothing), plots (matplotlib
figures), formatting (numbers as text), sweep_report (a sweep's comparison), terminal (ingest and run
listings).
"""
