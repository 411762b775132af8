"""The data behind a run's numbers: labeled, unlabeled and rejected questions, the suspect gold answers, and
each model's accuracy without them.

In: a store, an evaluation's eval_id and spec (its dataset_ids and the gate verdict's validation_id). Out:
DataQuality (rows of dataset_label_counts in sql/ingest.sql, label_issue_counts and top_label_issues in
sql/validation.sql, clean_accuracy in sql/report.sql, and kdflow.validate.label_issues' scan and noise
detection), the report's "Data" section (tables and sentences for the page and summary.md) and its one
terminal line. Reads datasets, questions, soft_labels, quarantine, label_issue_scans, label_issues,
predictions and evaluation_models; writes none.

A wrong gold answer in the test split scores a model that answers it right as wrong, so each model's
accuracy is also given on the test questions whose gold answer the gate verdict did not flag ("without
suspect gold"). An evaluation made before it recorded its verdict has no such accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kdflow.metrics import wilson_interval
from kdflow.report.formatting import Column, Row, count, md_table, md_text, num, page_table, pct, role
from kdflow.store import Store
from kdflow.validate.label_issues import label_issue_scan, noise_detection

TOP_ISSUES = 10
# Question and option texts in the top-cases table are cut to this many characters.
TEXT_CHARS = 110
OPTION_CHARS = 50
SPLIT_ORDER = ("train", "val", "test")
MOST_SUSPECT = (f"The most suspect gold answers (at most {TOP_ISSUES}), largest p(choice) − p(gold) first: the "
                "teacher's probabilities, calibrated by the gate verdict's temperature when it has one.")


@dataclass(frozen=True)
class SuspectGold:
    """A gate verdict's scan for suspect gold answers: its method, the labeled questions it considered and
    flagged (every split), `counts` (label_issue_counts rows: split, category, considered, suspect), `top`
    (top_label_issues rows, most suspect first) and `noise` (noise_detection's dict; None: the data carry
    no injected noise)."""

    validation_id: str
    method: str
    considered: int
    flagged: int
    counts: list[Row]
    top: list[Row]
    noise: dict[str, Any] | None

    @property
    def by_split(self) -> dict[str, int]:
        """{split: flagged questions} over every split considered, train, val, test first."""
        out: dict[str, int] = {}
        for r in sorted(self.counts, key=lambda r: (_split_rank(r["split"]), r["split"])):
            out[r["split"]] = out.get(r["split"], 0) + int(r["suspect"])
        return out


@dataclass(frozen=True)
class DataQuality:
    """`datasets`: dataset_label_counts rows (dataset_id, labeled, unlabeled, rejected); `validation_id`: the
    evaluation's gate verdict (None: not recorded); `suspect`: its scan (None: no verdict or no scan);
    `clean`: clean_accuracy rows (model_role, seed, of_record, n, correct, accuracy, with the 95% Wilson
    interval as accuracy_lo / accuracy_hi), empty without a scan."""

    datasets: list[Row]
    validation_id: str | None
    suspect: SuspectGold | None
    clean: list[Row]

    @property
    def labeled(self) -> int:
        return sum(int(r["labeled"]) for r in self.datasets)

    @property
    def unlabeled(self) -> int:
        return sum(int(r["unlabeled"]) for r in self.datasets)

    @property
    def rejected(self) -> int:
        return sum(int(r["rejected"]) for r in self.datasets)

    def clean_of(self, model_role: str, seed: int | None) -> Row | None:
        """The clean accuracy row of one model and seed; None when unknown."""
        return next((r for r in self.clean if r["model_role"] == model_role and r["seed"] == seed), None)

    def clean_of_record(self, model_role: str) -> Row | None:
        """The clean accuracy row of the role's model of record (the first seed's student, the teacher)."""
        return next((r for r in self.clean if r["model_role"] == model_role and r["of_record"]), None)


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def load_quality(store: Store, eval_id: str, spec: Mapping[str, Any]) -> DataQuality:
    """The evaluation's datasets' label counts, its verdict's suspect gold answers and the clean accuracies."""
    datasets = store.arrow("dataset_label_counts", dataset_ids=list(spec.get("dataset_ids") or [])).to_pylist()
    validation_id = spec.get("validation_id")
    scan = label_issue_scan(store, validation_id) if validation_id else None
    if scan is None:
        return DataQuality(datasets, validation_id, None, [])
    suspect = SuspectGold(
        validation_id=validation_id, method=scan.method, considered=scan.n_considered, flagged=scan.n_flagged,
        counts=store.arrow("label_issue_counts", validation_id=validation_id).to_pylist(),
        top=store.arrow("top_label_issues", validation_id=validation_id, limit=TOP_ISSUES).to_pylist(),
        noise=noise_detection(store, validation_id),
    )
    clean = store.arrow("clean_accuracy", eval_id=eval_id, validation_id=validation_id).to_pylist()
    for r in clean:
        r["accuracy_lo"], r["accuracy_hi"] = wilson_interval(int(r["correct"]), int(r["n"]))
    return DataQuality(datasets, validation_id, suspect, clean)


