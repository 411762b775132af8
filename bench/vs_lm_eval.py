"""Labeling vs lm-evaluation-harness: same model, questions and prompts; same answers, and how fast?

    .venv/bin/pip install -c constraints-cpu.txt 'lm-eval>=0.4.3'    # once: the `bench` extra
    .venv/bin/python -m bench.vs_lm_eval [--quick] [--model DIR ...]

lm-eval is what people score multiple choice with, so kdflow's labels must give the same answers on the
same model and text. Rows (models), each in both scoring modes:
- demo-cloze: hidden 128, 4 layers, built on demo text and fine-tuned with kdflow's recipe in cloze mode (CE
  only; this size learns cloze in 100 steps).
- demo-letter: the same architecture fine-tuned in letter mode, so letter mode is measured on a model that
  answers letters (not a random answerer, whose ties and near-ties say little).
- SmolLM2-135M-Instruct: the real model, from its GGUF file in the test model cache (tests/real_models.py;
  skipped with a note when it is not there).
- --model DIR: any local transformers directory.
lm-eval runs fully offline: HFLM gets the loaded model and tokenizer objects, and its `loglikelihood` gets
in-memory requests whose text is kdflow's rendered prompt (chat template off on both sides, since lm-eval
takes plain text here), so both tools read identical strings:
- letter: context = the letter prompt ("... Answer:"), continuations " A", " B", ... (lm-eval `acc`; kdflow
  scores the token the tokenizer writes for the letter right after the prompt, which is that " A").
- cloze: context "Question: ...\\nAnswer:", continuations " option"; lm-eval `acc` is kdflow's prediction
  from summed log-likelihoods, `acc_norm` (log-likelihood / characters) kdflow's `predicted_norm`.
Per question the argmaxes are compared, per option the log-likelihoods, and the token ids both tools feed
the model. Throughput: the model loaded (not timed), questions in, per-option results out: kdflow's
HFBackend.score and lm-eval's HFLM.loglikelihood (tokenisation included in both) alternate, after a
warm-up; the median of the rounds is reported. lm-eval's batch is as many rows as kdflow's questions
per batch make: that many prompts (letter), times the mean option count (cloze). Both run on one CPU
thread. Whether the letter-tuned demo model learns letters within its 400 steps depends on the data drawn
(59% accuracy with --quick's 300 + 8,000 demo questions; a 200 + 8,000 draw stayed near chance).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import SummaryRow, alternate, num, parser, publish, spread, timed
from kdflow.label.backends.hf import HFBackend
from kdflow.config import ArchitectureConfig, ScoringConfig, TrainingConfig
from kdflow.data.demo import generate_demo_questions
from kdflow.modeling import build_model, load_pretrained, train_tokenizer
from kdflow.prompts import cloze_context, cloze_continuation, letter_continuation, render_letter
from kdflow.records import LETTERS
from kdflow.scoring import encode, option_logits, tokenize

NAME = "vs_lm_eval"
ARCH = ArchitectureConfig(hidden_size=128, num_layers=4, num_heads=4, vocab_size=2048)
TRAIN_QUESTIONS = 8000
MODES = ("letter", "cloze")
SHOWN_DISAGREEMENTS = 5
DONE_WHEN = {"agreement": 0.995, "max_abs_loglik_diff": 1e-4, "speedup": 1.5}


def fine_tuned_model(root: Path, rows: Sequence[dict[str, Any]], tokenizer: Any, mode: str, steps: int) -> Any:
    """The demo architecture on `tokenizer`, fine-tuned in `mode` with kdflow's recipe; returns the model."""
    from kdflow.fitting.recipe import train
    from kdflow.train.losses import distillation_objective

    torch.manual_seed(0)
    model = build_model(ARCH, tokenizer)
    cfg = TrainingConfig(alpha=1.0, max_steps=steps, batch_size=32, learning_rate=3e-3, checkpoint_every=steps,
                         warmup_ratio=0.1)
    scoring = ScoringConfig(mode=mode, chat_template="off")
    result = train(model, tokenizer, rows, cfg, scoring, objective=distillation_objective(cfg),
                   out_dir=root / f"train-{mode}", progress=False)
    model, _ = load_pretrained(str(result.final_dir), dtype="float32", device="cpu")
    return model


