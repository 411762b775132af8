"""Suspect gold answers: labeled questions whose gold answer the calibrated teacher confidently contradicts.

Real benchmarks carry wrong gold answers (MMLU-Redux, Gema et al. 2024: about 6.5% of MMLU questions have an
error; Northcutt, Athalye & Mueller 2021: at least 3.3% label errors on average across 10 common test sets).
Two rules (`validation.suspect_gold.method`); either way the score is p(choice) - p(gold), higher is more
suspect, where choice is the teacher's most probable option:

- margin (the default): choice != gold, p(choice) >= min_confidence and p(gold) <= max_gold_prob.
- confident_learning (Northcutt, Jiang & Chuang 2021, "Confident Learning: Estimating Uncertainty in Dataset
  Labels", JAIR 70): with per-class thresholds t_j = the mean predicted probability of class j over the
  examples labeled j (the "self-confidence"), an example labeled y lands in the confident joint's cell
  (y, j*), j* the most probable class among those reaching their threshold; j* != y is a label issue.
  Multiple-choice options are positions, not classes (option B of one question has nothing to do with option
  B of another), so the threshold is one per category (the question's subject or tier): t_c = the mean
  teacher probability of the gold option over the considered questions of category c, or over all of them
  when c has fewer than `min_category_count`. With one threshold per question, j* is the teacher's choice
  whenever p(choice) reaches t_c, so a question is flagged when choice != gold and p(choice) >= t_c.

Margin is the default because t_c is low exactly where the teacher is weak, so there confident learning
flags the teacher's own mistakes (measured precision and recall: docs/data-quality.md, "Suspect gold answers").

The probabilities are the teacher's after the verdict's calibration temperature (kdflow.validate.calibration),
so a threshold means the same for an over-confident and a calibrated teacher. Considered: labeled questions
(gold answer not NULL) that the verdict did not quarantine, in every split. The flags are computed once per
gate verdict and stored in `label_issues` (one row per flagged question) and `label_issue_scans` (one row per
verdict, also when nothing was flagged); a reused verdict reuses them (sql/validation.sql).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdflow.config import SuspectGoldConfig
from kdflow.errors import KdflowError
from kdflow.store import Store
from kdflow.validate.calibration import with_calibrated_probs

POLICIES = ("keep", "drop", "teacher")


@dataclass(frozen=True)
class LabelIssue:
    """One flagged question: its gold answer and the teacher's choice (0-based option indexes), their
    calibrated probabilities, the score p(choice) - p(gold) and the probability p(choice) had to reach."""

    question_id: str
    dataset_id: str
    dataset: str
    split: str
    category: str
    gold: int
    teacher_choice: int
    teacher_prob: float
    gold_prob: float
    score: float
    threshold: float
    method: str


_ISSUE_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("question_id", "dataset_id", "dataset", "split", "category")]
    + [("gold", pa.int32()), ("teacher_choice", pa.int32())]
    + [(name, pa.float64()) for name in ("teacher_prob", "gold_prob", "score", "threshold")]
    + [("method", pa.string())]
)


@dataclass(frozen=True)
class LabelIssueScan:
    """A verdict's scan: the method, the temperature applied (None: raw probabilities), the questions
    considered and how many were flagged."""

    validation_id: str
    method: str
    temperature: float | None
    n_considered: int
    n_flagged: int

    def summary(self) -> str:
        """One line for the validate stage, e.g. '12 suspect gold answers in 5000 labeled questions (...)'."""
        if self.method == "off":
            return "suspect gold answers not searched (validation.suspect_gold.method: off)"
        return (f"{self.n_flagged} suspect gold answers in {self.n_considered} labeled questions "
                f"({self.method.replace('_', ' ')})")


def _distribution(row: Mapping[str, Any]) -> np.ndarray:
    """The row's probabilities as a distribution; a ValueError names the question when they cannot be one."""
    probs = np.asarray(row["probs"] if row["probs"] is not None else [], dtype=np.float64)
    total = probs.sum() if probs.size else 0.0
    if probs.ndim != 1 or not np.isfinite(total) or total <= 0 or (probs < 0).any():
        raise ValueError(f"question {row['question_id']}: probabilities {row['probs']} are not a distribution")
    gold = row["answer"]
    if not 0 <= gold < probs.size:
        raise ValueError(f"question {row['question_id']}: gold answer {gold} is not one of its {probs.size} options")
    return probs / total


