"""kdflow.evaluate.cascade: a sweep worked out by hand, Pareto marking, threshold choice, and a brute-force check."""

from __future__ import annotations

import numpy as np
import pytest

from kdflow.evaluate.cascade import CascadePoint, choose_threshold, route, sweep

# Six questions; student 1 s, teacher 3 s per question.
#   question         q0    q1    q2    q3    q4    q5
#   confidence       0.9   0.5   0.7   0.5   0.95  0.6
#   student correct  1     0     1     1     1     0      -> 4/6
#   teacher correct  1     1     0     1     1     1      -> 5/6
# Ascending confidence: q1, q3 (0.5), q5 (0.6), q2 (0.7), q0 (0.9), q4 (0.95).
CONF = [0.9, 0.5, 0.7, 0.5, 0.95, 0.6]
STUDENT_OK = [1, 0, 1, 1, 1, 0]
TEACHER_OK = [1, 1, 0, 1, 1, 1]

# tau, deferred, hits (teacher on deferred + student on the rest), latency 1 + 3 * deferred / 6, pareto
#   0      none              0 + 4 = 4    1.0   yes
#   0.5    none (conf < .5)  0 + 4 = 4    1.0   yes (ties with tau 0)
#   0.6    q1 q3             2 + 3 = 5    2.0   yes
#   0.7    q1 q3 q5          3 + 3 = 6    2.5   yes (beats the teacher alone: q2 stays with the student)
#   0.9    + q2              3 + 2 = 5    3.0   no  (tau 0.7 is cheaper and better)
#   0.95   + q0              4 + 1 = 5    3.5   no
#   >0.95  all               5 + 0 = 5    4.0   no
EXPECTED = [
    (0.0, 4, 0, 1.0, True),
    (0.5, 4, 0, 1.0, True),
    (0.6, 5, 2, 2.0, True),
    (0.7, 6, 3, 2.5, True),
    (0.9, 5, 4, 3.0, False),
    (0.95, 5, 5, 3.5, False),
    (np.nextafter(0.95, 1.0), 5, 6, 4.0, False),
]


def test_hand_computed_sweep():
    points = sweep(CONF, STUDENT_OK, TEACHER_OK, 1.0, 3.0)
    assert len(points) == len(EXPECTED)
    for point, (tau, hits, calls, latency, pareto) in zip(points, EXPECTED, strict=True):
        assert point.tau == tau
        assert point.accuracy == pytest.approx(hits / 6, abs=1e-12)
        assert point.share_to_teacher == pytest.approx(calls / 6, abs=1e-12)
        assert point.mean_latency_s == pytest.approx(latency, abs=1e-12)
        assert point.pareto is pareto


def test_extremes_are_all_student_and_all_teacher():
    points = sweep(CONF, STUDENT_OK, TEACHER_OK, 0.035, 0.060)
    first, last = points[0], points[-1]
    assert (first.tau, first.share_to_teacher, first.accuracy) == (0.0, 0.0, pytest.approx(4 / 6))
    assert first.mean_latency_s == pytest.approx(0.035)
    assert last.tau > max(CONF) and last.share_to_teacher == 1.0 and last.accuracy == pytest.approx(5 / 6)
    assert last.mean_latency_s == pytest.approx(0.095)  # the student still runs first
    assert not route(CONF, first.tau).any() and route(CONF, last.tau).all()


def test_constant_confidence_and_zero_confidence():
    points = sweep([0.8, 0.8, 0.8], [1, 0, 1], [1, 1, 1], 1.0, 2.0)
    assert [p.tau for p in points] == [0.0, 0.8, np.nextafter(0.8, 1.0)]
    assert [p.share_to_teacher for p in points] == [0.0, 0.0, 1.0]
    # a confidence of exactly 0 is the tau = 0 point itself, and nothing has confidence < 0
    points = sweep([0.0, 1.0], [0, 1], [1, 1], 1.0, 1.0)
    assert [p.tau for p in points] == [0.0, 1.0, np.nextafter(1.0, 2.0)]
    assert [p.share_to_teacher for p in points] == [0.0, 0.5, 1.0]
    assert [p.accuracy for p in points] == [0.5, 1.0, 1.0]
    assert [p.pareto for p in points] == [True, True, False]