def requests_for(questions: Sequence[dict[str, Any]], tokenizer: Any, scoring: ScoringConfig) -> list[Any]:
    """lm-eval loglikelihood requests (context, continuation) for every option, from kdflow's renderer."""
    from lm_eval.api.instance import Instance

    requests = []
    for q in questions:
        if scoring.mode == "letter":
            prompt = render_letter(q["question"], q["options"], q["category"], tokenizer, scoring)
            pairs = [(prompt.text, letter_continuation(prompt, L)) for L in LETTERS[: len(q["options"])]]
        else:
            context = cloze_context(q["question"], q["category"], scoring)
            pairs = [(context, cloze_continuation(o)) for o in q["options"]]
        requests += [
            Instance(request_type="loglikelihood", doc=q, arguments=pair, idx=i, metadata=(scoring.mode, 0, 1))
            for i, pair in enumerate(pairs)
        ]
    return requests


def per_question(values: Sequence[float], questions: Sequence[dict[str, Any]]) -> list[list[float]]:
    out, at = [], 0
    for q in questions:
        out.append(list(values[at : at + len(q["options"])]))
        at += len(q["options"])
    return out


def lm_eval_logliks(lm: Any, requests: list[Any], questions: Sequence[dict[str, Any]]) -> list[list[float]]:
    return per_question([float(ll) for ll, _greedy in lm.loglikelihood(requests, disable_tqdm=True)], questions)


def kdflow_scores(model: torch.nn.Module, tokenizer: Any, questions: Sequence[dict[str, Any]],
                  scoring: ScoringConfig, batch: int) -> list[list[float]]:
    """kdflow's per-option log-likelihoods (option_logits scores: letter log-prob, cloze summed)."""
    out: list[list[float]] = []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        with torch.inference_mode():
            scores = option_logits(model, encode(chunk, tokenizer, scoring)).scores
        out += [row[: len(q["options"])] for row, q in zip(scores.tolist(), chunk)]
    return out


def token_ids_identical(lm: Any, tokenizer: Any, questions: Sequence[dict[str, Any]], requests: list[Any],
                        scoring: ScoringConfig) -> int:
    """Questions whose every (context + continuation) token ids are the same in lm-eval and kdflow."""
    theirs = per_question([sum(lm._encode_pair(*r.args), []) for r in requests], questions)
    same = 0
    for enc, their_rows in zip(tokenize(questions, tokenizer, scoring), theirs):
        if scoring.mode == "letter":
            ours = [list(enc.row) + [forms[0]] for forms in enc.letter_ids]
        else:
            ours = [list(row) for row in enc.option_rows]
        same += ours == their_rows
    return same


