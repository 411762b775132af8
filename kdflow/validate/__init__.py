"""Stage 3, validate: the data-quality gate between the teacher's labels and training.

In: the soft labels of one teacher key over the run's datasets. Out: a validation run with the result of
every check (Great Expectations suites plus kdflow's own checks), the labels quarantined with a reason,
a pass/fail verdict that stops the pipeline on failure, the teacher's fitted calibration temperature, and
the questions whose gold answer the calibrated teacher confidently contradicts.
Entry point: kdflow.validate.gate.run_gate(cfg, store, dataset_ids, teacher_key) -> GateResult, whose
validation_id names the verdict training reads; gate.sample_first checks the fail-fast sample.
Tables: reads questions and soft_labels; writes validation_runs, validation_results, quarantine,
teacher_calibrations, label_issue_scans and label_issues (sql/validation.sql).

Modules: checks (the table of checks and the columns they read), validation (running them through
Great Expectations, the quarantine), gate (the verdict, and checking a labeled sample before the rest
is labeled), calibration (temperature scaling fitted on the validation split), label_issues (suspect gold
answers, and what training does with them).
"""
