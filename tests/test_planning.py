"""The capacity planner on the seed's real pair (offline presets, exact meta-device parameter counts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdflow.config import load_config
from kdflow.errors import KdflowError
from kdflow.planning import plan

SEED = Path(__file__).resolve().parent.parent / "configs" / "qwen3-235b-to-30b.yaml"


@pytest.fixture(scope="module")
def seed_plan():
    return plan(load_config(SEED), questions=50_000, tokens_per_question=700)


def test_seed_pair_parameter_counts_match_the_published_sizes(seed_plan):
    label, train = seed_plan
    assert label.model == "Qwen/Qwen3-235B-A22B-FP8" and train.model == "Qwen/Qwen3-30B-A3B"
    assert 234e9 < label.weights_gb * 1e9 < 236e9  # FP8: one byte per parameter
    assert 60e9 < train.weights_gb * 1e9 < 62e9  # bf16 30.5B
    # 2 x 22.2B active parameters x 35M tokens
    assert label.flops == pytest.approx(2 * 22.19e9 * 50_000 * 700, rel=0.01)


def test_fp8_teacher_fits_tensor_parallel_4_and_lora_student_trains_on_a_node(seed_plan):
    label, train = seed_plan
    assert label.layout.startswith("TP4 x 2 replicas")
    assert train.gpus == 8 and "LoRA" in train.layout
    assert 0 < label.hours < 1 and 0 < train.hours < 1


def test_full_fine_tune_needs_far_more_memory_than_lora():
    cfg = load_config(SEED, ["student.lora.enabled=false"])
    full = plan(cfg, questions=50_000, tokens_per_question=700)[1]
    assert full.memory_gb_needed > 400 and "full" in full.layout


def test_fresh_demo_models_and_bad_gpu():
    plans = plan(load_config(None), questions=50_000, tokens_per_question=30)
    assert plans[0].gpus >= 1 and plans[0].weights_gb < 0.01
    with pytest.raises(KdflowError, match="unknown GPU"):
        plan(load_config(None), questions=1, tokens_per_question=1, gpu_name="tpu")