def argmax(rows: Sequence[Sequence[float]], norms: Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """First index of each row's maximum (both tools break ties this way)."""
    if norms is None:
        return np.array([int(np.argmax(r)) for r in rows])
    return np.array([int(np.argmax(np.array(r) / np.array(n))) for r, n in zip(rows, norms)])


def max_abs_diff(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    return max(float(np.max(np.abs(np.array(x) - np.array(y)))) for x, y in zip(a, b))


@contextlib.contextmanager
def counted_forward(model: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Rows and token positions (padding included) that `model` runs through while the block runs."""
    counts = {"forward_calls": 0, "rows": 0, "token_positions": 0}
    forward = model.forward

    @functools.wraps(forward)  # keeps forward's signature, which kdflow reads (logits_to_keep, cache)
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


def compare_mode(model: Any, tokenizer: Any, mode: str, questions: list[dict[str, Any]], repeats: int,
                 batch: int) -> dict[str, Any]:
    """Agreement and throughput of kdflow and lm-eval on one model and scoring mode."""
    from lm_eval.models.huggingface import HFLM

    # lm-eval scores plain text here, so kdflow renders without the chat template too; cloze predicts from
    # summed log-likelihoods (acc) and, with length_normalise, per character (acc_norm) beside it.
    scoring = ScoringConfig(mode=mode, chat_template="off", length_normalise=True)
    backend = HFBackend(model, tokenizer, scoring, batch_size=batch, device="cpu")
    n = len(questions)
    mean_options = sum(len(q["options"]) for q in questions) / n
    rows_per_pass = batch if mode == "letter" else round(batch * mean_options)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=rows_per_pass, max_length=4096)
    requests = requests_for(questions, tokenizer, scoring)

    # Warm-up (first allocations, lazy imports) that also gives the answers.
    with counted_forward(model) as our_work:
        labels = backend.score(questions)
    with counted_forward(model) as their_work:
        theirs_ll = lm_eval_logliks(lm, requests, questions)
    ours_ll = kdflow_scores(model, tokenizer, questions, scoring, batch)
    gold = np.array([q["answer"] for q in questions])
    ours = np.array([s.label.predicted for s in labels])
    theirs = argmax(theirs_ll)
    agreement: dict[str, Any] = {
        "questions": n,
        "agree": int((ours == theirs).sum()),
        "max_abs_loglik_diff": max_abs_diff(ours_ll, theirs_ll),
        "token_ids_identical": token_ids_identical(lm, tokenizer, questions, requests, scoring),
        "kdflow_accuracy": float((ours == gold).mean()),
        "lm_eval_acc": float((theirs == gold).mean()),
        "share_predicting_option_a": {"kdflow": float((ours == 0).mean()), "lm_eval": float((theirs == 0).mean()),
                                      "gold": float((gold == 0).mean())},
        "max_prompt_tokens": max(e.n_tokens for e in tokenize(questions, tokenizer, scoring)),
        "disagreements": [
            {"question_id": questions[i]["question_id"], "kdflow": int(ours[i]), "lm_eval": int(theirs[i]),
             "kdflow_ll": [round(s, 5) for s in ours_ll[i]], "lm_eval_ll": [round(s, 5) for s in theirs_ll[i]]}
            for i in np.flatnonzero(ours != theirs)[:SHOWN_DISAGREEMENTS]
        ],
    }
    if mode == "cloze":
        lengths = [[float(len(o.strip())) for o in q["options"]] for q in questions]
        ours_norm = np.array([s.label.predicted_norm for s in labels])
        theirs_norm = argmax(theirs_ll, lengths)
        agreement.update(
            agree_norm=int((ours_norm == theirs_norm).sum()),
            kdflow_accuracy_norm=float((ours_norm == gold).mean()),
            lm_eval_acc_norm=float((theirs_norm == gold).mean()),
        )

    qps = alternate(
        {
            "kdflow": lambda: n / timed(lambda: backend.score(questions))[0],
            "lm_eval": lambda: n / timed(lambda: lm.loglikelihood(requests, disable_tqdm=True))[0],
        },
        repeats,
    )
    return {
        "agreement": agreement,
        "work": {"kdflow": our_work, "lm_eval": their_work},
        "rows_per_forward_pass": {"kdflow": f"{batch} questions", "lm_eval": rows_per_pass},
        "kdflow_qps": spread(qps["kdflow"]),
        "lm_eval_qps": spread(qps["lm_eval"]),
        "ratio": spread([a / b for a, b in zip(qps["kdflow"], qps["lm_eval"])]),
    }


def smollm2() -> tuple[Any, Any] | None:
    """SmolLM2-135M-Instruct from the test model cache, or None when it has not been fetched."""
    cache = Path(os.environ.get("KDFLOW_MODEL_CACHE", Path.home() / ".cache" / "kdflow" / "models"))
    directory, gguf = cache / "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (directory / gguf).exists():
        return None
    return load_pretrained(str(directory), dtype="float32", device="cpu", gguf_file=gguf)


def run(quick: bool, models: Sequence[str] = ()) -> dict[str, Any]:
    import tempfile

    n_questions, n_real, cloze_steps, letter_steps, repeats = (300, 100, 100, 400, 3) if quick else (
        1000, 400, 100, 400, 5)
    # One thread for both tools: on a shared 2-core machine a second thread mostly measures the neighbours.
    torch.set_num_threads(1)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for name in ("lm_eval", "lm-eval", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = generate_demo_questions(TRAIN_QUESTIONS + n_questions).to_pylist()
    train_rows, questions = rows[:TRAIN_QUESTIONS], rows[TRAIN_QUESTIONS:]
    tokenizer = train_tokenizer((" ".join([r["question"], *r["options"]]) for r in train_rows), ARCH.vocab_size)
    results: dict[str, Any] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-lmeval-") as tmp:
        seconds = {}
        for mode, steps in (("cloze", cloze_steps), ("letter", letter_steps)):
            seconds[mode], model = timed(lambda: fine_tuned_model(Path(tmp), train_rows, tokenizer, mode, steps))
            results[f"demo-{mode}"] = {m: compare_mode(model, tokenizer, m, questions, repeats, 64) for m in MODES}
    real = smollm2()
    if real is None:
        notes["SmolLM2-135M"] = "not in the model cache: run python tests/real_models.py"
    else:
        model, real_tokenizer = real
        results["SmolLM2-135M"] = {
            m: compare_mode(model, real_tokenizer, m, questions[:n_real], repeats, 16) for m in MODES
        }
    for model_dir in models:
        model, tok = load_pretrained(model_dir, dtype="float32", device="cpu")
        results[model_dir] = {m: compare_mode(model, tok, m, questions[:n_real], repeats, 16) for m in MODES}
    return {
        "inputs": {"questions": n_questions, "real_model_questions": n_real, "quick": quick,
                   "fine_tune_steps": {"cloze": cloze_steps, "letter": letter_steps},
                   "fine_tune_seconds": {k: round(v, 1) for k, v in seconds.items()}, "repeats": repeats,
                   "kdflow_batch_questions": {"demo": 64, "real": 16}, "model": ARCH.model_dump(),
                   "extra_models": list(models), "notes": notes},
        "results": results,
    }


def done_when(r: dict[str, Any]) -> dict[str, bool]:
    a = r["agreement"]
    checks = {
        "agreement": a["agree"] / a["questions"] >= DONE_WHEN["agreement"],
        "loglik": a["max_abs_loglik_diff"] <= DONE_WHEN["max_abs_loglik_diff"],
        "speedup": r["ratio"]["median"] >= DONE_WHEN["speedup"],
    }
    if "agree_norm" in a:
        checks["agreement_norm"] = a["agree_norm"] / a["questions"] >= DONE_WHEN["agreement"]
    return checks


def summarise(result: dict[str, Any]) -> list[SummaryRow]:
    rows = []
    for label, modes in result["results"].items():
        for mode, r in modes.items():
            a = r["agreement"]
            n = a["questions"]
            same = f"same argmax {a['agree']}/{n}"
            if mode == "cloze":
                same += f", acc_norm {a['agree_norm']}/{n}"
                acc = (f"acc {a['kdflow_accuracy']:.1%} vs {a['lm_eval_acc']:.1%}, acc_norm "
                       f"{a['kdflow_accuracy_norm']:.1%} vs {a['lm_eval_acc_norm']:.1%}")
            else:
                picks_a = a["share_predicting_option_a"]
                acc = (f"acc {a['kdflow_accuracy']:.1%} vs {a['lm_eval_acc']:.1%}; answers A "
                       f"{picks_a['kdflow']:.0%} vs {picks_a['lm_eval']:.0%} (gold {picks_a['gold']:.0%})")
            work = r["work"]
            failed = [k for k, ok in done_when(r).items() if not ok]
            rows.append(SummaryRow(
                NAME, f"{mode} labeling, {label}",
                num(r["kdflow_qps"]["median"], "q/s"),
                f"lm-eval {num(r['lm_eval_qps']['median'], 'q/s')}",
                f"{r['ratio']['median']:.2f}x",
                f"{same}; max |d ll| {a['max_abs_loglik_diff']:.0e}; token ids identical {a['token_ids_identical']}/{n}; "
                f"{acc}; rows / token positions {work['kdflow']['rows']:,} / {work['kdflow']['token_positions']:,} "
                f"vs {work['lm_eval']['rows']:,} / {work['lm_eval']['token_positions']:,}; "
                + ("done-when met" if not failed else f"done-when NOT met: {', '.join(failed)}"),
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
    figures = {f"{label}/{mode}": {**r, "done_when": done_when(r)} for label, modes in result["results"].items()
               for mode, r in modes.items()}
    publish(NAME, "kdflow vs lm-evaluation-harness", inputs=result["inputs"], figures=figures, ratios=ratios,
            summary=summary,
            findings={k: {m: r["agreement"] for m, r in v.items()} for k, v in result["results"].items()})


if __name__ == "__main__":
    main()