def test_per_question_latencies():
    # teacher latency per question: q0 1, q1 5; deferring q1 (conf 0.2) costs 5, then q0 (conf 0.4) 1 more
    points = sweep([0.4, 0.2], [1, 0], [1, 1], [0.5, 0.5], [1.0, 5.0])
    assert [p.mean_latency_s for p in points] == pytest.approx([0.5, 0.5, 3.0, 3.5])


def test_pareto_marks_ties_and_dominance():
    # q0 has teacher latency 0: deferring it is free, and here it also fixes the answer
    points = sweep([0.3, 0.6, 0.9], [0, 1, 0], [1, 0, 1], 1.0, [0.0, 2.0, 2.0])
    # tau 0 / 0.3: hits 1, latency 1; tau 0.6: defers q0 -> hits 2, latency 1 (same cost, better)
    # tau 0.9: + q1 -> hits 1, latency 5/3; above: + q2 -> hits 2, latency 7/3
    assert [p.share_to_teacher * 3 for p in points] == pytest.approx([0, 0, 1, 2, 3])
    assert [p.accuracy for p in points] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1 / 3, 2 / 3])
    assert [p.mean_latency_s for p in points] == pytest.approx([1, 1, 1, 5 / 3, 7 / 3])
    assert [p.pareto for p in points] == [False, False, True, False, False]


def test_choose_threshold_cheapest_within_gap():
    points = sweep(CONF, STUDENT_OK, TEACHER_OK, 1.0, 3.0)
    teacher_accuracy = 5 / 6
    # gap 0: accuracy >= 5/6 first reached at tau 0.6 (latency 2.0)
    assert choose_threshold(points, teacher_accuracy, 0.0).tau == 0.6
    # the perfect cascade is the only point at 1.0
    assert choose_threshold(points, 1.0, 0.0).tau == 0.7
    # gap 1/6: the student alone suffices; tau 0 and 0.5 tie on latency and accuracy -> the lower tau
    assert choose_threshold(points, teacher_accuracy, 1 / 6).tau == 0.0


def test_choose_threshold_prefers_accuracy_on_equal_cost():
    points = sweep([0.3, 0.6, 0.9], [0, 1, 0], [1, 0, 1], 1.0, [0.0, 2.0, 2.0])
    # tau 0, 0.3 and 0.6 all cost 1 s; tau 0.6 is more accurate
    assert choose_threshold(points, 1 / 3, 0.0).tau == 0.6


def test_choose_threshold_none_and_round_off():
    points = [
        CascadePoint(tau=0.0, accuracy=0.47, share_to_teacher=0.0, mean_latency_s=1.0, pareto=True),
        CascadePoint(tau=1.1, accuracy=0.52, share_to_teacher=1.0, mean_latency_s=2.0, pareto=True),
    ]
    # 0.52 - 0.05 = 0.47000000000000003 in floating point; the 0.47 point must still qualify
    assert choose_threshold(points, 0.52, 0.05).tau == 0.0
    assert choose_threshold(points, 0.52, 0.04).tau == 1.1
    assert choose_threshold(points, 0.6, 0.0) is None
    with pytest.raises(ValueError, match="no cascade points"):
        choose_threshold([], 0.9, 0.01)
    with pytest.raises(ValueError, match="target_gap must lie in"):
        choose_threshold(points, 0.9, -0.1)


