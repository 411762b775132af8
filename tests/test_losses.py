"""kdflow.train.losses against an independent float64 reference, hand-computed values and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdflow.divergences import DIVERGENCES, REVERSE_KL_LOG_FLOOR
from kdflow.train.losses import distillation_loss, kd_divergence

KINDS = list(DIVERGENCES)


# ---------------------------------------------------------------- reference (numpy loops, float64)


def _ref_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _ref_reverse_kl(p, q, beta) -> float:
    floor = math.exp(REVERSE_KL_LOG_FLOOR)
    return _ref_kl(list(q), [max(pi, floor) for pi in p])


def _ref_jsd(p, q, beta) -> float:
    m = beta * p + (1 - beta) * q
    return beta * _ref_kl(list(p), list(m)) + (1 - beta) * _ref_kl(list(q), list(m))


# The independent reference of every divergence in kdflow.divergences (teacher p, student q, both float64).
REFERENCES = {"forward_kl": lambda p, q, beta: _ref_kl(list(p), list(q)), "reverse_kl": _ref_reverse_kl,
              "jsd": _ref_jsd}


def ref_divergence(logits, probs, mask, kind, temperature=1.0, beta=0.5) -> np.ndarray:
    out = []
    for row in range(logits.shape[0]):
        real = [k for k in range(logits.shape[1]) if mask[row, k]]
        q = _ref_softmax(np.array([logits[row, k] for k in real]) / temperature)
        p = np.array([probs[row, k] for k in real]) ** (1.0 / temperature)
        p = p / p.sum()
        out.append(REFERENCES[kind](p, q, beta))
    return np.array(out)


def test_every_divergence_has_a_reference():
    """A divergence added to the table is tested against a reference here, or this fails."""
    assert set(REFERENCES) == set(DIVERGENCES)


def ref_ce(logits, gold, mask) -> np.ndarray:
    out = []
    for row in range(logits.shape[0]):
        real = [k for k in range(logits.shape[1]) if mask[row, k]]
        q = _ref_softmax(np.array([logits[row, k] for k in real]))
        out.append(-math.log(q[real.index(int(gold[row]))]))
    return np.array(out)


def random_batch(seed: int, batch: int = 7, width: int = 5):
    """Rows with 2..width real options; padded logits are garbage, padded teacher probs are 0."""
    rng = np.random.default_rng(seed)
    n_options = rng.integers(2, width + 1, size=batch)
    mask = np.arange(width)[None, :] < n_options[:, None]
    logits = rng.normal(0.0, 3.0, size=(batch, width))
    logits[~mask] = rng.choice([1e6, -1e6, 123.0], size=(~mask).sum())
    probs = np.zeros((batch, width))
    for row, n in enumerate(n_options):
        probs[row, :n] = rng.dirichlet(np.full(n, 0.7))
    gold = np.array([rng.integers(0, n) for n in n_options])
    return logits, probs, gold, mask


def as_torch(logits, probs, gold, mask, dtype=torch.float64):
    return (
        torch.tensor(logits, dtype=dtype),
        torch.tensor(probs, dtype=dtype),
        torch.tensor(gold, dtype=torch.long),
        torch.tensor(mask, dtype=torch.bool),
    )


# ---------------------------------------------------------------- kd_divergence


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_divergence_matches_reference(kind, temperature):
    logits, probs, gold, mask = random_batch(seed=1)
    s, t, _, m = as_torch(logits, probs, gold, mask)
    got = kd_divergence(s, t, m, kind=kind, temperature=temperature, beta=0.3)
    want = ref_divergence(logits, probs, mask, kind, temperature, beta=0.3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-9)


def test_pinned_two_option_values():
    # student logits [0, 0] -> q = [1/2, 1/2]; teacher p = [3/4, 1/4]; third column is padding.
    # forward  KL(p||q) = 3/4 ln(3/2) + 1/4 ln(1/2)              = 0.304099 - 0.173287 = 0.130812
    # reverse  KL(q||p) = 1/2 ln(2/3) + 1/2 ln(2)                = -0.202733 + 0.346574 = 0.143841
    # jsd, beta = 1/2: m = [5/8, 3/8]
    #   KL(p||m) = 3/4 ln(6/5) + 1/4 ln(2/3) = 0.136741 - 0.101366 = 0.035375
    #   KL(q||m) = 1/2 ln(4/5) + 1/2 ln(4/3) = -0.111572 + 0.143841 = 0.032269
    #   jsd = (0.035375 + 0.032269) / 2 = 0.033822
    s = torch.tensor([[0.0, 0.0, 9.0]], dtype=torch.float64)
    t = torch.tensor([[0.75, 0.25, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, False]])
    assert kd_divergence(s, t, m, kind="forward_kl").item() == pytest.approx(0.130812, abs=1e-6)
    assert kd_divergence(s, t, m, kind="reverse_kl").item() == pytest.approx(0.143841, abs=1e-6)
    assert kd_divergence(s, t, m, kind="jsd", beta=0.5).item() == pytest.approx(0.033822, abs=1e-6)
    # CE of gold 0 is ln 2 = 0.693147; total = 0.5 * 0.693147 + 0.5 * 0.130812 = 0.411980
    parts = distillation_loss(s, t, torch.tensor([0]), m, alpha=0.5, temperature=1.0)
    assert parts.ce.item() == pytest.approx(0.693147, abs=1e-6)
    assert parts.kd.item() == pytest.approx(0.130812, abs=1e-6)
    assert parts.total.item() == pytest.approx(0.411980, abs=1e-6)


def test_temperature_softens_teacher_as_power():
    # T = 2: p^(1/2) = [0.866025, 0.5] / 1.366025 = [0.633975, 0.366025]; student [0, 0] -> [1/2, 1/2]
    # KL = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) = 0.150506 - 0.114165 = 0.036341
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.75, 0.25]], dtype=torch.float64)
    m = torch.ones(1, 2, dtype=torch.bool)
    assert kd_divergence(s, t, m, temperature=2.0).item() == pytest.approx(0.036341, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_identical_distributions_give_zero(kind, temperature):
    logits, _, _, mask = random_batch(seed=2)
    s = torch.tensor(logits)
    m = torch.tensor(mask)
    teacher = torch.softmax(s.masked_fill(~m, -math.inf), dim=-1)  # same distribution, zeros at padding
    got = kd_divergence(s, teacher, m, kind=kind, temperature=temperature)
    np.testing.assert_allclose(got.numpy(), 0.0, atol=1e-12)


def test_reverse_and_forward_differ_on_asymmetric_example():
    s = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.bool)
    forward = kd_divergence(s, t, m, kind="forward_kl").item()
    reverse = kd_divergence(s, t, m, kind="reverse_kl").item()
    assert forward == pytest.approx(ref_divergence(s.numpy(), t.numpy(), m.numpy(), "forward_kl")[0], rel=1e-9)
    assert reverse == pytest.approx(ref_divergence(s.numpy(), t.numpy(), m.numpy(), "reverse_kl")[0], rel=1e-9)
    assert abs(forward - reverse) > 0.1


def test_jsd_is_symmetric_at_half():
    logits, probs, _, mask = random_batch(seed=3)
    m = torch.tensor(mask)
    s = torch.tensor(logits)
    t = torch.tensor(probs)
    s_as_probs = torch.softmax(s.masked_fill(~m, -math.inf), dim=-1)
    t_as_logits = torch.log(t)  # -inf at padding, ignored there
    forward = kd_divergence(s, t, m, kind="jsd", beta=0.5)
    swapped = kd_divergence(t_as_logits, s_as_probs, m, kind="jsd", beta=0.5)
    np.testing.assert_allclose(forward.numpy(), swapped.numpy(), rtol=1e-9, atol=1e-12)
    asymmetric = kd_divergence(t_as_logits, s_as_probs, m, kind="jsd", beta=0.2)
    assert not torch.allclose(kd_divergence(s, t, m, kind="jsd", beta=0.2), asymmetric)


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_jsd_bounded_by_binary_entropy(beta):
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # log 2 at beta = 1/2
    # disjoint supports reach the bound
    s = torch.tensor([[-200.0, 200.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    m = torch.ones(1, 2, dtype=torch.bool)
    extreme = kd_divergence(s, t, m, kind="jsd", beta=beta).item()
    assert extreme == pytest.approx(bound, abs=1e-9)
    logits, probs, _, mask = random_batch(seed=4, batch=50)
    values = kd_divergence(torch.tensor(logits), torch.tensor(probs), torch.tensor(mask), kind="jsd", beta=beta)
    assert bool((values >= -1e-12).all()) and bool((values <= bound + 1e-12).all())


@pytest.mark.parametrize("kind", KINDS)
def test_padded_logits_change_nothing(kind):
    logits, probs, gold, mask = random_batch(seed=5)
    s1, t, g, m = as_torch(logits, probs, gold, mask)
    s2 = s1.clone()
    s2[~m] = torch.tensor([math.nan, math.inf, -math.inf, 1e300] * 20, dtype=torch.float64)[: int((~m).sum())]
    results = []
    for s in (s1, s2):
        s = s.clone().requires_grad_(True)
        parts = distillation_loss(s, t, g, m, alpha=0.3, temperature=2.0, kind=kind)
        parts.total.backward()
        results.append((parts.total.detach(), parts.kd.detach(), s.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=0, atol=0)
    assert bool((results[1][2][~m] == 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    logits, probs, gold, mask = random_batch(seed=6, batch=4, width=4)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kd_divergence(x, t, m, kind=kind, temperature=1.7, beta=0.4), (s,), eps=1e-6, atol=1e-6
    )
    assert torch.autograd.gradcheck(
        lambda x: distillation_loss(x, t, g, m, alpha=0.4, temperature=1.7, kind=kind, beta=0.4).total,
        (s,),
        eps=1e-6,
        atol=1e-6,
    )


# ---------------------------------------------------------------- distillation_loss


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.2, 3.0), (0.7, 0.5)])
def test_loss_matches_reference_with_t_squared(kind, alpha, temperature):
    logits, probs, gold, mask = random_batch(seed=7)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    parts = distillation_loss(s, t, g, m, alpha=alpha, temperature=temperature, kind=kind, beta=0.5)
    ce = ref_ce(logits, gold, mask).mean()
    kd = ref_divergence(logits, probs, mask, kind, temperature, beta=0.5).mean()
    assert parts.ce.item() == pytest.approx(ce, rel=1e-6)
    assert parts.kd.item() == pytest.approx(kd, rel=1e-6)
    assert parts.total.item() == pytest.approx(alpha * ce + (1 - alpha) * temperature**2 * kd, rel=1e-6)


def test_t_squared_scaling_of_kd_term():
    logits, probs, gold, mask = random_batch(seed=8)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    for temperature in (1.0, 2.0, 4.0):
        parts = distillation_loss(s, t, g, m, alpha=0.0, temperature=temperature)
        mean_kd = kd_divergence(s, t, m, temperature=temperature).mean()
        assert parts.total.item() == pytest.approx(temperature**2 * mean_kd.item(), rel=1e-12)
        assert parts.kd.item() == pytest.approx(mean_kd.item(), rel=1e-12)


def test_alpha_one_needs_no_teacher_and_ignores_it():
    logits, probs, gold, mask = random_batch(seed=9)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    without = distillation_loss(s, None, g, m, alpha=1.0, temperature=2.0)
    assert without.kd is None
    assert without.total.item() == pytest.approx(ref_ce(logits, gold, mask).mean(), rel=1e-9)
    other_teacher = torch.where(m, torch.rand_like(t), torch.zeros_like(t))  # renormalised inside
    with_teacher = distillation_loss(s, other_teacher, g, m, alpha=1.0, temperature=2.0)
    assert with_teacher.total.item() == without.total.item()
    assert with_teacher.kd is not None and with_teacher.kd.item() > 0


def test_alpha_zero_ignores_gold():
    logits, probs, gold, mask = random_batch(seed=10)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    first = distillation_loss(s, t, g, m, alpha=0.0, temperature=1.5)
    zeros = distillation_loss(s, t, torch.zeros_like(g), m, alpha=0.0, temperature=1.5)
    assert first.total.item() == zeros.total.item()
    assert first.ce.item() != zeros.ce.item()
    assert first.total.item() == pytest.approx(1.5**2 * first.kd.item(), rel=1e-12)


def test_zero_weight_term_cannot_make_total_nan():
    # student -inf at the gold option (CE = inf) and at an option the teacher likes (forward KL = inf)
    s = torch.tensor([[-math.inf, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.bool)
    kd_only = distillation_loss(s, t, torch.tensor([0]), m, alpha=0.0, temperature=1.0)
    assert kd_only.ce.item() == math.inf and math.isfinite(kd_only.total.item())
    teacher = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    ce_only = distillation_loss(s, teacher, torch.tensor([1]), m, alpha=1.0, temperature=1.0)
    assert ce_only.kd.item() == math.inf and math.isfinite(ce_only.total.item())
    (kd_only.total + ce_only.total).backward()
    assert bool(torch.isfinite(s.grad).all())


def test_sample_mask_averages_included_rows_only():
    logits, probs, gold, mask = random_batch(seed=11)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    keep = torch.tensor([True, False, True, True, False, False, True])
    masked = distillation_loss(s, t, g, m, alpha=0.5, temperature=2.0, sample_mask=keep)
    subset = distillation_loss(s[keep], t[keep], g[keep], m[keep], alpha=0.5, temperature=2.0)
    assert masked.total.item() == pytest.approx(subset.total.item(), rel=1e-12)
    assert masked.ce.item() == pytest.approx(subset.ce.item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_excluded_row_without_teacher_mass_leaves_other_rows_intact(kind):
    logits, probs, gold, mask = random_batch(seed=14, batch=4)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    t[2] = 0.0  # a question with no teacher label yet
    keep = torch.tensor([True, True, False, True])
    s.requires_grad_(True)
    parts = distillation_loss(s, t, g, m, alpha=0.5, temperature=2.0, kind=kind, sample_mask=keep)
    parts.total.backward()
    subset = distillation_loss(s[keep], t[keep], g[keep], m[keep], alpha=0.5, temperature=2.0, kind=kind)
    assert parts.total.item() == pytest.approx(subset.total.item(), rel=1e-12)
    assert bool(torch.isfinite(s.grad).all()) and bool((s.grad[2] == 0).all())


def test_all_masked_batch_returns_zero_with_grad():
    logits, probs, gold, mask = random_batch(seed=12, batch=3)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    m[1] = False  # a pure padding row with an ignore-style gold
    g[1] = -100
    s.requires_grad_(True)
    parts = distillation_loss(s, t, g, m, alpha=0.5, temperature=2.0, sample_mask=torch.zeros(3, dtype=torch.bool))
    assert parts.total.item() == 0.0 and parts.ce.item() == 0.0 and parts.kd.item() == 0.0
    assert parts.total.requires_grad
    parts.total.backward()
    assert bool((s.grad == 0).all())


# ---------------------------------------------------------------- unlabeled questions (CE weight 0)


def test_pinned_batch_with_an_unlabeled_question():
    # Row 0, labeled: q = [1/4, 3/4], gold 1: CE = ln(4/3) = 0.287682; p = [1/2, 1/2]: KL = 0.143841.
    # Row 1, unlabeled: q = [1/2, 1/2], p = [0.8, 0.2]: KL = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.192745.
    # alpha_0 = 0.5, alpha_1 = 0 (no gold answer: the KD term alone, with the whole weight):
    # total = (0.5 * 0.287682 + 0.5 * 0.143841 + 1 * 0.192745) / 2 = 0.204253
    s = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.5, 0.5], [0.8, 0.2]], dtype=torch.float64)
    m = torch.ones(2, 2, dtype=torch.bool)
    parts = distillation_loss(s, t, torch.tensor([1, -1]), m, alpha=0.5, temperature=1.0,
                              labeled=torch.tensor([True, False]))
    assert parts.ce.item() == pytest.approx(0.287682, abs=1e-6)  # the mean over the labeled question
    assert parts.kd.item() == pytest.approx((0.143841 + 0.192745) / 2, abs=1e-6)
    assert parts.total.item() == pytest.approx(0.204253, abs=1e-6)
    assert parts.n_labeled.item() == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.2, 3.0), (1.0, 2.0)])
def test_an_unlabeled_question_learns_from_its_kd_term_alone(kind, alpha, temperature):
    logits, probs, gold, mask = random_batch(seed=15)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    unlabeled = torch.tensor([False, True, False, False, True, False, True])
    s.requires_grad_(True)
    parts = distillation_loss(s, t, g, m, alpha=alpha, temperature=temperature, kind=kind, labeled=~unlabeled)
    parts.total.backward()
    # The gradient at an unlabeled row's logits is that of T^2 KD_i / n exactly (at alpha = 1, none).
    kd_only = s.detach().clone().requires_grad_(True)
    weight = (alpha < 1) * temperature**2 / len(g)
    (weight * kd_divergence(kd_only, t, m, kind=kind, temperature=temperature)[unlabeled].sum()).backward()
    torch.testing.assert_close(s.grad[unlabeled], kd_only.grad[unlabeled], rtol=1e-12, atol=1e-15)
    # Whatever gold an unlabeled row carries changes nothing.
    other = distillation_loss(s, t, torch.where(unlabeled, -1, g), m, alpha=alpha, temperature=temperature,
                              kind=kind, labeled=~unlabeled)
    assert other.total.item() == parts.total.item() and other.ce.item() == parts.ce.item()
    # The CE term is the labeled rows' CE summed over all n rows; ce itself is their mean. The KD term
    # weighs a labeled row's divergence by 1 - alpha and an unlabeled row's by 1.
    ce = ref_ce(logits, gold, mask)[~unlabeled.numpy()]
    divergence = ref_divergence(logits, probs, mask, kind, temperature)
    kd_weights = np.where(unlabeled.numpy(), 1.0, 1 - alpha) * (alpha < 1)
    assert parts.ce.item() == pytest.approx(ce.mean(), rel=1e-9)
    assert parts.kd.item() == pytest.approx(divergence.mean(), rel=1e-9)
    assert parts.total.item() == pytest.approx(
        (alpha * ce.sum() + temperature**2 * (kd_weights * divergence).sum()) / len(g), rel=1e-9)


def test_all_labeled_is_the_plain_loss_and_all_unlabeled_is_the_kd_term():
    logits, probs, gold, mask = random_batch(seed=16)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    everyone = torch.ones(len(g), dtype=torch.bool)
    plain = distillation_loss(s, t, g, m, alpha=0.3, temperature=2.0)
    labeled = distillation_loss(s, t, g, m, alpha=0.3, temperature=2.0, labeled=everyone)
    assert labeled.total.item() == plain.total.item() and labeled.ce.item() == plain.ce.item()
    s.requires_grad_(True)
    none = distillation_loss(s, t, torch.full_like(g, -1), m, alpha=0.3, temperature=2.0, labeled=~everyone)
    assert none.total.item() == pytest.approx(4.0 * none.kd.item(), rel=1e-12)
    assert none.ce.item() == 0.0 and none.n_labeled.item() == 0
    none.total.backward()
    assert bool(torch.isfinite(s.grad).all())
    # alpha = 1 (the hard-label students): no target at all, a zero loss that still backpropagates.
    hard = distillation_loss(s, None, torch.full_like(g, -1), m, alpha=1.0, temperature=1.0, labeled=~everyone)
    assert hard.total.item() == 0.0 and hard.total.requires_grad


def test_micro_batches_with_unlabeled_questions_average_to_their_union():
    logits, probs, gold, mask = random_batch(seed=17, batch=8)
    s, t, g, m = as_torch(logits, probs, gold, mask)
    labeled = torch.tensor([True, True, True, False, False, False, True, False])
    whole = distillation_loss(s, t, g, m, alpha=0.6, temperature=1.5, labeled=labeled)
    halves = [distillation_loss(s[i:i + 4], t[i:i + 4], g[i:i + 4], m[i:i + 4], alpha=0.6, temperature=1.5,
                                labeled=labeled[i:i + 4]) for i in (0, 4)]
    assert whole.total.item() == pytest.approx(sum(h.total.item() for h in halves) / 2, rel=1e-12)
    weighted_ce = sum(h.ce.item() * h.n_labeled.item() for h in halves) / sum(h.n_labeled.item() for h in halves)
    assert whole.ce.item() == pytest.approx(weighted_ce, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_with_extreme_logits_and_zero_teacher_probs(kind):
    big = torch.finfo(torch.float32).max
    s = torch.tensor(
        [
            [1e30, -1e30, 0.0, math.nan],  # huge real logits, NaN padding
            [-math.inf, 5.0, 4.0, math.inf],  # -inf where the teacher has zero mass, +inf padding
            [big, -big, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float32,
        requires_grad=True,
    )
    t = torch.tensor(
        [[0.0, 1.0, 0.0, 0.0], [0.0, 0.6, 0.4, 0.0], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]],
        dtype=torch.float32,
    )
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    divergence = kd_divergence(s, t, m, kind=kind, temperature=2.0)
    assert bool(torch.isfinite(divergence).all()), divergence
    parts = distillation_loss(s, t, torch.tensor([0, 1, 0, 0]), m, alpha=0.5, temperature=2.0, kind=kind)
    assert bool(torch.isfinite(parts.total))
    parts.total.backward()
    assert bool(torch.isfinite(s.grad).all()), s.grad


def test_forward_kl_treats_zero_teacher_probs_as_zero_contribution():
    # p = [1, 0] (0 * log 0 = 0): KL(p||q) = -log q_0 = -log(1/(1+e)) = log(1 + e) = 1.313262
    s = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    m = torch.ones(1, 2, dtype=torch.bool)
    assert kd_divergence(s, t, m).item() == pytest.approx(math.log(1 + math.e), abs=1e-9)


def test_reverse_kl_floors_zero_teacher_probs():
    # q = [1/2, 1/2], p = [1, 0] -> KL(q||p) floored: 1/2 ln(1/2) + 1/2 (ln(1/2) - FLOOR) = -ln 2 - FLOOR / 2
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    m = torch.ones(1, 2, dtype=torch.bool)
    got = kd_divergence(s, t, m, kind="reverse_kl").item()
    assert got == pytest.approx(-math.log(2) - REVERSE_KL_LOG_FLOOR / 2, rel=1e-12)
    assert math.isfinite(got) and got > 30


def test_low_precision_inputs_are_computed_in_float32():
    logits, probs, gold, mask = random_batch(seed=13)
    s, t, g, m = as_torch(logits, probs, gold, mask, dtype=torch.bfloat16)
    parts = distillation_loss(s, t, g, m, alpha=0.5, temperature=1.0)
    assert parts.total.dtype == torch.float32
    reference = distillation_loss(s.double(), t.double(), g, m, alpha=0.5, temperature=1.0)
    assert parts.total.item() == pytest.approx(reference.total.item(), rel=1e-5)


# ---------------------------------------------------------------- input validation


def _small():
    s = torch.zeros(2, 3)
    t = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    m = torch.tensor([[True, True, False], [True, True, True]])
    return s, t, torch.tensor([0, 2]), m


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(kind="kl"), "kind must be one of"),
        (dict(kind="jsd", beta=0.0), "0 < beta < 1"),
        (dict(kind="jsd", beta=1.0), "0 < beta < 1"),
        (dict(temperature=0.0), "temperature must be > 0"),
    ],
)
def test_divergence_rejects_bad_options(change, message):
    s, t, _, m = _small()
    with pytest.raises(ValueError, match=message):
        kd_divergence(s, t, m, **change)


def test_divergence_rejects_bad_shapes():
    s, t, _, m = _small()
    with pytest.raises(ValueError, match="option_mask must be a bool tensor"):
        kd_divergence(s, t, m.long())
    with pytest.raises(ValueError, match="teacher_probs must be a float tensor"):
        kd_divergence(s, t[:, :2], m)
    with pytest.raises(ValueError, match="student_logits must be a float tensor"):
        kd_divergence(s[0], t, m)


def test_loss_rejects_bad_inputs():
    s, t, g, m = _small()
    with pytest.raises(ValueError, match="alpha must be in"):
        distillation_loss(s, t, g, m, alpha=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="teacher_probs is required"):
        distillation_loss(s, None, g, m, alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(s, None, g, m, alpha=1.0, temperature=-1.0)
    with pytest.raises(ValueError, match=r"rows \[0\] do not"):
        distillation_loss(s, t, torch.tensor([2, 2]), m, alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="gold must be an integer tensor"):
        distillation_loss(s, t, g.float(), m, alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="sample_mask must be a bool tensor"):
        distillation_loss(s, t, g, m, alpha=0.5, temperature=1.0, sample_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labeled must be a bool tensor"):
        distillation_loss(s, t, g, m, alpha=0.5, temperature=1.0, labeled=torch.ones(2))
    with pytest.raises(ValueError, match=r"rows \[1\] do not"):  # a labeled row's gold must be an option
        distillation_loss(s, t, torch.tensor([0, -1]), m, alpha=0.5, temperature=1.0,
                          labeled=torch.tensor([True, True]))
    # an excluded row may carry a gold that points nowhere
    keep = torch.tensor([False, True])
    parts = distillation_loss(s, t, torch.tensor([-100, 2]), m, alpha=0.5, temperature=1.0, sample_mask=keep)
    assert math.isfinite(parts.total.item())