def self_confidence_thresholds(
    rows: Sequence[Mapping[str, Any]], min_category_count: int
) -> tuple[dict[str, float], float]:
    """({category: t_c}, global t): the mean probability of the gold option per category (CL's per-class
    threshold, Northcutt et al. 2021, with categories in place of classes) and over every row.

    `rows`: question_id, category, answer (int) and probs (a distribution). A category with fewer than
    `min_category_count` rows gets the global mean. Raises ValueError on no rows.
    """
    if not rows:
        raise ValueError("no labeled questions to compute thresholds from")
    gold_probs: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        gold_probs[row["category"]].append(float(_distribution(row)[row["answer"]]))
    everything = [p for ps in gold_probs.values() for p in ps]
    overall = float(np.mean(everything))
    by_category = {c: float(np.mean(ps)) if len(ps) >= min_category_count else overall for c, ps in gold_probs.items()}
    return by_category, overall


def find_label_issues(
    rows: Iterable[Mapping[str, Any]], settings: SuspectGoldConfig, temperature: float | None = None
) -> list[LabelIssue]:
    """The rows whose gold answer the teacher confidently contradicts, by `settings.method`.

    `rows`: question_id, category, answer (0-based gold index; None: unlabeled, skipped), probs (the teacher's
    option probabilities as labeled) and, carried into the result, dataset_id, dataset, split. `temperature`
    (the verdict's calibration, None: none) is applied to probs first. Quarantined rows must be left out by
    the caller. Returns issues in the rows' order; ValueError names a row whose probabilities are not a
    distribution or whose gold answer is not one of its options.
    """
    labeled = [row for row in rows if row["answer"] is not None]
    if settings.method == "off" or not labeled:
        return []
    labeled = with_calibrated_probs(labeled, temperature)
    if settings.method == "confident_learning":
        by_category, _ = self_confidence_thresholds(labeled, settings.min_category_count)
    issues = []
    for row in labeled:
        probs = _distribution(row)
        gold, choice = int(row["answer"]), int(np.argmax(probs))
        if choice == gold:
            continue
        teacher_prob, gold_prob = float(probs[choice]), float(probs[gold])
        if settings.method == "confident_learning":
            threshold = by_category[row["category"]]
            flagged = teacher_prob >= threshold
        else:
            threshold = settings.min_confidence
            flagged = teacher_prob >= threshold and gold_prob <= settings.max_gold_prob
        if flagged:
            issues.append(LabelIssue(
                question_id=row["question_id"], dataset_id=row.get("dataset_id", ""), dataset=row.get("dataset", ""),
                split=row.get("split", ""), category=row["category"], gold=gold, teacher_choice=choice,
                teacher_prob=teacher_prob, gold_prob=gold_prob, score=teacher_prob - gold_prob, threshold=threshold,
                method=settings.method,
            ))
    return issues


def label_issue_scan(store: Store, validation_id: str) -> LabelIssueScan | None:
    """The verdict's scan, or None when it has none (a verdict given before kdflow looked for label issues)."""
    row = store.fetch_one("find_label_issue_scan", validation_id=validation_id)
    return None if row is None else LabelIssueScan(*row)