# ---------------------------------------------------------------- tables


def _letter(i: int) -> str:
    return chr(ord("A") + i) if 0 <= i < 26 else str(i + 1)


def _cut(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _option(row: Row, index: int) -> str:
    options = row.get("options") or []
    text = options[index] if 0 <= index < len(options) else ""
    return f"{_letter(index)}. {_cut(text, OPTION_CHARS)}"


DATASET_COLUMNS: list[Column] = [
    ("dataset", lambda r: r["dataset_id"]),
    ("labeled", lambda r: count(r["labeled"])),
    ("unlabeled (no gold answer)", lambda r: count(r["unlabeled"])),
    ("rejected rows", lambda r: count(r["rejected"])),
]
ISSUE_CATEGORY_COLUMNS: list[Column] = [
    ("category", lambda r: r["category"]),
    ("labeled questions", lambda r: count(r["considered"])),
    ("suspect gold", lambda r: count(r["suspect"])),
    ("share", lambda r: pct(r["suspect"] / r["considered"] if r["considered"] else None)),
    ("of them in test", lambda r: count(r["test"])),
]
TOP_ISSUE_COLUMNS: list[Column] = [
    ("question", lambda r: _cut(r["question"], TEXT_CHARS)),
    ("category", lambda r: r["category"]),
    ("split", lambda r: r["split"]),
    ("gold answer", lambda r: _option(r, r["gold"])),
    ("teacher chose", lambda r: _option(r, r["teacher_choice"])),
    ("p(choice)", lambda r: num(r["teacher_prob"])),
    ("p(gold)", lambda r: num(r["gold_prob"])),
]
CLEAN_COLUMNS: list[Column] = [
    ("model", lambda r: role(r["model_role"])),
    ("accuracy, all test questions", lambda r: pct(r["accuracy"])),
    ("without suspect gold", lambda r: "–" if r.get("clean") is None
     else f"{pct(r['clean']['accuracy'])} ({r['clean']['correct']:,}/{r['clean']['n']:,})"),
]


def issue_category_rows(suspect: SuspectGold) -> list[Row]:
    """Per category with at least one flag: labeled questions considered, flagged, flagged in test; most
    flags first."""
    out: dict[str, Row] = {}
    for r in suspect.counts:
        row = out.setdefault(r["category"], {"category": r["category"], "considered": 0, "suspect": 0, "test": 0})
        row["considered"] += int(r["considered"])
        row["suspect"] += int(r["suspect"])
        row["test"] += int(r["suspect"]) if r["split"] == "test" else 0
    return sorted((r for r in out.values() if r["suspect"]), key=lambda r: (-r["suspect"], r["category"]))


# ---------------------------------------------------------------- sentences


def counts_sentence(quality: DataQuality) -> str:
    """What the run's datasets hold: labeled and unlabeled questions and rejected input rows."""
    n = len(quality.datasets)
    if not n:
        return "The evaluation does not name its datasets, or they are no longer in the store: no counts."
    unlabeled = (f"{quality.unlabeled:,} unlabeled (no gold answer: the students learn only the teacher's soft "
                 "labels on them; all in split train)" if quality.unlabeled else "none unlabeled")
    return (f"{quality.labeled:,} labeled questions (with a gold answer), {unlabeled}, and {quality.rejected:,} "
            f"input rows rejected at ingest (table rejected_rows), in {n} dataset{'s' if n != 1 else ''}.")


def suspect_sentence(quality: DataQuality) -> str:
    """How many gold answers the gate verdict flagged, where, and what that does to the test accuracy."""
    suspect = quality.suspect
    if quality.validation_id is None:
        return ("This evaluation does not record the gate verdict it was validated by (it was made before kdflow "
                "kept it): suspect gold answers and the accuracy without them are not shown; evaluate the run "
                "again (`kdflow evaluate`) to see them.")
    if suspect is None:
        return (f"Gate verdict {quality.validation_id} was not scanned for suspect gold answers: run `kdflow "
                "validate`, then evaluate again.")
    if suspect.method == "off":
        return "Suspect gold answers were not searched (validation.suspect_gold.method: off)."
    splits = ", ".join(f"{n:,} in {split}" for split, n in suspect.by_split.items())
    test = suspect.by_split.get("test", 0)
    after = (f"The {test:,} flagged test question{'s are' if test != 1 else ' is'} left out of the accuracy "
             "\"without suspect gold\": where a gold answer is wrong, a model that answers right is scored wrong."
             if test else "No test question was flagged: the accuracy without suspect gold is the accuracy.")
    return (f"Gate verdict {suspect.validation_id} flagged {suspect.flagged:,} of {suspect.considered:,} labeled "
            f"questions as suspect gold answers ({suspect.method.replace('_', ' ')}: the teacher confidently chose "
            f"another option){': ' + splits if splits else ''}. {after}")


def noise_sentence(suspect: SuspectGold | None) -> str | None:
    """Precision and recall of the flags against the gold answers corrupted on purpose; None without any."""
    noise = suspect.noise if suspect is not None else None
    if noise is None:
        return None
    recovers = noise["teacher_recovers"]
    return (f"These data carry gold answers corrupted on purpose (question metadata gold_noise): {noise['noisy']:,} "
            f"of the {noise['considered']:,} labeled questions. The flags find {noise['detected']:,} of them: "
            f"precision {pct(noise['precision'])} ({noise['detected']:,} of {noise['flagged']:,} flags are "
            f"corrupted answers), recall {pct(noise['recall'])} ({noise['detected']:,} of {noise['noisy']:,})"
            + (f"; the teacher's choice is the original answer on {pct(recovers)} of those found." if recovers
               is not None else "."))


def clean_rows(quality: DataQuality, models: list[Row]) -> list[Row]:
    """The models of record with their accuracy on all test questions and without suspect gold."""
    return [{"model_role": m["model_role"], "accuracy": m["accuracy"],
             "clean": quality.clean_of_record(m["model_role"])} for m in models]


def page_section(quality: DataQuality) -> Row:
    """The HTML page's "Data" section: sentences, the per-dataset table, suspect gold per category and the
    most suspect cases (None where there is nothing to show). The accuracy without suspect gold is a column
    of the page's models table."""
    suspect = quality.suspect
    categories = issue_category_rows(suspect) if suspect is not None else []
    return {
        "counts": counts_sentence(quality),
        "datasets": page_table(DATASET_COLUMNS, quality.datasets),
        "suspect": suspect_sentence(quality),
        "noise": noise_sentence(suspect),
        "categories": page_table(ISSUE_CATEGORY_COLUMNS, categories) if categories else None,
        "top": page_table(TOP_ISSUE_COLUMNS, suspect.top) if suspect is not None and suspect.top else None,
        "top_note": MOST_SUSPECT,
    }


def markdown_section(quality: DataQuality, models: list[Row]) -> list[str]:
    """summary.md's "Data" section, as lines, with the models of record's accuracy with and without suspect
    gold (`models`: ReportData.models rows)."""
    suspect = quality.suspect
    lines = [md_text(counts_sentence(quality)), "", md_table(DATASET_COLUMNS, quality.datasets), "",
             md_text(suspect_sentence(quality)), ""]
    if (noise := noise_sentence(suspect)) is not None:
        lines += [md_text(noise), ""]
    if suspect is not None:
        lines += [md_table(CLEAN_COLUMNS, clean_rows(quality, models)), ""]
        if categories := issue_category_rows(suspect):
            lines += [md_table(ISSUE_CATEGORY_COLUMNS, categories), ""]
        if suspect.top:
            lines += [MOST_SUSPECT, "", md_table(TOP_ISSUE_COLUMNS, suspect.top), ""]
    return lines


def terminal_line(quality: DataQuality) -> str:
    """'data: 1,200 labeled, 300 unlabeled, 4 rejected · 12 suspect gold answers (3 in test; flags' precision
    80.0%, recall 66.7%)'."""
    line = f"data: {quality.labeled:,} labeled, {quality.unlabeled:,} unlabeled, {quality.rejected:,} rejected"
    suspect = quality.suspect
    if suspect is None or suspect.method == "off":
        return line
    noise = suspect.noise
    detection = (f"; flags' precision {pct(noise['precision'])}, recall {pct(noise['recall'])}"
                 if noise is not None else "")
    return (f"{line} · {suspect.flagged:,} suspect gold answer{'s' if suspect.flagged != 1 else ''} "
            f"({suspect.by_split.get('test', 0):,} in test{detection})")
