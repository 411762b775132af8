"""The ensemble teacher: the validated labels of several teachers combined per question.

Labels are distributions over a question's options, so teachers with different tokenizers (or backends)
combine directly. Two rules, each with optional weights w_i (normalised over the members that have a
validated label for the question):

- mean:      p(k) = sum_i w_i p_i(k)                                   (linear opinion pool)
- geometric: p(k) = prod_i p_i(k)^w_i / sum_j prod_i p_i(j)^w_i        (log-linear pool; an option
             some member gives probability 0 gets 0)

A member's label quarantined by its gate is left out of that question's combination; a question no
member has a validated label for gets no ensemble label. The ensemble's key hashes the members' keys
(in order), the rule and the weights, so changing any of them is a new teacher; its labels are stored
like any teacher's, incrementally, and validated by the same gate. Confidence, prediction and entropy
come from the one soft-label function; coverage is the members' weighted mean coverage and latency the
sum of theirs (answering with the ensemble runs every member).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from kdflow.label.labeling import LABEL_COLUMNS
from kdflow.softlabels import SoftLabel, soft_label_from_logprobs
from kdflow.store import Store

Method = Literal["mean", "geometric"]


@dataclass(frozen=True)
class Member:
    """One teacher of the ensemble: its label key and the validation whose quarantine is left out."""

    name: str
    teacher_key: str
    validation_id: str


def ensemble_spec(members: Sequence[Member], method: Method, weights: Sequence[float] | None) -> dict[str, Any]:
    return {
        "ensemble": [m.teacher_key for m in members],
        "names": [m.name for m in members],
        "method": method,
        "weights": list(weights) if weights is not None else None,
    }


def ensemble_key(members: Sequence[Member], method: Method, weights: Sequence[float] | None) -> str:
    """'e-' + hash of the members' teacher keys and gate verdicts, the rule and the weights (not the member
    names): after a validation setting changes which member labels are quarantined, the ensemble is rebuilt."""
    spec = {"members": [[m.teacher_key, m.validation_id] for m in members], "method": method,
            "weights": list(weights) if weights is not None else None}
    return "e-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def combine(probs: Sequence[Sequence[float]], weights: Sequence[float], method: Method) -> SoftLabel:
    """Combine members' distributions over the same options ([members][options]) with weights.

    Weights are normalised to sum to 1. Raises ValueError when the members disagree on the number of
    options, or no member or weight is given.
    """
    if not probs or len(probs) != len(weights):
        raise ValueError(f"combine needs one weight per member: {len(probs)} members, {len(weights)} weights")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError("members label different numbers of options for the same question")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if method == "mean":
        with np.errstate(divide="ignore"):
            logprobs = np.log(w @ p)
    elif method == "geometric":
        if not (w > 0).all():
            raise ValueError(f"geometric pooling needs positive weights, got {list(weights)}")
        with np.errstate(divide="ignore"):
            logprobs = w @ np.log(p)  # unnormalised; soft_label_from_logprobs renormalises over the options
    else:
        raise ValueError(f"unknown ensemble method {method!r} (mean or geometric)")
    return soft_label_from_logprobs([float(v) if math.isfinite(v) else None for v in logprobs], normalised=True)


def build_ensemble_labels(
    store: Store,
    dataset_ids: list[str],
    members: Sequence[Member],
    method: Method,
    weights: Sequence[float] | None,
) -> tuple[str, int]:
    """Store the ensemble's labels of every question that has none yet; returns (ensemble key, new labels)."""
    key = ensemble_key(members, method, weights)
    store.execute("upsert_teacher", teacher_key=key, spec=json.dumps(ensemble_spec(members, method, weights)),
                  model_path=None)
    w = list(weights) if weights is not None else [1.0] * len(members)
    by_question: dict[str, dict[str, Any]] = {}
    for i, member in enumerate(members):
        rows = store.arrow("ensemble_member_labels", dataset_ids=dataset_ids, teacher_key=member.teacher_key,
                           validation_id=member.validation_id, ensemble_key=key).to_pylist()
        for row in rows:
            entry = by_question.setdefault(row["question_id"], {"hash": row["question_hash"], "members": []})
            entry["members"].append((i, row))
    rows_out = []
    for question_id in sorted(by_question):
        entry = by_question[question_id]
        got = entry["members"]
        member_weights = [w[i] for i, _ in got]
        label = combine([r["probs"] for _, r in got], member_weights, method)
        total_w = sum(member_weights)
        coverage = sum(wi * (r["coverage"] if r["coverage"] is not None else 0.0)
                       for wi, (_, r) in zip(member_weights, got)) / total_w
        latencies = [r["latency_ms"] for _, r in got]
        rows_out.append({
            "question_id": question_id, "teacher_key": key, "probs": label.probs, "confidence": label.confidence,
            "predicted": label.predicted, "coverage": coverage,
            "entropy": label.entropy, "reasoning": None,
            "latency_ms": None if any(v is None for v in latencies) else float(sum(latencies)),
            "question_hash": entry["hash"],
        })
    if rows_out:
        store.execute("insert_labels", pa.Table.from_pylist(rows_out, schema=LABEL_COLUMNS))
    return key, len(rows_out)


class EnsembleBackend:
    """The ensemble teacher as a backend: every member scores the questions in turn and `combine` pools
    their distributions, so timing it measures what answering with the ensemble costs (the members' sum).

    members: opened backends, in the order of `weights`; closed with this backend.
    """

    def __init__(self, members: Sequence[Any], weights: Sequence[float], method: Method) -> None:
        self.members, self.weights, self.method = list(members), list(weights), method

    def score(self, questions: Sequence[dict[str, Any]]) -> list[Any]:
        from kdflow.softlabels import ScoredQuestion

        scored = [member.score(questions) for member in self.members]
        return [
            ScoredQuestion(combine([s[i].label.probs for s in scored], self.weights, self.method),
                           sum(s[i].latency_ms for s in scored))
            for i in range(len(questions))
        ]

    def key_parts(self) -> dict[str, Any]:
        return {"ensemble": [m.key_parts() for m in self.members], "method": self.method, "weights": self.weights}

    def close(self) -> None:
        for member in self.members:
            member.close()
