"""The run report's training section: which loss terms to draw, smoothed, and the validation accuracy.

In: training_curves query rows (model_role, step, loss, ce, kd, val_accuracy) and the run's config (its
alpha and temperature). Out: per model the loss series worth drawing, smoothed by an exponential moving
average, and the validation accuracy per model as points or table rows. Reads no tables itself.

A term is drawn only where it counts: the hard- and pseudo-label students are trained with alpha = 1, so a
KD value (computed for the record when there is one) has weight 0 and is left out, and their loss then
equals their CE, so one line is drawn instead of three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kdflow.train import roles

Row = dict[str, Any]
# Fewer validation points than this per model read better as a table than as a line.
VAL_TABLE_MAX_POINTS = 6
# The EMA spans about a tenth of the steps (at least 1 = no smoothing, at most 50 steps).
SMOOTHING_SHARE, MAX_SPAN = 10, 50


@dataclass(frozen=True)
class Series:
    """One line of a loss panel: its label, steps and raw values [n], and the EMA of the values [n]."""

    label: str
    steps: list[int]
    raw: list[float]
    smoothed: list[float]
    span: int


def ema(values: Sequence[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average with smoothing factor 2 / (span + 1), as pandas'
    `ewm(span=span, adjust=True)` computes it: s_t = b s_(t-1) + (1 - b) x_t, shown as s_t / (1 - b^t)
    with b = 1 - 2 / (span + 1), so early points are not pulled towards 0. span 1 returns the values."""
    beta = 1 - 2 / (span + 1)
    out, s = [], 0.0
    for t, x in enumerate(values, start=1):
        s = beta * s + (1 - beta) * x
        out.append(s / (1 - beta**t))
    return out


def smoothing_span(n_steps: int) -> int:
    return max(1, min(MAX_SPAN, n_steps // SMOOTHING_SHARE))


def loss_weights(role: str, run_config: Mapping[str, Any] | None) -> dict[str, float] | None:
    """{'ce': alpha, 'kd': (1 - alpha) T^2, 'kd_unlabeled': T^2}: the weight of each term in the training loss
    of a student of `role`, the KD term's on a labeled and on an unlabeled question (the hard-label roles of
    kdflow.train.roles always have alpha = 1 and no KD term); None when the run's config is unknown."""
    found = roles.role(role)
    if found is not None and found.hard_label:
        return {"ce": 1.0, "kd": 0.0}
    training = (run_config or {}).get("training")
    if not training or "alpha" not in training:
        return None
    alpha, temperature = float(training["alpha"]), float(training.get("temperature", 1.0))
    return {"ce": alpha, "kd": (1 - alpha) * temperature**2, "kd_unlabeled": temperature**2}


def loss_series(rows: Sequence[Row], weights: Mapping[str, float] | None) -> list[Series]:
    """The lines of one model's loss panel: terms of weight 0 and terms missing or zero throughout are
    dropped; with one term left the total is that term, drawn once; with unknown weights every term
    that has values is drawn."""
    def values(name: str) -> tuple[list[int], list[float]]:
        kept = [r for r in rows if r[name] is not None]
        return [int(r["step"]) for r in kept], [float(r[name]) for r in kept]

    terms = []
    for name, title in (("ce", "CE on the gold answer"), ("kd", "KD term")):
        steps, raw = values(name)
        weight = None if weights is None else weights.get(name)
        if raw and any(v != 0 for v in raw) and (weight is None or weight > 0):
            terms.append((name, title + _weight_text(name, weights), steps, raw))
    steps, raw = values("loss")
    if len(terms) == 1 and weights is not None:
        return [_series(f"loss = {terms[0][1]}", steps, raw)]
    return ([_series("total loss", steps, raw)] if raw else []) + [_series(t[1], t[2], t[3]) for t in terms]


def _weight_text(name: str, weights: Mapping[str, float] | None) -> str:
    if weights is None:
        return ""
    unlabeled = weights.get(f"{name}_unlabeled", weights[name])
    also = f"; {unlabeled:.3g} without a gold answer" if unlabeled != weights[name] else ""
    return f" (weight {weights[name]:.3g}{also})"


def _series(label: str, steps: list[int], raw: list[float]) -> Series:
    span = smoothing_span(len(raw))
    return Series(label, steps, raw, ema(raw, span), span)


def validation_points(rows: Sequence[Row]) -> dict[str, list[tuple[int, float]]]:
    """{model role: [(step, validation accuracy)]} for the models that were validated during training."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["val_accuracy"] is not None:
            out.setdefault(r["model_role"], []).append((int(r["step"]), float(r["val_accuracy"])))
    return out


def validation_as_table(points: Mapping[str, list[tuple[int, float]]]) -> bool:
    """Too few points per model for a line to say anything: show them as a table."""
    return bool(points) and max(len(p) for p in points.values()) < VAL_TABLE_MAX_POINTS
