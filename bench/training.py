"""The KD loop vs a plain CE fine-tune of the same student on the same data: what does distillation cost?

    .venv/bin/python -m bench.training [--quick]

Distillation should cost no more than the fine-tune it replaces: the teacher's probabilities are
precomputed, so the KD term is a loss over [batch, options] and should not show in samples/s or memory.
Both runs call kdflow.fitting.recipe.train on the demo student (kdflow's StudentConfig default, fresh weights
from one seed) with the same examples, steps and batch size: KD with alpha 0.5 and teacher-like soft
labels, CE with alpha 1 and no labels (the fine-tune a user would otherwise run). They alternate, three
rounds (two with --quick). samples/s is the recipe's own loop figure (without tokenizing up front and
the final export); peak RSS is sampled during each run (psutil; without it the process peak, which only
grows).
"""

from __future__ import annotations

import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bench._common import SummaryRow, num, parser, publish, spread, teacher_like_labels
from kdflow.config import ScoringConfig, StudentConfig, TrainingConfig
from kdflow.data.demo import generate_demo_questions
from kdflow.modeling import build_model, train_tokenizer
from kdflow.fitting.recipe import train
from kdflow.train.losses import distillation_objective

NAME = "training"
ARCH = StudentConfig().architecture
SAMPLE_EVERY_S = 0.02


def rss_bytes() -> Callable[[], int]:
    """Current resident set size, or (without psutil) the process peak so far."""
    try:
        import psutil
    except ImportError:
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    process = psutil.Process()
    return lambda: process.memory_info().rss


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Highest RSS seen while the block runs (sampled by a thread; torch releases the GIL in kernels)."""
    read = rss_bytes()
    seen = {"before": read(), "peak": read()}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            seen["peak"] = max(seen["peak"], read())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        seen["peak"] = max(seen["peak"], read())


def train_once(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], cfg: TrainingConfig, root: Path
) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(ARCH, tokenizer)
    with peak_rss() as rss:
        start = time.perf_counter()
        result = train(model, tokenizer, examples, cfg, ScoringConfig(), objective=distillation_objective(cfg),
                       out_dir=root, progress=False)
        wall = time.perf_counter() - start
    return {"samples_per_s": result.samples_per_s, "wall_seconds": wall, "peak_rss_mb": rss["peak"] / 2**20,
            "rss_growth_mb": (rss["peak"] - rss["before"]) / 2**20, "final_loss": result.metrics["loss"]}


def run(quick: bool) -> dict[str, Any]:
    n_examples, steps, repeats = (1000, 20, 2) if quick else (4000, 60, 3)
    rows = generate_demo_questions(n_examples).to_pylist()
    tokenizer = train_tokenizer((" ".join([r["question"], *r["options"]]) for r in rows), ARCH.vocab_size)
    labeled = [{**r, "probs": s.label.probs} for r, s in zip(rows, teacher_like_labels(rows))]
    common = dict(max_steps=steps, batch_size=32, checkpoint_every=steps)
    contenders = {
        "kd": (labeled, TrainingConfig(alpha=0.5, **common)),
        "ce": (rows, TrainingConfig(alpha=1.0, **common)),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-training-") as tmp:
        for _ in range(repeats):
            for name, (examples, cfg) in contenders.items():
                runs[name].append(train_once(tokenizer, examples, cfg, Path(tmp) / name))
    figures = {name: {key: spread([r[key] for r in rs]) for key in rs[0]} for name, rs in runs.items()}
    ratio = spread([k["samples_per_s"] / c["samples_per_s"] for k, c in zip(runs["kd"], runs["ce"])])
    return {
        "inputs": {"examples": n_examples, "steps": steps, "batch_size": 32, "repeats": repeats,
                   "scoring_mode": ScoringConfig().mode, "model": ARCH.model_dump(), "kd_alpha": 0.5},
        "figures": figures,
        "ratios": {"kd_vs_ce_samples_per_s": ratio},
    }


def summarise(result: dict[str, Any]) -> list[SummaryRow]:
    kd, ce = result["figures"]["kd"], result["figures"]["ce"]
    return [
        SummaryRow(
            NAME, "KD training (alpha 0.5) samples/s",
            num(kd["samples_per_s"]["median"], "samples/s"),
            f"CE fine-tune {num(ce['samples_per_s']['median'], 'samples/s')}",
            f"{result['ratios']['kd_vs_ce_samples_per_s']['median']:.2f}x",
            f"peak RSS {num(kd['peak_rss_mb']['median'], 'MB')} vs {num(ce['peak_rss_mb']['median'], 'MB')} "
            f"(growth {num(kd['rss_growth_mb']['median'], 'MB')} vs {num(ce['rss_growth_mb']['median'], 'MB')})",
        )
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    result = run(args.quick)
    summary = summarise(result)
    publish(NAME, "KD loop vs CE fine-tune", summary=summary, **result)


if __name__ == "__main__":
    main()
