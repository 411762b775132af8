"""Labeling vs lm-evaluation-harness: same model, questions and prompts; same answers, and how fast?

    .venv/bin/pip install -c constraints-cpu.txt 'lm-eval>=0.4.3'    # once: the `bench` extra
    .venv/bin/python -m bench.vs_lm_eval [--quick] [--model DIR ...]

lm-eval is what people score multiple choice with, so kdflow's labels must give the same answers on the
same model and text, or the difference must be known. A small model (hidden 128, 4 layers) is built on
demo text and fine-tuned for a few steps with kdflow's own recipe (CE only, cloze scoring: this size
learns cloze in 100 steps, letters not at all); --model adds local transformers directories. The demo
questions become a local JSONL task whose text is kdflow's rendered prompt, so both tools read identical
strings:
- letter: the prompt lists "A. ..." lines, choices " A", " B" ...; lm-eval `acc`.
- cloze: context "Question: ...\\nAnswer:", choices the option texts; lm-eval `acc_norm`, which is
  kdflow's length_normalise (log-likelihood / characters).
Each question's argmax is compared, and per option the log-likelihood (the cause of any disagreement is
measured, not guessed: token ids of both tools, and kdflow's letter score with only the " A" form).
Throughput: both with the model loaded (not timed), questions in, per-question results out; kdflow's
HFBackend.score and lm-eval's simple_evaluate (log_samples off, its CLI default) alternate, 3 rounds (2
with --quick) after a warm-up. lm-eval's batch is as many rows as kdflow's 64 questions make: 64 prompts
(letter), 64 x the mean option count (cloze). The forward rows and token positions each tool computes
are counted, as they explain the speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench._common import SummaryRow, alternate, num, parser, publish, spread, timed
from kdflow.backends.hf import HFBackend
from kdflow.config import ArchitectureConfig, ScoringConfig, TrainingConfig
from kdflow.data.demo import generate_demo_questions
from kdflow.modeling import build_model, load_pretrained, train_tokenizer
from kdflow.prompts import cloze_context, letter_prompt
from kdflow.records import LETTERS
from kdflow.scoring import encode, option_logits, tokenize
from kdflow.training import train

NAME = "vs_lm_eval"
ARCH = ArchitectureConfig(hidden_size=128, num_layers=4, num_heads=4, vocab_size=2048)
TRAIN_QUESTIONS = 8000
BATCH = 64  # questions per kdflow forward pass (HFBackend batch_size)
TASKS = {"letter": "kdflow_demo_letter", "cloze": "kdflow_demo_cloze"}
METRIC = {"letter": "acc", "cloze": "acc_norm"}  # the lm-eval metric that is kdflow's scoring rule
SHOWN_DISAGREEMENTS = 5


def fine_tuned_model(root: Path, rows: Sequence[dict[str, Any]], steps: int) -> Path:
    """Tokenizer and model built on demo text, fine-tuned with kdflow's recipe; returns the exported dir."""
    tokenizer = train_tokenizer((" ".join([r["question"], *r["options"]]) for r in rows), ARCH.vocab_size)
    torch.manual_seed(0)
    model = build_model(ARCH, tokenizer)
    cfg = TrainingConfig(alpha=1.0, max_steps=steps, batch_size=32, learning_rate=3e-3, checkpoint_every=steps)
    result = train(model, tokenizer, rows, cfg, ScoringConfig(mode="cloze"), out_dir=root / "train", progress=False)
    return result.final_dir


