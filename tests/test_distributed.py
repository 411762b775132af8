"""Training in two CPU processes (gloo) follows the single-process run: same loss curve, checkpoints, resume.

The slow tests launch real workers through `launch_training` (torchrun, `python -m kdflow.train.worker`),
as `kdflow train` does with training.num_processes: 2; each launch costs ~15 s of process start-up.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import toy_training as toy
from safetensors.torch import load_file
from toy_training import one_thread  # noqa: F401 (autouse fixture)

from kdflow.fitting.checkpoints import read_checkpoint
from kdflow.config import LoraConfig, TrainingConfig
from kdflow.fitting.distributed import Processes, join
from kdflow.train.launcher import _EventReader, _outcome, launch_training
from kdflow.errors import KdflowError, TransientError
from kdflow.modeling import load_pretrained
from kdflow.train.initialisation import with_lora
from kdflow.fitting.recipe import TrainingCancelled, train
from kdflow.train.losses import distillation_objective
from kdflow.fitting.reporting import TrainingDiverged

# A global micro-batch of 8 (4 per process), accumulated twice: both processes' slices and the
# accumulation are exercised. Steps 3 and 6 validate and checkpoint.
CFG = toy.WORKER_CONFIG.model_copy(update={"max_steps": 6, "grad_accum": 2, "eval_every": 3, "checkpoint_every": 3})
CURVE = ("loss", "ce", "kd", "grad_norm", "lr", "epoch")


@pytest.fixture(scope="module")
def tok():
    return toy.tokenizer()


@pytest.fixture(scope="module")
def labeled():
    return toy.worker_examples()


def _lora_model(tok):
    # No LoRA dropout: each process drops out on its own slice, so dropout alone would part the curves.
    return with_lora(toy.fresh_model(tok), LoraConfig(enabled=True, r=4, dropout=0.0))


def _single(model, tok, labeled, cfg, out_dir, resume=False):
    rows: list[dict] = []
    result = train(model, tok, labeled[0], cfg, toy.SCORING, objective=distillation_objective(cfg), out_dir=out_dir, val_examples=labeled[1],
                   resume=resume, progress=False, on_metrics=rows.extend)
    return result, rows


def _launch(model, tok, labeled, cfg, out_dir, **kwargs):
    rows: list[dict] = []
    saved: list[int] = []
    try:
        result = launch_training(
            model, tok, labeled[0], cfg.model_copy(update={"num_processes": 2}), toy.SCORING, out_dir=out_dir,
            val_examples=labeled[1], progress=False, on_metrics=rows.extend,
            on_checkpoint=lambda step, path, metrics: saved.append(step), **kwargs,
        )
    except TrainingCancelled as cancelled:
        return cancelled, rows, saved
    return result, rows, saved


def _assert_same_curve(rows: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for key in CURVE:
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference], rel=1e-4), key
    assert [r["val_accuracy"] for r in rows] == [r["val_accuracy"] for r in reference]


def _assert_same_weights(path, reference_path) -> None:
    weights, expected = load_file(str(path)), load_file(str(reference_path))
    assert weights.keys() == expected.keys()
    gaps = {k: float((weights[k] - expected[k]).abs().max()) for k in expected}
    # 1e-4, not 1e-5: the all-reduce sums gradients in another order, and an embedding row that the batch
    # barely touches gets a near-zero gradient whose rounding Adam scales up to a step of ~lr (seen: 2.9e-5 on
    # embed_tokens after 6 steps, every other tensor within 4e-7).
    assert max(gaps.values()) <= 1e-4, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.slow  # one launch of two worker processes
def test_two_processes_follow_the_single_process_curve(tok, labeled, tmp_path):
    reference, reference_rows = _single(toy.fresh_model(tok), tok, labeled, CFG, tmp_path / "reference")

    run_dir = tmp_path / "distributed"
    result, rows, saved = _launch(toy.fresh_model(tok), tok, labeled, CFG, run_dir)
    _assert_same_curve(rows, reference_rows)
    assert saved == [3, 6] and result.steps == 6
    assert (result.val_accuracy, result.best_val_accuracy, result.best_step) == (
        reference.val_accuracy, reference.best_val_accuracy, reference.best_step)
    assert result.final_dir == run_dir / "final" and not (run_dir / "launch").exists()
    _assert_same_weights(result.final_dir / "model.safetensors", reference.final_dir / "model.safetensors")
    exported, _ = load_pretrained(str(result.final_dir), device="cpu")
    assert toy.accuracy(exported, tok, labeled[1]) == reference.val_accuracy



@pytest.mark.slow  # two launches of two worker processes
def test_fsdp_lora_resumes_after_a_cancellation_onto_the_single_process_curve(tok, labeled, tmp_path):
    cfg = CFG.model_copy(update={"learning_rate": 1e-2})
    reference, reference_rows = _single(_lora_model(tok), tok, labeled, cfg, tmp_path / "reference")
    sharded = cfg.model_copy(update={"fsdp": True})

    # should_stop is asked here, in the parent, before the workers have finished their first step: they
    # all stop after step 1 with a checkpoint, and the parent raises the cancellation.
    run_dir = tmp_path / "fsdp"
    cancelled, rows, saved = _launch(_lora_model(tok), tok, labeled, sharded, run_dir, should_stop=lambda: True)
    assert isinstance(cancelled, TrainingCancelled) and cancelled.step == 1 and saved == [1]
    assert cancelled.checkpoint == run_dir / "checkpoints" / "step-1"
    _assert_same_curve(rows, reference_rows[:1])

    # One checkpoint format for any number of processes: a single process resumes the two-process one.
    shutil.copytree(run_dir / "checkpoints" / "step-1", tmp_path / "single" / "checkpoints" / "step-1")
    _, single_rows = _single(_lora_model(tok), tok, labeled, cfg, tmp_path / "single", resume=True)
    _assert_same_curve(single_rows, reference_rows[1:])

    # Resuming hands every process its shards of the weights and of Adam's moments.
    result, resumed_rows, saved = _launch(_lora_model(tok), tok, labeled, sharded, run_dir, resume=True)
    _assert_same_curve(resumed_rows, reference_rows[1:])
    assert saved == [3, 6] and result.steps == 6

    # Checkpoints hold the shards gathered whole, in the single-process layout, plus rank 1's RNG.
    written = read_checkpoint(run_dir / "checkpoints" / "step-6")  # the newest, the one kept
    expected = read_checkpoint(tmp_path / "reference" / "checkpoints" / "step-6")
    assert written.weights.keys() == expected.weights.keys() and all("lora_" in k for k in written.weights)
    assert all(torch.allclose(written.weights[k], v, atol=1e-6) for k, v in expected.weights.items())
    for index, entries in expected.optimizer_state["state"].items():
        for name, value in entries.items():
            assert torch.allclose(written.optimizer_state["state"][index][name], value, atol=1e-6), (index, name)
    assert {"rng.cpu", "rank1.rng.cpu"} <= written.rng.keys()
    # The main process exported the adapter merged into a plain model, as one process does.
    _assert_same_weights(result.final_dir / "model.safetensors", reference.final_dir / "model.safetensors")


def test_each_process_takes_a_disjoint_slice_of_the_global_batch():
    batch = list(range(10, 18))
    slices = [Processes(device=torch.device("cpu"), rank=r, world_size=2).local(batch) for r in range(2)]
    assert slices == [[10, 11, 12, 13], [14, 15, 16, 17]]
    short = [Processes(device=torch.device("cpu"), rank=r, world_size=4).local([1, 2, 3]) for r in range(4)]
    assert short == [[1], [2], [3], []]
    assert Processes(device=torch.device("cpu")).local(batch) == batch


@pytest.mark.parametrize(
    ("world", "update", "message"),
    [
        (None, {"num_processes": 2}, "num_processes: 1"),
        (None, {"fsdp": True}, "training.fsdp shards"),
        ("4", {"num_processes": 2}, "set training.num_processes: 4"),
        ("2", {"num_processes": 2, "batch_size": 5}, "multiple of 2"),
    ],
)
def test_process_settings_are_checked_before_anything_starts(monkeypatch, world, update, message):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(KdflowError, match=message):
        join(TrainingConfig(**update), torch.device("cpu"))


def test_the_parent_reads_only_complete_event_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    reader = _EventReader(path)
    assert reader.read() == []
    path.write_text('{"kind": "metrics", "rows": []}\n{"kind": "chec')
    assert reader.read() == [{"kind": "metrics", "rows": []}]
    with path.open("a") as handle:
        handle.write('kpoint", "step": 3}\n')
    assert reader.read() == [{"kind": "checkpoint", "step": 3}]


def test_worker_outcomes_are_raised_in_the_parent_as_they_were(tmp_path):
    def lost() -> str:
        return "the training workers exited with code -9 before reporting a result; their log ends with: killed"

    with pytest.raises(TrainingDiverged, match="the loss is nan"):
        _outcome({"kind": "error", "type": "TrainingDiverged", "message": "the loss is nan"}, lost, 1.0)
    with pytest.raises(ValueError, match="needs teacher probs"):
        _outcome({"kind": "error", "type": "ValueError", "message": "example 0 needs teacher probs"}, lost, 1.0)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        _outcome({"kind": "error", "type": "ZeroDivisionError", "message": "division by zero"}, lost, 1.0)
    with pytest.raises(TrainingCancelled, match="after step 4"):
        _outcome({"kind": "cancelled", "step": 4, "checkpoint": str(tmp_path / "step-4")}, lost, 1.0)
    # Workers that vanish without a word (killed, lost) are worth a retry; the message says why.
    with pytest.raises(TransientError, match="killed"):
        _outcome(None, lost, 1.0)
