"""Labeling vs the hardware limit: how much of this machine's matmul speed does HFBackend labeling reach?

    .venv/bin/python -m bench.flops [--quick]

A labeler can only be as fast as the matrix multiplications inside the model, so the figure that says
how much is left to gain is achieved FLOP/s over what a plain torch matmul of the model's own shapes
([tokens, hidden] x [hidden, 4 * hidden]) reaches on the same cores. Model FLOPs are 2 x non-embedding
parameters x real tokens (attention scores and the few kept logits are left out: short prompts, one
answer position); padded positions are computed too, so they are counted separately, as is the share
of padding with HFBackend's length bucketing and with batches taken in input order.
The model is the demo teacher's shape (kdflow's TeacherConfig default) with fresh weights: FLOPs do not
depend on training. Three levels are timed: HFBackend.score end to end (tokenize, bucket, forward, soft
labels), the forward passes alone on the same batches, and the matmul.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bench._common import SummaryRow, num, parser, publish, spread, timed
from kdflow.label.backends.hf import HFBackend
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.data.demo import generate_demo_questions
from kdflow.modeling import build_model, count_parameters, train_tokenizer
from kdflow.scoring import EncodedQuestion, ScoringBatch, collate, option_logits, tokenize

NAME = "flops"
TEACHER = TeacherConfig()
ARCH = TEACHER.architecture
MATMUL_ITERATIONS = 20
# Padding is measured on one label-stage commit batch (kdflow.label.labeling's commit_every), which is what one
# HFBackend.score call buckets; the timed runs use fewer questions, to keep the benchmark short.
PADDING_QUESTIONS = 1024


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters a token's forward pass multiplies with (embeddings are a lookup; lm_head is tied)."""
    return count_parameters(model)[0] - model.get_input_embeddings().weight.numel()


def batches(encoded: Sequence[EncodedQuestion], order: Sequence[Sequence[int]], pad_id: int) -> list[ScoringBatch]:
    return [collate([encoded[i] for i in indices], pad_id=pad_id) for indices in order]


def padding(batch_list: Sequence[ScoringBatch]) -> dict[str, Any]:
    real = sum(b.real_tokens for b in batch_list)
    pad = sum(b.pad_tokens for b in batch_list)
    return {"real_tokens": real, "pad_tokens": pad, "pad_share": pad / (real + pad)}


def forward_seconds(model: torch.nn.Module, batch_list: Sequence[ScoringBatch]) -> float:
    def run() -> None:
        with torch.inference_mode():
            for batch in batch_list:
                option_logits(model, batch)

    return timed(run)[0]


def matmul_flops_per_s(tokens: int, hidden: int, width: int) -> float:
    """FLOP/s of [tokens, hidden] x [hidden, width], the model's widest layer, over a short loop."""
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, width)
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up: allocation, kernel choice
        seconds = timed(lambda: [torch.matmul(a, b) for _ in range(MATMUL_ITERATIONS)])[0]
    return 2 * tokens * hidden * width * MATMUL_ITERATIONS / seconds


def run(quick: bool) -> dict[str, Any]:
    n_questions, repeats = (150, 2) if quick else (500, 3)
    rows = generate_demo_questions(PADDING_QUESTIONS).to_pylist()
    questions = rows[:n_questions]
    tokenizer = train_tokenizer((" ".join([q["question"], *q["options"]]) for q in rows), ARCH.vocab_size)
    torch.manual_seed(0)
    model = build_model(ARCH, tokenizer).eval()
    scoring = ScoringConfig()
    size = TEACHER.batch_size
    backend = HFBackend(model, tokenizer, scoring, batch_size=size, device="cpu")
    params = non_embedding_parameters(model)
    pad_id = tokenizer.pad_token_id or 0

    # The product's own bucketing (sorted by length, then cut) against cutting in input order.
    all_encoded = tokenize(rows, tokenizer, scoring)
    in_order = [range(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]
    padding_bucketed = padding(batches(all_encoded, list(backend._buckets(all_encoded)), pad_id))
    padding_in_order = padding(batches(all_encoded, in_order, pad_id))

    encoded = all_encoded[:n_questions]
    timed_batches = batches(encoded, list(backend._buckets(encoded)), pad_id)
    tokens = padding(timed_batches)
    real, computed = tokens["real_tokens"], tokens["real_tokens"] + tokens["pad_tokens"]
    tokens_per_batch = round(computed / len(timed_batches))
    width = ARCH.intermediate_size or 4 * ARCH.hidden_size

    backend.score(questions[:size])  # warm-up
    label_s, forward_s, matmul = [], [], []
    for _ in range(repeats):  # the three side by side in each round, so load changes hit them alike
        label_s.append(timed(lambda: backend.score(questions))[0])
        forward_s.append(forward_seconds(model, timed_batches))
        matmul.append(matmul_flops_per_s(tokens_per_batch, ARCH.hidden_size, width))

    def flops(seconds: list[float], positions: int) -> list[float]:
        return [2 * params * positions / s for s in seconds]

    def vs_matmul(achieved: list[float]) -> dict[str, Any]:
        return spread([a / m for a, m in zip(achieved, matmul)])

    return {
        "inputs": {"questions": n_questions, "padding_questions": PADDING_QUESTIONS, "repeats": repeats,
                   "batch_size": size, "scoring_mode": scoring.mode, "model": ARCH.model_dump(),
                   "non_embedding_parameters": params, "matmul_shape": [tokens_per_batch, ARCH.hidden_size, width],
                   "timed_tokens": tokens},
        "figures": {
            "labeling_seconds": spread(label_s),
            "labeling_questions_per_s": spread([n_questions / s for s in label_s]),
            "labeling_flops_per_s_real_tokens": spread(flops(label_s, real)),
            "labeling_flops_per_s_with_padding": spread(flops(label_s, computed)),
            "forward_only_flops_per_s_real_tokens": spread(flops(forward_s, real)),
            "matmul_flops_per_s": spread(matmul),
            "padding_bucketed": padding_bucketed,
            "padding_input_order": padding_in_order,
        },
        "ratios": {
            "labeling_vs_matmul": vs_matmul(flops(label_s, real)),
            "forward_only_vs_matmul": vs_matmul(flops(forward_s, real)),
        },
    }


def summarise(result: dict[str, Any]) -> list[SummaryRow]:
    f, r = result["figures"], result["ratios"]
    return [
        SummaryRow(
            NAME, "labeling FLOP/s (real tokens)",
            num(f["labeling_flops_per_s_real_tokens"]["median"] / 1e9, "GFLOP/s"),
            f"torch matmul {num(f['matmul_flops_per_s']['median'] / 1e9, 'GFLOP/s')}",
            f"{r['labeling_vs_matmul']['median']:.1%}",
            f"forward passes alone {r['forward_only_vs_matmul']['median']:.1%} of the matmul; "
            f"{num(f['labeling_questions_per_s']['median'], 'q/s')}",
        ),
        SummaryRow(
            NAME, "padded share of computed tokens",
            f"{f['padding_bucketed']['pad_share']:.1%}",
            f"input order {f['padding_input_order']['pad_share']:.1%}",
            "",
            f"HFBackend length bucketing vs none ({PADDING_QUESTIONS} questions, batches of {TEACHER.batch_size})",
        ),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    result = run(args.quick)
    summary = summarise(result)
    publish(NAME, "labeling vs the hardware limit", summary=summary, **result)


if __name__ == "__main__":
    main()