def write_tasks(root: Path, questions: Sequence[dict[str, Any]], scoring: ScoringConfig) -> Path:
    """A JSONL file of kdflow-rendered prompts and one lm-eval task YAML per scoring mode."""
    docs = [
        {
            "question_id": q["question_id"],
            "prompt": letter_prompt(q["question"], q["options"], q["category"], scoring),
            "letters": list(LETTERS[: len(q["options"])]),
            "context": cloze_context(q["question"], q["category"], scoring),
            "options": [o.strip() for o in q["options"]],  # acc_norm divides by len(choice): kdflow's norm
            "answer": q["answer"],
        }
        for q in questions
    ]
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task_dir = root / "tasks"
    task_dir.mkdir()
    for mode, text, choices in (("letter", "prompt", "letters"), ("cloze", "context", "options")):
        task = {
            "task": TASKS[mode],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": text,  # a field name: lm-eval reads the field as is, no template rendering
            "doc_to_choice": choices,
            "doc_to_target": "answer",
            "target_delimiter": " ",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
        }
        (task_dir / f"{mode}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return task_dir


def spaced_letter_ids(tokenizer: Any, n: int) -> list[int]:
    """The id of " A", " B" ... as it follows text, i.e. lm-eval's continuation token."""
    anchor = tokenizer.encode("\n", add_special_tokens=False)
    ids = []
    for letter in LETTERS[:n]:
        tail = tokenizer.encode("\n " + letter, add_special_tokens=False)[len(anchor) :]
        if len(tail) != 1:
            raise ValueError(f"' {letter}' is not one token in this tokenizer; letter mode cannot be compared")
        ids.append(tail[0])
    return ids


def kdflow_scores(
    model: torch.nn.Module, tokenizer: Any, questions: Sequence[dict[str, Any]], scoring: ScoringConfig,
    spaced_only: bool = False,
) -> list[list[float]]:
    """kdflow's per-option scores (option_logits), optionally letter scores of the " A" form only."""
    out: list[list[float]] = []
    for start in range(0, len(questions), BATCH):
        chunk = questions[start : start + BATCH]
        batch = encode(chunk, tokenizer, scoring)
        if spaced_only:
            k = batch.letter_ids.shape[0]
            batch = dataclasses.replace(
                batch,
                letter_ids=torch.tensor(spaced_letter_ids(tokenizer, k))[:, None],
                letter_form_mask=torch.ones(k, 1, dtype=torch.bool),
            )
        with torch.inference_mode():
            scores = option_logits(model, batch).scores
        out += [row[: len(q["options"])] for row, q in zip(scores.tolist(), chunk)]
    return out


def lm_eval_run(lm: Any, task_manager: Any, task: str, log_samples: bool) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm, tasks=[task], task_manager=task_manager, log_samples=log_samples, bootstrap_iters=0,
        verbosity="ERROR",
    )


def lm_eval_logliks(result: dict[str, Any], task: str) -> list[list[float]]:
    """Per question (in file order), lm-eval's log-likelihood of each choice."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[float(ll) for ll, _greedy in s["filtered_resps"]] for s in samples]


def token_ids_identical(lm: Any, tokenizer: Any, questions: Sequence[dict[str, Any]], scoring: ScoringConfig,
                        letter_ids: list[int]) -> int:
    """Questions whose every (context + choice) token ids are the same in lm-eval and kdflow."""
    same = 0
    for q, enc in zip(questions, tokenize(questions, tokenizer, scoring)):
        if scoring.mode == "letter":
            context = letter_prompt(q["question"], q["options"], q["category"], scoring)
            theirs = [sum(lm._encode_pair(context, " " + L), []) for L in LETTERS[: len(q["options"])]]
            ours = [list(enc.row) + [i] for i in letter_ids[: len(q["options"])]]
        else:
            context = cloze_context(q["question"], q["category"], scoring)
            theirs = [sum(lm._encode_pair(context, " " + o.strip()), []) for o in q["options"]]
            ours = [list(row) for row in enc.option_rows]
        same += theirs == ours
    return same


def argmax(rows: Sequence[Sequence[float]], norms: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """First index of each row's maximum (both tools break ties this way)."""
    if norms is None:
        return np.array([int(np.argmax(r)) for r in rows])
    return np.array([int(np.argmax(np.array(r) / np.array(n))) for r, n in zip(rows, norms)])


def max_abs_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    return max(float(np.max(np.abs(np.array(x) - np.array(y)))) for x, y in zip(a, b))


def disagreements(questions: Sequence[dict[str, Any]], ours: np.ndarray, theirs: np.ndarray,
                  our_probs: list[list[float]], their_logliks: list[list[float]]) -> list[dict[str, Any]]:
    return [
        {"question_id": questions[i]["question_id"], "kdflow": int(ours[i]), "lm_eval": int(theirs[i]),
         "kdflow_probs": [round(p, 4) for p in our_probs[i]],
         "lm_eval_logliks": [round(s, 4) for s in their_logliks[i]]}
        for i in np.flatnonzero(ours != theirs)[:SHOWN_DISAGREEMENTS]
    ]