def test_route():
    conf = np.array([[0.2, 0.5], [0.7, 0.49]])
    assert route(conf, 0.5).tolist() == [[True, False], [False, True]]
    assert not route(conf, 0.0).any()
    with pytest.raises(ValueError, match="tau must be a number"):
        route(conf, float("nan"))


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="student_conf must be a non-empty"):
        sweep([], [], [], 1.0, 1.0)
    with pytest.raises(ValueError, match=r"confidences in \[0, 1\]"):
        sweep([1.5], [1], [1], 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher_correct must have shape"):
        sweep([0.5, 0.6], [1, 1], [1], 1.0, 1.0)
    with pytest.raises(ValueError, match="student_correct must hold booleans"):
        sweep([0.5], [2], [1], 1.0, 1.0)
    with pytest.raises(ValueError, match="teacher_latency_s must be one number or shape"):
        sweep([0.5, 0.6], [1, 1], [1, 1], 1.0, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite and non-negative"):
        sweep([0.5], [1], [1], -1.0, 1.0)


def _brute_force(conf, s_ok, t_ok, s_lat, t_lat):
    taus = sorted({0.0, *conf.tolist(), float(np.nextafter(conf.max(), np.inf))})
    rows = []
    for tau in taus:
        defer = conf < tau
        rows.append((tau, np.mean(np.where(defer, t_ok, s_ok)), int(defer.sum()), np.mean(s_lat + defer * t_lat)))
    pareto = [
        not any(a2 >= a1 and l2 <= l1 + 1e-12 and (a2 > a1 or l2 < l1 - 1e-12) for _, a2, _, l2 in rows)
        for _, a1, _, l1 in rows
    ]
    return rows, pareto


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 300
    conf = np.round(rng.uniform(0.25, 1.0, n), 2)  # rounding makes many ties
    s_ok = rng.random(n) < 0.4 + 0.6 * conf  # confident answers are more often right
    t_ok = rng.random(n) < 0.9
    s_lat = rng.uniform(0.02, 0.05, n)
    t_lat = rng.uniform(0.05, 0.08, n) if seed else 0.06
    points = sweep(conf, s_ok, t_ok, s_lat, t_lat)
    rows, pareto = _brute_force(conf, s_ok, t_ok, s_lat, np.broadcast_to(t_lat, n))
    assert len(points) == len(rows)
    for point, (tau, acc, calls, lat), front in zip(points, rows, pareto, strict=True):
        assert point.tau == tau
        assert point.accuracy == pytest.approx(acc, abs=1e-12)
        assert point.share_to_teacher == pytest.approx(calls / n, abs=1e-12)
        assert point.mean_latency_s == pytest.approx(lat, rel=1e-9)
        assert point.pareto is front
    assert any(pareto) and not all(pareto)


def test_sweep_scales_to_50k():
    rng = np.random.default_rng(3)
    n = 50_000
    conf = rng.random(n)
    points = sweep(conf, rng.random(n) < 0.92, rng.random(n) < 0.95, 0.035, 0.060)
    assert len(points) == np.unique(conf).size + 2
    assert [round(p.share_to_teacher * n) for p in points[1:]] == list(range(n + 1))  # distinct floats: one more each


@pytest.mark.parametrize("seed", [0, 1])
def test_cascade_latency_is_never_below_the_students_with_one_statistic(seed):
    # Both latencies are one statistic (a median) of timings: every tau costs at least the student.
    rng = np.random.default_rng(seed)
    n = 500
    student_median, teacher_median = float(rng.uniform(0.001, 0.01)), float(rng.uniform(0.0005, 0.05))
    points = sweep(rng.random(n), rng.random(n) < 0.7, rng.random(n) < 0.9, student_median, teacher_median)
    for p in points:
        assert p.mean_latency_s >= student_median
        assert p.mean_latency_s == pytest.approx(student_median + p.share_to_teacher * teacher_median, rel=1e-12)


def test_extra_taus_are_evaluated_like_observed_ones():
    # A threshold chosen on another split (0.65 lies between observed confidences) gets its own point.
    points = sweep(CONF, STUDENT_OK, TEACHER_OK, 1.0, 3.0, extra_taus=[0.65])
    extra = next(p for p in points if p.tau == 0.65)
    # Deferred: the confidences below 0.65 (0.5, 0.5, 0.6), all right for the teacher; the rest right for
    # the student: 6 of 6, the same outcome as tau 0.7 since no confidence lies in [0.65, 0.7).
    assert (extra.share_to_teacher, extra.accuracy, extra.mean_latency_s) == (3 / 6, 1.0, 1.0 + 3 * 3.0 / 6)
    assert len(points) == len(sweep(CONF, STUDENT_OK, TEACHER_OK, 1.0, 3.0)) + 1
    with pytest.raises(ValueError, match="extra_taus"):
        sweep(CONF, STUDENT_OK, TEACHER_OK, 1.0, 3.0, extra_taus=[float("nan")])
