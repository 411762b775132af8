"""What the run report says and draws: loss terms and smoothing, per-category differences with intervals,
the cascade plot's axes, the untrained baseline with paired tests; and the report package's size."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from kdflow import metrics
from kdflow.evaluate.significance import SeedComparison, SeedTest, compare_over_seeds
from kdflow.evaluate.rows import METRIC_SCHEMA, PREDICTION_SCHEMA, metric_rows
from kdflow.report import plots
from kdflow.report.baseline import compare, correct_by_role, gain_recovered, gain_sentence, significance_sentence
from kdflow.report.formatting import pts
from kdflow.report.sections import stage_rows
from kdflow.report.seeds import comparison_sentence, verdict_sentence
from kdflow.report.training import ema, loss_series, loss_weights, validation_as_table, validation_points
from kdflow.store import Store

ROOT = Path(__file__).resolve().parent.parent


def _steps(n: int, kd: float | None = 0.7) -> list[dict]:
    return [{"model_role": "student", "step": s, "loss": 1.0 + 1 / s, "ce": 0.9 + 1 / s,
             "kd": None if kd is None else kd + (kd != 0) / s, "val_accuracy": None} for s in range(1, n + 1)]


# ---------------------------------------------------------------- training


def test_ema_is_pandas_bias_corrected_ewm():
    values = [3.0, 1.0, 2.0, 5.0, 4.0]
    beta = 1 - 2 / (3 + 1)
    by_hand = [sum(beta ** (t - i) * values[i] for i in range(t + 1)) / sum(beta ** k for k in range(t + 1))
               for t in range(len(values))]
    assert ema(values, 3) == pytest.approx(by_hand)
    assert ema(values, 1) == pytest.approx(values)


def test_the_hard_label_student_draws_one_loss_line_without_its_zero_weight_kd_term():
    config = {"training": {"alpha": 0.5, "temperature": 2.0}}
    hard = loss_series(_steps(40), loss_weights("student_hard", config))
    assert [s.label for s in hard] == ["loss = CE on the gold answer (weight 1)"]
    distilled = loss_series(_steps(40), loss_weights("student", config))
    assert [s.label for s in distilled] == ["total loss", "CE on the gold answer (weight 0.5)",
                                            "KD term (weight 2; 4 without a gold answer)"]
    assert distilled[0].span == 4 and distilled[0].smoothed != distilled[0].raw  # a tenth of 40 steps
    # alpha = 0: the CE term has weight 0; a KD term never logged (None) or zero throughout is not drawn either.
    assert [s.label for s in loss_series(_steps(40), loss_weights("student", {"training": {"alpha": 0.0}}))] == [
        "loss = KD term (weight 1)"]
    assert [s.label for s in loss_series(_steps(5, kd=None), None)] == ["total loss", "CE on the gold answer"]
    assert [s.label for s in loss_series(_steps(5, kd=0.0), None)] == ["total loss", "CE on the gold answer"]


def test_training_panels_are_one_per_model_with_legends_clear_of_the_data():
    config = {"training": {"alpha": 0.5, "temperature": 1.0}}
    rows = _steps(60)
    panels = {"student": loss_series(rows, loss_weights("student", config)),
              "student_hard": loss_series([dict(r, model_role="student_hard") for r in rows],
                                          loss_weights("student_hard", config))}
    fig = plots.training_figure(panels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.axes) == 2
    assert [len(ax.get_legend().get_texts()) for ax in fig.axes] == [3, 1]
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer))  # below the axes, not on the lines
        assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)
        assert "EMA, span 6 steps" in ax.get_title()


def test_few_validation_points_become_a_table_many_a_marked_plot():
    rows = [{"model_role": role, "step": s, "val_accuracy": 0.5} for role in ("student", "student_hard")
            for s in (10, 20)]
    points = validation_points(rows)
    assert validation_as_table(points)
    many = validation_points([dict(r, step=s) for r in rows[:1] for s in range(1, 9)])
    assert not validation_as_table(many)
    ax = plots.validation_figure(many).axes[0]
    assert ax.get_lines()[0].get_marker() == "o"


# ---------------------------------------------------------------- categories


def _evaluation_store(tmp_path: Path, categories: dict[str, tuple[list[bool], list[bool]]]) -> tuple[Store, str]:
    """A real store holding one evaluation whose metrics metric_rows computed from per-question correctness
    {category: (teacher correct, student correct)} (probabilities built to give exactly those answers)."""
    import numpy as np

    from kdflow.evaluate.rows import ModelResult

    store = Store(tmp_path)
    cats = [c for c, (t, _) in categories.items() for _ in t]
    gold = np.zeros(len(cats), dtype=int)

    def result(role: str, correct: list[bool]):
        probs = np.asarray([[0.9, 0.1] if ok else [0.1, 0.9] for ok in correct])
        return ModelResult(role, probs, None, None, None, None)

    teacher = result("teacher", [ok for t, _ in categories.values() for ok in t])
    student = result("student", [ok for _, s in categories.values() for ok in s])
    rows = [r for m in (teacher, student) for r in metric_rows(m, gold, cats, teacher, 5)]
    with store.transaction() as tx:
        tx.execute("insert_evaluation", eval_id="e1", run_id=None, spec="{}")
        tx.execute("insert_metrics", pa.Table.from_pylist(rows, schema=METRIC_SCHEMA), eval_id="e1")
    return store, "e1"


def test_category_table_signs_student_minus_teacher_and_puts_big_categories_first(tmp_path):
    store, eval_id = _evaluation_store(tmp_path, {
        "aa_tiny": ([True], [False]),                          # -100 pts on one question
        "big": ([True] * 30 + [False] * 10, [True] * 25 + [False] * 15),
        "mid": ([True] * 6 + [False] * 6, [True] * 8 + [False] * 4),
    })
    from kdflow.report.run_data import wide_metrics

    rows = store.arrow("category_table", wide_metrics(store, "category_metric_rows", eval_id=eval_id)).to_pylist()
    assert [r["category"] for r in rows] == ["big", "mid", "aa_tiny"]
    assert rows[0]["student_minus_teacher"] == pytest.approx(25 / 40 - 30 / 40)  # negative: the student is worse
    assert rows[1]["student_minus_teacher"] == pytest.approx(2 / 12)
    assert (rows[0]["student_lo"], rows[0]["student_hi"]) == pytest.approx(metrics.wilson_interval(25, 40))

    from kdflow.report.formatting import page_table
    from kdflow.report.sections import CATEGORY_COLUMNS, category_row_class

    table = page_table(CATEGORY_COLUMNS, rows, row_class=category_row_class)
    assert table["head"][4] == "student − teacher (negative: student worse)"
    big, _, tiny = table["rows"]
    lo, hi = metrics.wilson_interval(25, 40)
    assert big["cells"][3] == f"62.5% (25/40; {100 * lo:.1f}–{100 * hi:.1f}%)"
    assert big["cells"][4] == "-12.5 pts" and big["cls"] == ""
    assert tiny["cls"] == "small" and "too few to compare" in tiny["cells"][5]


def _category_rows(n_categories: int) -> list[dict]:
    rows = []
    for i in range(n_categories):
        for role, acc in (("teacher", 0.5 + i / 200), ("student", 0.4 + i / 150)):
            lo, hi = metrics.wilson_interval(round(acc * 20), 20)
            rows.append({"model_role": role, "category": f"subject_{i:02d}", "n": 20, "accuracy": acc,
                         "accuracy_lo": lo, "accuracy_hi": hi})
    return rows


def test_many_categories_are_a_sorted_dot_plot_with_intervals_few_are_bars():
    from matplotlib.container import BarContainer, ErrorbarContainer

    fig = plots.category_figure(_category_rows(57))
    ax = fig.axes[0]
    assert not any(isinstance(c, BarContainer) for c in ax.containers)
    assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 2  # teacher and student, with CIs
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 57 and all(label.endswith("(20)") for label in labels)
    # Sorted by student - teacher, which grows with i here: the largest difference at the bottom.
    assert labels[0] == "subject_56 (20)" and labels[-1] == "subject_00 (20)"
    fig.canvas.draw()
    for text in (ax.xaxis.label, *ax.get_yticklabels()):  # nothing cut off at the figure's edges
        box = text.get_window_extent(fig.canvas.get_renderer())
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, text.get_text()
    few = plots.category_figure(_category_rows(5)).axes[0]
    assert sum(isinstance(c, BarContainer) for c in few.containers) == 2


# ---------------------------------------------------------------- cascade


def test_cascade_axis_fits_the_points_and_marks_student_and_teacher_alone():
    points = [{"tau": t, "accuracy": 0.5 + 0.2 * t, "share_to_teacher": t, "latency_ms": 1.5 + 1.5 * t,
               "pareto": True, "chosen": t == 0.5} for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    models = [{"model_role": "teacher", "accuracy": 0.72, "latency_ms_median": 2.9},
              {"model_role": "student", "accuracy": 0.5, "latency_ms_median": 1.5 / 2}]
    ax = plots.cascade_figure(points, models).axes[0]
    lo, hi = ax.get_xlim()
    assert 0.75 - 0.2 < lo < 0.75 and 3.0 < hi < 3.0 + 0.2
    labels = ax.get_legend_handles_labels()[1]
    assert "student alone" in labels and "teacher alone" in labels
    assert {t.get_text() for t in ax.texts} == {"student alone", "teacher alone"}
    fig = ax.figure
    fig.canvas.draw()
    for text in ax.texts:  # labels stay inside the axes, clear of the legend beside it
        assert ax.get_window_extent().contains(*text.get_window_extent().p0), text.get_text()
        assert ax.get_window_extent().contains(*text.get_window_extent().p1), text.get_text()
    student_alone = next(line for line in ax.get_lines() if line.get_label() == "student alone")
    assert list(student_alone.get_xdata()) == [0.75] and list(student_alone.get_ydata()) == [0.5]


# ---------------------------------------------------------------- baseline and significance


def test_gain_recovered_and_paired_tests_against_the_untrained_student():
    assert gain_recovered(0.40, 0.30, 0.50) == pytest.approx(0.5)
    assert gain_recovered(0.40, 0.30, 0.30) is None  # nothing to recover
    ids = [f"q{i}" for i in range(40)]
    teacher = {q: i < 30 for i, q in enumerate(ids)}
    student = {q: i < 20 for i, q in enumerate(ids)}
    hard = {q: i < 19 or i == 39 for i, q in enumerate(ids)}
    untrained = {q: i == 39 for i, q in enumerate(ids)}
    rows = [{"model_role": r, "question_id": q, "correct": c[q]}
            for r, c in (("teacher", teacher), ("student", student), ("student_hard", hard),
                         ("student_init", untrained)) for q in ids]
    found = {(c.first, c.second): c for c in compare(correct_by_role(rows))}
    assert set(found) == {("student", "student_hard"), ("student", "student_init"), ("student", "teacher")}
    vs_hard, vs_teacher = found[("student", "student_hard")], found[("student", "teacher")]
    assert (vs_hard.only_first, vs_hard.only_second, vs_hard.difference) == (1, 1, 0.0)
    assert not vs_hard.significant and vs_hard.p_value == 1.0
    assert (vs_teacher.only_first, vs_teacher.only_second) == (0, 10) and vs_teacher.significant
    assert vs_teacher.p_value == pytest.approx(2 * 0.5**10)
    text = significance_sentence(list(found.values()))
    assert text.startswith("Not significant at the 5% level")
    assert "student (distilled) vs student (hard labels only) (+0.0 pts, p = 1)" in text
    significant = text[text.index("Significant: "):]
    assert "student (distilled) vs teacher (-25.0 pts, p = 0.00195)" in significant
    assert "vs student (untrained: before training) (+47.5 pts, p < 0.0001)" in significant
    assert "recovers 50.0% of the teacher's advantage" in gain_sentence(0.4, 0.3, 0.5)
    assert "worse than before training" in gain_sentence(0.2, 0.3, 0.5)


def test_models_on_different_questions_are_not_paired():
    rows = [{"model_role": "student", "question_id": "a", "correct": True},
            {"model_role": "teacher", "question_id": "b", "correct": True}]
    with pytest.raises(ValueError, match="different questions"):
        compare(correct_by_role(rows))


def test_paired_correct_query_reads_the_stored_predictions(tmp_path):
    store = Store(tmp_path)
    predictions = [{"model_role": r, "question_id": q, "probs": [0.6, 0.4], "predicted": 0, "confidence": 0.6,
                    "correct": ok} for r, q, ok in (("student", "q2", False), ("student", "q1", True),
                                                    ("teacher", "q1", True))]
    with store.transaction() as tx:
        tx.execute("insert_evaluation", eval_id="e1", run_id=None, spec=json.dumps({}))
        tx.execute("insert_predictions", pa.Table.from_pylist(predictions, schema=PREDICTION_SCHEMA), eval_id="e1")
    assert correct_by_role(store.arrow("paired_correct", eval_id="e1").to_pylist()) == {
        "student": {"q1": True, "q2": False}, "teacher": {"q1": True}}


# ---------------------------------------------------------------- students over seeds


def _right(*ranges: tuple[int, int]) -> dict[str, bool]:
    """Correctness on 40 questions q00..q39: right on the half-open index ranges given."""
    return {f"q{i:02d}": any(lo <= i < hi for lo, hi in ranges) for i in range(40)}


# Three seeds, 40 questions. Distilled vs hard: only-first 10/0, 10/1, 6/0 questions. Distilled vs pseudo:
# equal on seed 0, then 0/2 and 3/0. The teacher (36 right) beats the distilled student by 6, 8 and 6.
SEED_CORRECT = {
    "student": {0: _right((0, 30)), 1: _right((0, 28)), 2: _right((0, 30))},
    "student_hard": {0: _right((0, 20)), 1: _right((0, 18), (39, 40)), 2: _right((0, 24))},
    "student_pseudo": {0: _right((0, 30)), 1: _right((0, 30)), 2: _right((0, 27))},
    "student_init": {0: _right((39, 40))},
    "teacher": {None: _right((0, 36))},
}


def test_the_verdict_over_seeds_by_hand():
    study = compare_over_seeds(SEED_CORRECT)
    assert study.seeds == (0, 1, 2) and study.best == "student"
    student = study.student("student")
    assert [a for _, a in student.accuracies] == [0.75, 0.7, 0.75]
    assert (student.mean, student.min, student.max) == pytest.approx((0.7333333, 0.7, 0.75))
    assert student.std == pytest.approx(0.0288675, abs=1e-7)  # sample std of 0.75, 0.70, 0.75
    assert study.student("student_init").std is None  # one seed
    hard = study.comparison("student", "student_hard")
    assert [(t.only_first, t.only_second) for t in hard.tests] == [(10, 0), (10, 1), (6, 0)]
    # p: 2 * 0.5^10, 2 * (1 + 11) / 2^11, 2 * 0.5^6; Holm over 3 seeds: x3, x2, x1 in ascending order.
    assert [t.p_value for t in hard.tests] == pytest.approx([2 * 0.5**10, 24 / 2048, 2 * 0.5**6])
    assert [t.adjusted_p for t in hard.tests] == pytest.approx([6 * 0.5**10, 48 / 2048, 2 * 0.5**6])
    assert hard.significant and hard.direction == 1 and hard.wins == 3
    assert hard.mean_difference == pytest.approx((0.25 + 0.225 + 0.15) / 3)
    pseudo = study.comparison("student", "student_pseudo")
    assert (pseudo.wins, pseudo.losses, pseudo.direction) == (1, 1, 0) and not pseudo.significant
    # Against the teacher every seed's own p is below 0.05 (1/32, 1/128, 1/32), but Holm lifts two of them
    # to 2 x 1/32 = 0.0625: not significant over the seeds.
    teacher = study.comparison("student", "teacher")
    assert [t.p_value for t in teacher.tests] == pytest.approx([1 / 32, 1 / 128, 1 / 32])
    assert [t.adjusted_p for t in teacher.tests] == pytest.approx([1 / 16, 3 / 128, 1 / 16])
    assert teacher.n_significant == 1 and teacher.direction == 0 and teacher.losses == 3
    json.dumps(study.as_dict())  # summary.json reads it
    assert study.as_dict()["comparisons"][0]["significant"] is True


def test_the_verdict_sentences():
    study = compare_over_seeds(SEED_CORRECT)
    assert comparison_sentence(study.comparison("student", "student_hard")) == (
        "student (distilled) beats student (hard labels only) on 3 of 3 seeds (mean +20.8 pts, from +15.0 pts to "
        "+25.0 pts), significant after Holm's correction on all 3 (max adjusted p = 0.0312)")
    assert comparison_sentence(study.comparison("student", "teacher")) == (
        "student (distilled) trails teacher on 3 of 3 seeds (mean -16.7 pts, from -20.0 pts to -15.0 pts); significant "
        "after Holm's correction on 1 of 3 (max adjusted p = 0.0625): not significant over the seeds")
    tie = SeedComparison("student", "student_hard", tuple(
        SeedTest(seed, 40, 0.5, 0.5 + d, 0, 0, 1.0, 1.0) for seed, d in ((0, 0.0), (1, 0.1), (2, -0.1))), 0.05)
    assert comparison_sentence(tie).startswith(
        "student (distilled) beats student (hard labels only) on 1 and trails it on 1 of 3 seeds (mean +0.0 pts")
    even = SeedComparison("student", "teacher", tie.tests[:1], 0.05)
    assert comparison_sentence(even) == ("student (distilled) ties with teacher on 1 of 1 seed (mean +0.0 pts); "
                                         "significant after Holm's correction on 0 of 1 (max adjusted p = 1): not "
                                         "significant over the seeds")
    assert verdict_sentence(study) == (
        "The distilled student is the most accurate student over 3 seeds (mean 73.3%), but its lead over student "
        "(pseudo-labels from the teacher) is not significant on every seed.")
    no_pseudo = compare_over_seeds({k: v for k, v in SEED_CORRECT.items() if k != "student_pseudo"})
    assert verdict_sentence(no_pseudo).startswith("Distilling paid off over 3 seeds: the distilled student is the "
                                                  "most accurate student (mean 73.3%) and beats student (hard labels "
                                                  "only) significantly on every seed.")
    swapped = dict(SEED_CORRECT, student=SEED_CORRECT["student_hard"], student_hard=SEED_CORRECT["student"])
    assert verdict_sentence(compare_over_seeds(swapped)).startswith(
        "Distilling did not pay off: student (hard labels only) is the most accurate student over 3 seeds")
    pseudo_best = dict(SEED_CORRECT, student_pseudo={seed: _right((0, 31)) for seed in (0, 1, 2)})
    assert verdict_sentence(compare_over_seeds(pseudo_best)) == (
        "Student (pseudo-labels from the teacher) is the most accurate student over 3 seeds (mean 77.5% against the "
        "distilled student's 73.3%), but not significantly on every seed: distilling neither clearly paid off nor "
        "clearly failed.")
    one_seed = compare_over_seeds({role: {k: v for k, v in by_seed.items() if k in (0, None)}
                                   for role, by_seed in SEED_CORRECT.items()})
    assert "on its one seed (train more with training.seeds" in verdict_sentence(one_seed)
    assert "on every seed" not in verdict_sentence(one_seed)
    # Equal means are a tie, whichever role the order of the contenders lists first.
    level = dict(SEED_CORRECT, student_pseudo=SEED_CORRECT["student"])
    assert verdict_sentence(compare_over_seeds(level)) == (
        "No student is ahead over 3 seeds: the distilled student ties with student (pseudo-labels from the teacher) "
        "(mean 73.3%), beats student (hard labels only) significantly on every seed.")
    # A baseline ahead by less than the printed precision ties too (one question of 3,000 on one seed).
    many = {seed: {f"q{i}": i < 2200 for i in range(3000)} for seed in (0, 1, 2)}
    fewer = {**many, 0: {f"q{i}": i < 2199 for i in range(3000)}}
    near = {"student": fewer, "student_pseudo": many, "teacher": {None: many[0]}}
    sentence = verdict_sentence(compare_over_seeds(near))
    assert sentence.startswith("No student is ahead over 3 seeds: the distilled student ties with student "
                               "(pseudo-labels from the teacher) (mean 73.3%)"), sentence
    assert compare_over_seeds({"teacher": SEED_CORRECT["teacher"]}) is None


def test_the_report_stage_lists_itself_as_being_written():
    stages = [{"stage": "evaluate", "status": "completed", "seconds": 3.0},
              {"stage": "report", "status": "running", "seconds": None}]
    assert [r["status"] for r in stage_rows(stages)] == ["completed", "writing this report"]
    assert stage_rows([dict(stages[1], status="completed")])[0]["status"] == "completed"


def test_signed_points_read_negative_when_the_student_is_worse():
    assert pts(-0.129) == "-12.9 pts" and pts(0.05) == "+5.0 pts"


# ---------------------------------------------------------------- calibration


def test_the_report_shows_the_kl_to_the_trained_on_target_and_to_the_raw_labels(tmp_path):
    import numpy as np

    from kdflow.evaluate.rows import ModelResult
    from kdflow.report.formatting import page_table
    from kdflow.report.run_data import model_metrics, wide_metrics
    from kdflow.report.sections import metric_columns

    teacher = ModelResult("teacher", np.asarray([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]]), None, None, None,
                          None)
    student = ModelResult("student", np.asarray([[0.6, 0.4]] * 4), None, None, None, None)
    gold = np.zeros(4, dtype=int)
    rows = [r for m in (teacher, student) for r in metric_rows(m, gold, ["c"] * 4, teacher, 5, target_temperature=2.0)]
    store = Store(tmp_path)
    with store.transaction() as tx:
        tx.execute("insert_evaluation", eval_id="e1", run_id=None, spec="{}")
        tx.execute("insert_metrics", pa.Table.from_pylist(rows, schema=METRIC_SCHEMA), eval_id="e1")
    table = page_table(metric_columns(), model_metrics(wide_metrics(store, "overall_metric_rows", eval_id="e1")))
    cells = dict(zip(table["head"], table["rows"][1]["cells"]))  # the student
    target = metrics.apply_temperature(teacher.probs, 2.0)  # what a calibrated student learned from
    assert cells["KL(teacher‖model)"] == (f"{metrics.mean_kl(target, student.probs):.3f} "
                                          f"(raw labels {metrics.mean_kl(teacher.probs, student.probs):.3f})")


def test_the_calibration_section_says_why_a_fitted_temperature_was_not_used():
    import dataclasses

    from kdflow.report.sections import calibration_sentence
    from kdflow.validate.calibration import fit_calibration

    right = [{"split": "val", "answer": 0, "probs": [0.7, 0.2, 0.1]}] * 150  # right on every question
    fit = fit_calibration(right, min_questions=100)
    text = calibration_sentence({"temperature": None}, {"teacher_calibration": dataclasses.asdict(fit)})
    assert text.startswith("The teacher was not calibrated: T = 0.05 fitted on 150 validation questions is at a "
                           "bound of the search interval [0.05, 20]")
    assert "raw labels used" in text
    calibrated = {"temperature": 1.5, "ece": 0.2, "ece_calibrated": 0.1, "nll": 0.9, "nll_calibrated": 0.8}
    assert "learned from the calibrated probabilities" in calibration_sentence(calibrated, {"target_temperature": 1.5})
    assert "learned from the calibrated" not in calibration_sentence(calibrated, {"target_temperature": None})


# ---------------------------------------------------------------- data


def test_the_data_sentences_say_what_is_missing_and_count_each_split():
    from kdflow.report.quality import DataQuality, SuspectGold, issue_category_rows, suspect_sentence, terminal_line

    datasets = [{"dataset_id": "a@1", "labeled": 90, "unlabeled": 10, "rejected": 1},
                {"dataset_id": "b@1", "labeled": 10, "unlabeled": 0, "rejected": 0}]
    assert "does not record the gate verdict" in suspect_sentence(DataQuality(datasets, None, None, []))
    assert "was not scanned" in suspect_sentence(DataQuality(datasets, "v1", None, []))
    off = SuspectGold("v1", "off", 100, 0, [], [], None)
    assert "not searched" in suspect_sentence(DataQuality(datasets, "v1", off, []))
    counts = [{"split": "test", "category": "law", "considered": 20, "suspect": 2},
              {"split": "train", "category": "law", "considered": 60, "suspect": 3},
              {"split": "train", "category": "math", "considered": 20, "suspect": 0}]
    found = SuspectGold("v1", "margin", 100, 5, counts, [], None)
    quality = DataQuality(datasets, "v1", found, [])
    assert found.by_split == {"train": 3, "test": 2}
    assert ": 3 in train, 2 in test. The 2 flagged test questions are left out" in suspect_sentence(quality)
    assert issue_category_rows(found) == [{"category": "law", "considered": 80, "suspect": 5, "test": 2}]
    assert terminal_line(quality) == "data: 100 labeled, 10 unlabeled, 1 rejected · 5 suspect gold answers (2 in test)"