@contextlib.contextmanager
def counted_forward(model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Rows and token positions (padding included) that `model` runs through while the block runs."""
    counts = {"forward_calls": 0, "rows": 0, "token_positions": 0}
    forward = model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        counts["forward_calls"] += 1
        counts["rows"] += ids.shape[0]
        counts["token_positions"] += ids.numel()
        return forward(*args, **kwargs)

    model.forward = counting
    try:
        yield counts
    finally:
        model.forward = forward


def compare_mode(model_dir: Path, mode: str, questions: list[dict[str, Any]], task_manager: Any,
                 repeats: int) -> dict[str, Any]:
    """Agreement and throughput of kdflow and lm-eval on one model and scoring mode."""
    from lm_eval.models.huggingface import HFLM

    scoring = ScoringConfig(mode=mode, chat_template="off")  # lm-eval reads the plain prompt too
    model, tokenizer = load_pretrained(str(model_dir), dtype="float32", device="cpu")
    backend = HFBackend(model, tokenizer, scoring, batch_size=BATCH, device="cpu")
    n = len(questions)
    mean_options = sum(len(q["options"]) for q in questions) / n
    rows_per_pass = BATCH if mode == "letter" else round(BATCH * mean_options)
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=rows_per_pass)
    task = TASKS[mode]

    # Warm-up (lm-eval's data cache, lazy imports, first allocations) that also gives the answers.
    with counted_forward(model) as our_work:
        labels = backend.score(questions)
    with counted_forward(lm.model) as their_work:
        their_logliks = lm_eval_logliks(lm_eval_run(lm, task_manager, task, log_samples=True), task)
    ours = np.array([s.label.predicted for s in labels])
    lengths = [[float(len(o.strip())) for o in q["options"]] for q in questions]
    theirs = argmax(their_logliks, lengths if mode == "cloze" else None)
    gold = np.array([q["answer"] for q in questions])

    if mode == "letter":
        letter_ids = spaced_letter_ids(tokenizer, max(len(q["options"]) for q in questions))
        spaced = kdflow_scores(model, tokenizer, questions, scoring, spaced_only=True)
        diagnosis = {
            "scored_forms": "kdflow: log-sum-exp of the 'A' and ' A' tokens; lm-eval: ' A' only",
            "agree_spaced_form_only": int((argmax(spaced) == argmax(their_logliks)).sum()),
            "max_abs_loglik_diff_spaced_form_only": max_abs_diff(spaced, their_logliks),
        }
    else:
        letter_ids = []
        raw = kdflow_scores(model, tokenizer, questions, scoring.model_copy(update={"length_normalise": False}))
        targets = [t for e in tokenize(questions, tokenizer, scoring) for t in e.option_lengths]
        diagnosis = {
            # lm-eval runs one row per distinct (context + option minus its last token): repeated question
            # texts and single-token options of one context share a row. kdflow runs one row per question, its
            # options packed after the context.
            "distinct_contexts": len({cloze_context(q["question"], q["category"], scoring) for q in questions}),
            "single_token_option_share": sum(t == 1 for t in targets) / len(targets),
            "agree_normalised_from_raw": int((argmax(raw, lengths) == theirs).sum()),
            "agree_unnormalised_vs_acc": int((argmax(raw) == argmax(their_logliks)).sum()),
            "max_abs_loglik_diff": max_abs_diff(raw, their_logliks),
        }
    agreement = {
        "questions": n,
        "agree": int((ours == theirs).sum()),
        "kdflow_accuracy": float((ours == gold).mean()),
        "lm_eval_accuracy": float((theirs == gold).mean()),
        "lm_eval_metric": METRIC[mode],
        "share_predicting_option_a": {"kdflow": float((ours == 0).mean()), "lm_eval": float((theirs == 0).mean()),
                                      "gold": float((gold == 0).mean())},
        "token_ids_identical": token_ids_identical(lm, tokenizer, questions, scoring, letter_ids),
        "max_prompt_tokens": max(e.n_tokens for e in tokenize(questions, tokenizer, scoring)),
        **diagnosis,
        "disagreements": disagreements(questions, ours, theirs, [s.label.probs for s in labels], their_logliks),
    }

    qps = alternate(
        {
            "kdflow": lambda: n / timed(lambda: backend.score(questions))[0],
            "lm_eval": lambda: n / timed(lambda: lm_eval_run(lm, task_manager, task, log_samples=False))[0],
        },
        repeats,
    )
    return {
        "agreement": agreement,
        "work": {"kdflow": our_work, "lm_eval": their_work},
        "rows_per_forward_pass": {"kdflow": f"{BATCH} questions", "lm_eval": rows_per_pass},
        "kdflow_qps": spread(qps["kdflow"]),
        "lm_eval_qps": spread(qps["lm_eval"]),
        "ratio": spread([a / b for a, b in zip(qps["kdflow"], qps["lm_eval"])]),
    }


def run(quick: bool, models: Sequence[str] = ()) -> dict[str, Any]:
    n_questions, steps, repeats = (200, 30, 2) if quick else (1000, 100, 3)
    # Offline: lm-eval reads a local file; its dataset cache goes to the temporary directory.
    tmp = tempfile.TemporaryDirectory(prefix="kdflow-bench-lmeval-")
    root = Path(tmp.name)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(root / "hf-datasets"))
    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from lm_eval.tasks import TaskManager

    with tmp:
        rows = generate_demo_questions(TRAIN_QUESTIONS + n_questions).to_pylist()
        train_rows, questions = rows[:TRAIN_QUESTIONS], rows[TRAIN_QUESTIONS:]
        fine_tune_s, built = timed(lambda: fine_tuned_model(root, train_rows, steps))
        task_dir = write_tasks(root, questions, ScoringConfig())
        task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        results = {}
        for model_dir in [built, *map(Path, models)]:
            label = "demo-128x4" if model_dir == built else str(model_dir)
            results[label] = {mode: compare_mode(model_dir, mode, questions, task_manager, repeats) for mode in TASKS}
    return {
        "inputs": {"questions": n_questions, "fine_tune_steps": steps, "fine_tune_seconds": round(fine_tune_s, 1),
                   "repeats": repeats, "kdflow_batch_questions": BATCH, "model": ARCH.model_dump(),
                   "extra_models": list(models)},
        "results": results,
    }


def summarise(result: dict[str, Any]) -> list[SummaryRow]:
    rows = []
    for label, modes in result["results"].items():
        for mode, r in modes.items():
            a = r["agreement"]
            n = a["questions"]
            if mode == "letter":
                picks_a = a["share_predicting_option_a"]
                why = (f"' A' form only: {a['agree_spaced_form_only']}/{n}, "
                       f"max |d ll| {a['max_abs_loglik_diff_spaced_form_only']:.0e}; kdflow answers A "
                       f"{picks_a['kdflow']:.0%}, lm-eval {picks_a['lm_eval']:.0%}, gold {picks_a['gold']:.0%}")
            else:
                why = (f"max |d ll| {a['max_abs_loglik_diff']:.0e}; {a['distinct_contexts']} distinct contexts, "
                       f"{a['single_token_option_share']:.0%} single-token options")
            work = r["work"]
            rows.append(SummaryRow(
                NAME, f"{mode} labeling, {label}",
                num(r["kdflow_qps"]["median"], "q/s"),
                f"lm-eval {num(r['lm_eval_qps']['median'], 'q/s')}",
                f"{r['ratio']['median']:.2f}x",
                f"same argmax {a['agree']}/{n} ({why}); acc {a['kdflow_accuracy']:.1%} vs {a['lm_eval_metric']} "
                f"{a['lm_eval_accuracy']:.1%}; rows / token positions run {work['kdflow']['rows']:,} / "
                f"{work['kdflow']['token_positions']:,} vs {work['lm_eval']['rows']:,} / "
                f"{work['lm_eval']['token_positions']:,}",
            ))
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", action="append", default=[], metavar="DIR", help="also compare this local model dir")
    args = p.parse_args()
    result = run(args.quick, args.model)
    summary = summarise(result)
    ratios = {f"{label}/{mode}": r["ratio"]["median"] for label, modes in result["results"].items()
              for mode, r in modes.items()}
    figures = {f"{label}/{mode}": r for label, modes in result["results"].items() for mode, r in modes.items()}
    publish(NAME, "kdflow vs lm-evaluation-harness", inputs=result["inputs"], figures=figures, ratios=ratios,
            summary=summary,
            findings={k: {m: r["agreement"] for m, r in v.items()} for k, v in result["results"].items()})


if __name__ == "__main__":
    main()
