"""kdflow.metrics against values worked out by hand on small fixed predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdflow.metrics import (
    apply_temperature,
    fit_temperature,
    median_ratio_ci,
    PROB_FLOOR,
    accuracy_ci,
    agreement,
    brier,
    category_accuracy,
    expected_calibration_error,
    latency_summary,
    mean_kl,
    nll,
    predicted,
    reliability_curve,
    retention,
    throughput,
    top_label,
    wilson_interval,
)

# Four questions, the last with only two options (third column is padding).
#   q0 [0.7, 0.2, 0.1] gold 0 -> predicts 0, correct, confidence 0.7
#   q1 [0.1, 0.6, 0.3] gold 2 -> predicts 1, wrong,   confidence 0.6
#   q2 [0.2, 0.2, 0.6] gold 2 -> predicts 2, correct, confidence 0.6
#   q3 [0.5, 0.5, 0.0] gold 1 -> tie, predicts 0 (lower index), wrong, confidence 0.5
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.5, 0.0]])
GOLD = np.array([0, 2, 2, 1])


# ---------------------------------------------------------------- accuracy and intervals


def test_wilson_known_values():
    # 8/10: p = 0.8, z^2 = 3.841459, denominator 1.384146, centre (0.8 + 0.192073) / 1.384146 = 0.716739,
    # half 1.959964 * sqrt(0.016 + 0.009604) / 1.384146 = 0.226577 -> (0.490162, 0.943318)
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert lo == pytest.approx(0.490162, abs=1e-6) and hi == pytest.approx(0.943318, abs=1e-6)
    # 0/10: the lower bound is exactly 0 and the upper z^2 / (n + z^2) = 3.841459 / 13.841459 = 0.277533
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    # 10/10 mirrors it: (1 - 0.277533, 1)
    assert wilson_interval(10, 10) == (pytest.approx(0.722467, abs=1e-6), 1.0)
    # 2/3: centre (0.666667 + 0.640243) / 2.280486 = 0.573083, half 0.365424 -> (0.207660, 0.938508)
    assert wilson_interval(2, 3) == (pytest.approx(0.207660, abs=1e-6), pytest.approx(0.938508, abs=1e-6))


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="at least one observation"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes must lie in"):
        wilson_interval(11, 10)


def test_accuracy_ci():
    correct = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1])  # 8 of 10
    acc, lo, hi = accuracy_ci(correct)
    assert acc == 0.8
    assert (lo, hi) == wilson_interval(8, 10)
    assert accuracy_ci(correct.astype(bool)) == (acc, lo, hi)
    with pytest.raises(ValueError, match="no predictions"):
        accuracy_ci([])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        accuracy_ci([0, 2, 1])


def test_category_accuracy_table():
    # a: correct [0, 1] -> 1/2; b: correct [1, 1, 0] -> 2/3
    # Wilson 1/2: centre 0.5, half 1.959964 * sqrt(0.125 + 0.240091) / 2.920730 = 0.405469
    table = category_accuracy([1, 0, 1, 1, 0], ["b", "a", "b", "a", "b"])
    assert [row.category for row in table] == ["a", "b"]
    a, b = table
    assert (a.n, a.correct, a.accuracy) == (2, 1, 0.5)
    assert a.lo == pytest.approx(0.094531, abs=1e-6) and a.hi == pytest.approx(0.905469, abs=1e-6)
    assert (b.n, b.correct) == (3, 2) and b.accuracy == pytest.approx(2 / 3)
    assert (b.lo, b.hi) == wilson_interval(2, 3)
    with pytest.raises(ValueError, match="categories must have shape"):
        category_accuracy([1, 0], ["a"])


def test_predictions_and_top_label():
    assert predicted(PROBS).tolist() == [0, 1, 2, 0]
    confidence, correct = top_label(PROBS, GOLD)
    assert confidence.tolist() == [0.7, 0.6, 0.6, 0.5]
    assert correct.tolist() == [True, False, True, False]


def test_agreement():
    other = np.array([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.1, 0.1, 0.8], [0.4, 0.6, 0.0]])
    # predictions 0, 1, 2, 0 vs 0, 2, 2, 1 -> agree on q0 and q2 = 2/4
    assert agreement(PROBS, other) == 0.5
    assert agreement(PROBS, PROBS) == 1.0
    with pytest.raises(ValueError, match="same questions"):
        agreement(PROBS, other[:3])


# ---------------------------------------------------------------- probabilistic scores


def test_mean_kl():
    teacher = [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    student = [[0.25, 0.75, 0.0], [0.2, 0.3, 0.5], [0.5, 0.25, 0.25]]
    # q0: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.346574 - 0.202733 = 0.143841 (padding: 0)
    # q1: identical -> 0
    # q2: 1 ln(1/0.5) (zeros of the teacher contribute 0) = 0.693147
    # mean = (0.143841 + 0 + 0.693147) / 3 = 0.278996
    assert mean_kl(teacher, student) == pytest.approx(0.278996, abs=1e-6)
    assert mean_kl(teacher, teacher) == 0.0


def test_mean_kl_floors_student_zeros():
    # the student gives 0 where the teacher gives 1: -ln(1e-12) = 27.631021 instead of infinity
    assert mean_kl([[1.0, 0.0]], [[0.0, 1.0]]) == pytest.approx(-math.log(PROB_FLOOR))
    assert mean_kl([[1.0, 0.0]], [[0.0, 1.0]]) == pytest.approx(27.631021, abs=1e-6)


def test_nll():
    # -ln 0.7 - ln 0.3 - ln 0.6 - ln 0.5 = 0.356675 + 1.203973 + 0.510826 + 0.693147 = 2.764621; / 4
    assert nll(PROBS, GOLD) == pytest.approx(0.691155, abs=1e-6)
    assert nll([[1.0, 0.0]], [1]) == pytest.approx(-math.log(PROB_FLOOR))


def test_brier():
    # q0 0.3^2 + 0.2^2 + 0.1^2 = 0.14; q1 0.1^2 + 0.6^2 + 0.7^2 = 0.86; q2 0.2^2 + 0.2^2 + 0.4^2 = 0.24;
    # q3 0.5^2 + 0.5^2 + 0 = 0.5 -> mean 1.74 / 4 = 0.435
    assert brier(PROBS, GOLD) == pytest.approx(0.435, abs=1e-12)
    assert brier([[1.0, 0.0]], [0]) == 0.0
    assert brier([[1.0, 0.0]], [1]) == 2.0


def test_probability_inputs_are_validated():
    with pytest.raises(ValueError, match="gold indices must lie in"):
        nll(PROBS, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="gold must be 4 integer"):
        brier(PROBS, [0, 1])
    with pytest.raises(ValueError, match="finite, non-negative"):
        nll([[0.5, np.nan]], [0])
    with pytest.raises(ValueError, match="non-empty"):
        brier(np.zeros((0, 3)), np.zeros(0, dtype=int))


# ---------------------------------------------------------------- calibration


def test_ece_on_fixture():
    # 15 bins of width 1/15; bins are (lower, upper]:
    #   0.7 -> bin 10 (0.6667, 0.7333]: 1 question, accuracy 1, |1 - 0.7| = 0.3
    #   0.6 = 9/15 exactly, an upper edge -> bin 8 (0.5333, 0.6]: 2 questions, accuracy 1/2, |0.5 - 0.6| = 0.1
    #   0.5 -> bin 7 (0.4667, 0.5333]: 1 question, accuracy 0, 0.5
    # ECE = (1 * 0.3 + 2 * 0.1 + 1 * 0.5) / 4 = 0.25
    confidence, correct = top_label(PROBS, GOLD)
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.25, abs=1e-12)
    curve = reliability_curve(confidence, correct)
    assert len(curve) == 15
    assert {i: b.count for i, b in enumerate(curve) if b.count} == {7: 1, 8: 2, 10: 1}
    assert (curve[8].lower, curve[8].upper) == (8 / 15, 9 / 15)
    assert curve[8].mean_confidence == pytest.approx(0.6) and curve[8].accuracy == 0.5
    assert curve[10].mean_confidence == pytest.approx(0.7) and curve[10].accuracy == 1.0


def test_bin_edges_and_empty_bins():
    # 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0 joins the first bin.
    confidence = [0.0, 0.25, 0.5, np.nextafter(0.5, 1.0), 1.0]
    correct = [False, True, False, True, True]
    curve = reliability_curve(confidence, correct, n_bins=4)
    assert [b.count for b in curve] == [2, 1, 1, 1]
    # bin 0: confidences 0, 0.25 mean 0.125, accuracy 1/2 -> |0.5 - 0.125| * 2 = 0.75
    # bin 1: 0.5 wrong -> 0.5; bin 2: just above 0.5, right -> ~0.5; bin 3: 1.0 right -> 0
    # ECE = (0.75 + 0.5 + 0.5) / 5 = 0.35
    assert expected_calibration_error(confidence, correct, n_bins=4) == pytest.approx(0.35, abs=1e-12)
    # 15 bins: 1/15 and 0.2 = 3/15 are upper edges (bins 0 and 2), 1.0 is the last bin; others stay empty
    curve = reliability_curve([1 / 15, 0.2, np.nextafter(0.2, 1.0), 1.0], [True] * 4, n_bins=15)
    assert {i: b.count for i, b in enumerate(curve) if b.count} == {0: 1, 2: 1, 3: 1, 14: 1}
    empty = curve[5]
    assert empty.count == 0 and math.isnan(empty.mean_confidence) and math.isnan(empty.accuracy)


def test_perfect_calibration_gives_zero():
    # 10 questions at 0.8 with 8 right, 5 at 0.4 with 2 right, 4 at 1.0 all right
    confidence = [0.8] * 10 + [0.4] * 5 + [1.0] * 4
    correct = [1] * 8 + [0] * 2 + [1] * 2 + [0] * 3 + [1] * 4
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)
    # moving a wrong question from 0.8 to 0.9 breaks it: its own bin gives |0 - 0.9| = 0.9, and the 0.8 bin
    # keeps 9 questions with 8 right: |8 - 9 * 0.8| = 0.8 -> ECE = (0.9 + 0.8) / 19 = 0.089474
    confidence[9] = 0.9
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.089474, abs=1e-6)


def test_calibration_inputs_are_validated():
    with pytest.raises(ValueError, match="confidence must lie in"):
        expected_calibration_error([1.2], [True])
    with pytest.raises(ValueError, match="confidence must have shape"):
        expected_calibration_error([0.5, 0.6], [True])
    with pytest.raises(ValueError, match="n_bins must be"):
        reliability_curve([0.5], [True], n_bins=0)


# ---------------------------------------------------------------- retention, latency, throughput


def test_retention():
    assert retention(0.93, 0.95) == pytest.approx(0.978947, abs=1e-6)  # 93 / 95
    assert retention(0.5, 0.4) == 1.25
    with pytest.raises(ValueError, match="teacher's accuracy is 0"):
        retention(0.5, 0.0)
    with pytest.raises(ValueError, match="student_accuracy must lie in"):
        retention(93.0, 95.0)


def test_latency_summary():
    # sorted [0.1, 0.2, 0.3, 0.4, 1.0]: mean 2.0 / 5 = 0.4, median 0.3,
    # p95 at position 0.95 * 4 = 3.8 -> 0.4 + 0.8 * (1.0 - 0.4) = 0.88
    summary = latency_summary([0.3, 1.0, 0.1, 0.4, 0.2])
    assert summary.n == 5
    assert summary.mean_s == pytest.approx(0.4)
    assert summary.median_s == pytest.approx(0.3)
    assert summary.p95_s == pytest.approx(0.88)
    assert (summary.p25_s, summary.p75_s) == pytest.approx((0.2, 0.4))
    with pytest.raises(ValueError, match="non-empty"):
        latency_summary([])
    with pytest.raises(ValueError, match="finite and non-negative"):
        latency_summary([0.1, -0.2])


def test_throughput():
    assert throughput(100, 4.0) == 25.0
    with pytest.raises(ValueError, match="positive duration"):
        throughput(100, 0.0)


def test_median_ratio_ci_is_paired_and_brackets_the_ratio():
    rng = np.random.default_rng(1)
    # The machine's load moves both models together round by round; the teacher is 2x the student.
    load = rng.uniform(1.0, 3.0, size=200)
    student = 0.01 * load * rng.uniform(0.95, 1.05, size=200)
    teacher = 0.02 * load * rng.uniform(0.95, 1.05, size=200)
    ci = median_ratio_ci(teacher, student)
    assert ci.n == 200 and ci.ratio == pytest.approx(np.median(teacher) / np.median(student))
    assert 1.8 < ci.lo < 2.0 < ci.hi < 2.2  # covers the true speed-up
    assert median_ratio_ci(teacher, student) == ci  # deterministic
    # Unpaired (shuffled) the same timings give a much wider interval: pairing is what removes the load.
    unpaired = median_ratio_ci(rng.permutation(teacher), student)
    assert unpaired.relative_half_width > 2 * ci.relative_half_width
    with pytest.raises(ValueError, match="one length"):
        median_ratio_ci([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="finite and positive"):
        median_ratio_ci([0.1, 0.0], [0.1, 0.1])


def test_median_ratio_ci_reports_the_percentile_interval_even_when_it_misses_the_ratio():
    # The teacher takes 2x the student in every round but the middle one, where both take 2.5 (and both
    # medians fall on it): the sample's ratio is 1, yet a resample's medians fall on another round unless
    # the middle one is its median, about 1.5% of resamples, so the 95% interval is exactly [2, 2].
    n, middle = 2001, 1000
    rounds = np.arange(n)
    student = np.where(rounds < middle, 1 + rounds / (10 * n), 3 + rounds / (10 * n))
    student[middle] = 2.5
    teacher = 2 * student
    teacher[middle] = 2.5
    ci = median_ratio_ci(teacher, student)
    assert (ci.ratio, ci.lo, ci.hi) == (1.0, 2.0, 2.0)


def test_apply_temperature_keeps_the_argmax_and_padding():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.5, 0.0]])
    softer = apply_temperature(probs, 2.0)
    np.testing.assert_allclose(softer.sum(axis=1), 1.0)
    assert (softer[:, 3] == 0).all() and (softer.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert softer[0, 0] < 0.7  # T > 1 softens
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, atol=1e-12)
    # q proportional to p ** (1 / T): for row 0 at T = 2, sqrt(0.7) / (sqrt(0.7) + sqrt(0.2) + sqrt(0.1))
    assert softer[0, 0] == pytest.approx(math.sqrt(0.7) / (math.sqrt(0.7) + math.sqrt(0.2) + math.sqrt(0.1)))
    with pytest.raises(ValueError, match="positive number"):
        apply_temperature(probs, 0.0)


def _synthetic_teacher(temperature: float, n: int = 4000, k: int = 4, seed: int = 0):
    """True logits z; gold drawn from softmax(z); the teacher reports softmax(z * temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, k))
    true = np.exp(logits - logits.max(axis=1, keepdims=True))
    true /= true.sum(axis=1, keepdims=True)
    gold = np.array([rng.choice(k, p=row) for row in true])
    reported = np.exp(temperature * logits - (temperature * logits).max(axis=1, keepdims=True))
    return reported / reported.sum(axis=1, keepdims=True), gold


@pytest.mark.parametrize("distortion", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(distortion):
    # The teacher's logits are the true ones times `distortion`: dividing by T = distortion undoes it.
    probs, gold = _synthetic_teacher(distortion)
    assert fit_temperature(probs, gold) == pytest.approx(distortion, rel=0.1)


def test_temperature_scaling_lowers_the_ece_of_an_over_confident_teacher():
    probs, gold = _synthetic_teacher(3.0, seed=1)
    held_out, held_gold = _synthetic_teacher(3.0, seed=2)
    temperature = fit_temperature(probs, gold)
    assert temperature > 1  # over-confident: it softens
    before = expected_calibration_error(*top_label(held_out, held_gold))
    calibrated = apply_temperature(held_out, temperature)
    after = expected_calibration_error(*top_label(calibrated, held_gold))
    assert after < before / 3
    assert nll(calibrated, held_gold) < nll(held_out, held_gold)
    assert (calibrated.argmax(axis=1) == held_out.argmax(axis=1)).all()  # accuracy unchanged
