"""Teacher labeling throughput: the 50K demo questions through the label stage, and batching vs one at a time.

    .venv/bin/python -m bench.labeling [--quick] [--model DIR]

The headline is what `kdflow label` does on the demo: every demo question scored by the demo teacher with
the hf backend (length-bucketed batches of teacher.batch_size) and committed to a fresh DuckDB store by
kdflow.label.labeling.label_questions, in questions/s and token positions/s (the positions the forward passes
run, padding excluded). The comparison is the same model scoring one question per forward pass, the way
a hand-written loop over questions would: rounds alternate a batched and a one-at-a-time pass over
samples of the same questions, and the ratio is the median of the per-round ratios.
The teacher has the demo config's shape; with --model DIR it is that prepared teacher (throughput does
not depend on the weights, so fresh ones are the default and need no pipeline run first).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from bench._common import SummaryRow, num, parser, publish, spread, timed
from kdflow.label.backends.hf import HFBackend
from kdflow.config import DemoSource, SourceConfig, SplitConfig, load_config
from kdflow.ingest.datasets import ingest_source
from kdflow.label.labeling import label_questions, teacher_key
from kdflow.modeling import build_model, load_pretrained, train_tokenizer
from kdflow.scoring import tokenize
from kdflow.store import Store

NAME = "labeling"
DEMO = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
COMMIT_EVERY = max(DEMO.teacher.batch_size * 8, 256)  # as kdflow.label.teacher.label_with_teacher commits


def teacher(rows: list[dict[str, Any]], model_dir: str | None) -> tuple[torch.nn.Module, Any]:
    if model_dir:
        return load_pretrained(model_dir)
    arch = DEMO.teacher.architecture
    tokenizer = train_tokenizer((" ".join([r["question"], *r["options"]]) for r in rows), arch.vocab_size)
    torch.manual_seed(0)
    return build_model(arch, tokenizer).eval(), tokenizer


def positions(rows: list[dict[str, Any]], tokenizer: Any) -> int:
    return sum(e.n_tokens for e in tokenize(rows, tokenizer, DEMO.scoring))


def run(quick: bool, model_dir: str | None) -> dict[str, Any]:
    n_questions, rounds, batched_sample, single_sample = (10_000, 2, 2048, 256) if quick else (50_000, 3, 4096, 512)
    with tempfile.TemporaryDirectory() as home:
        store = Store(Path(home))
        source = SourceConfig(demo=DemoSource(n_questions=n_questions))
        dataset_id = ingest_source(store, source, SplitConfig()).dataset_id
        rows = store.arrow("unlabeled_questions", dataset_ids=[dataset_id], teacher_key="none").to_pylist()
        model, tokenizer = teacher(rows, model_dir)

        def backend(batch_size: int) -> HFBackend:
            return HFBackend(model, tokenizer, DEMO.scoring, batch_size=batch_size, device="cpu")

        backend(DEMO.teacher.batch_size).score(rows[:DEMO.teacher.batch_size])  # warm-up
        stage_s, report = timed(lambda: label_questions(store, lambda: backend(DEMO.teacher.batch_size), [dataset_id],
                                                        teacher_key({"bench": NAME}), commit_every=COMMIT_EVERY))
        if report.newly_labeled != n_questions:
            raise RuntimeError(f"labeled {report.newly_labeled} of {n_questions} questions")

    sample_b, sample_1 = rows[:batched_sample], rows[batched_sample:batched_sample + single_sample]
    batched_qps, single_qps = [], []
    for _ in range(rounds):
        batched_qps.append(len(sample_b) / timed(lambda: backend(DEMO.teacher.batch_size).score(sample_b))[0])
        single_qps.append(len(sample_1) / timed(lambda: backend(1).score(sample_1))[0])
    all_positions = positions(rows, tokenizer)
    return {
        "inputs": {"questions": n_questions, "rounds": rounds, "batched_sample": batched_sample,
                   "single_sample": single_sample, "batch_size": DEMO.teacher.batch_size, "commit_every": COMMIT_EVERY,
                   "scoring": DEMO.scoring.model_dump(mode="json"),
                   "model": model_dir or DEMO.teacher.architecture.model_dump(),
                   "torch_threads": torch.get_num_threads()},
        "figures": {
            "label_stage_seconds": stage_s,
            "label_stage_questions_per_s": n_questions / stage_s,
            "label_stage_positions_per_s": all_positions / stage_s,
            "token_positions": all_positions,
            "batched_questions_per_s": spread(batched_qps),
            "one_at_a_time_questions_per_s": spread(single_qps),
        },
        "ratios": {"batched_vs_one_at_a_time": spread([b / s for b, s in zip(batched_qps, single_qps)])},
    }


def summarise(result: dict[str, Any]) -> list[SummaryRow]:
    f, r, i = result["figures"], result["ratios"], result["inputs"]
    return [
        SummaryRow(
            NAME, f"label {i['questions']:,} demo questions into DuckDB",
            num(f["label_stage_questions_per_s"], "q/s"), "", "",
            f"{num(f['label_stage_seconds'], 's')}; {num(f['label_stage_positions_per_s'], 'token positions/s')}; "
            f"hf backend, batches of {i['batch_size']}, commits of {i['commit_every']}",
        ),
        SummaryRow(
            NAME, "hf backend batched vs one question per forward pass",
            num(f["batched_questions_per_s"]["median"], "q/s"),
            f"one at a time {num(f['one_at_a_time_questions_per_s']['median'], 'q/s')}",
            f"{r['batched_vs_one_at_a_time']['median']:.1f}x",
            f"same model, {i['rounds']} alternating rounds on {i['batched_sample']:,} / {i['single_sample']} questions",
        ),
    ]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default=None, help="a prepared teacher directory instead of fresh demo-shaped weights")
    args = p.parse_args()
    result = run(args.quick, args.model)
    summary = summarise(result)
    publish(NAME, "teacher labeling throughput", summary=summary, **result)


if __name__ == "__main__":
    main()