def scan_label_issues(
    store: Store, validation_id: str, teacher_key: str, dataset_ids: list[str], temperature: float | None,
    settings: SuspectGoldConfig,
) -> LabelIssueScan:
    """The verdict's stored scan, or a new one: find_label_issues on the labeled, not quarantined questions of
    the datasets, written to label_issues and label_issue_scans in one transaction."""
    found = label_issue_scan(store, validation_id)
    if found is not None:
        return found
    rows = store.arrow("label_issue_candidates", dataset_ids=dataset_ids, teacher_key=teacher_key,
                       validation_id=validation_id).to_pylist()
    issues = find_label_issues(rows, settings, temperature)
    table = pa.Table.from_pylist([asdict(issue) for issue in issues], schema=_ISSUE_SCHEMA)
    scan = LabelIssueScan(validation_id, settings.method, temperature, len(rows), len(issues))
    with store.transaction() as tx:
        tx.execute("insert_label_issues", table, validation_id=validation_id)
        tx.execute("insert_label_issue_scan", validation_id=validation_id, teacher_key=teacher_key,
                   dataset_ids=dataset_ids, method=scan.method, temperature=temperature,
                   n_considered=scan.n_considered, n_flagged=scan.n_flagged)
    return label_issue_scan(store, validation_id)


def suspect_question_ids(store: Store, validation_id: str, split: str | None = None) -> set[str]:
    """The question ids the verdict flagged as suspect gold answers, of `split` or (None) of every split.

    Raises KdflowError when the verdict was never scanned (run `kdflow validate`); check with
    `label_issue_scan` first where an old verdict may be read.
    """
    if label_issue_scan(store, validation_id) is None:
        raise KdflowError(f"verdict {validation_id} has no label-issue scan: run `kdflow validate` to add one")
    return {r[0] for r in store.fetch("suspect_question_ids", validation_id=validation_id, split=split)}


def _detection(considered: int, noisy: int, flagged: int, detected: int, recovered: int) -> dict[str, Any]:
    return {
        "considered": considered, "noisy": noisy, "flagged": flagged, "detected": detected,
        "precision": detected / flagged if flagged else None, "recall": detected / noisy if noisy else None,
        "teacher_recovers": recovered / detected if detected else None,
    }


def noise_detection(store: Store, validation_id: str) -> dict[str, Any] | None:
    """Precision and recall of the verdict's flags against gold answers corrupted on purpose, or None when no
    considered question's metadata has a `gold_noise` key (or the verdict has no scan).

    A question is noisy when its metadata says `"gold_noise": true`. Returns {considered, noisy, flagged,
    detected (flagged and noisy), precision = detected / flagged, recall = detected / noisy (None when the
    denominator is 0), teacher_recovers (share of the detected whose teacher choice is the metadata's
    `true_answer`: what training.suspect_gold: teacher would restore), splits: {split: the same keys}}.
    """
    if label_issue_scan(store, validation_id) is None:
        return None
    rows = store.fetch("label_noise_by_split", validation_id=validation_id)
    if not any(marked for _split, _considered, marked, *_ in rows):
        return None
    splits = {split: _detection(considered, noisy, flagged, detected, recovered)
              for split, considered, _marked, noisy, flagged, detected, recovered in rows}
    totals = [sum(r[i] for r in rows) for i in (1, 3, 4, 5, 6)]
    return {**_detection(*totals), "splits": splits}


def apply_suspect_gold(
    examples: Sequence[dict[str, Any]], suspect_ids: set[str], policy: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Training examples under `training.suspect_gold`: keep (unchanged), drop (the suspect ones removed) or
    teacher (their `answer` replaced by the argmax of their `probs`, the teacher's choice).

    `examples`: dicts with question_id, answer and probs. Returns (examples, {suspect: suspect examples
    seen, dropped, relabeled}). Raises ValueError on another policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"training.suspect_gold must be one of {', '.join(POLICIES)}, got {policy!r}")
    suspect = [e for e in examples if e["question_id"] in suspect_ids and e["answer"] is not None]
    counts = {"suspect": len(suspect), "dropped": 0, "relabeled": 0}
    if policy == "keep" or not suspect:
        return list(examples), counts
    if policy == "drop":
        counts["dropped"] = len(suspect)
        return [e for e in examples if e["question_id"] not in suspect_ids or e["answer"] is None], counts
    out = []
    for example in examples:
        if example["question_id"] in suspect_ids and example["answer"] is not None:
            choice = int(np.argmax(example["probs"]))
            counts["relabeled"] += int(choice != example["answer"])
            example = {**example, "answer": choice}
        out.append(example)
    return out, counts

