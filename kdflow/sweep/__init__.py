"""Sweeps: a grid of students trained and evaluated on one set of teacher labels, and their comparison.

In: the config's `sweep` section (settings with lists of values, teachers, an optional ensemble). Out:
one validated RunConfig per grid point, each point's student trained (kdflow.train) and evaluated
(kdflow.evaluate), an ensemble teacher's labels when asked; the report compares the points (kdflow.report.sweep_report).
Tables: reads validation_runs, soft_labels, quarantine, questions, predictions, metrics and
run_datasets; writes sweep_teachers, sweep_points and sweep_evaluations (sql/sweep.sql), and for an
ensemble teachers and soft_labels.

Modules: grid (the grid and one point's run; which settings a sweep may name is kdflow.config.sweep_axes,
since the config checks its own `sweep` section), ensemble (the labels of several teachers combined per
question).
"""
