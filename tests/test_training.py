from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy_training as toy
from helpers import sigkill_when, worker_env
from safetensors.torch import load_file
from toy_training import one_thread  # noqa: F401 (autouse fixture)

from kdflow.fitting.checkpoints import latest_checkpoint
from kdflow.config import ScoringConfig, TrainingConfig
from kdflow.errors import KdflowError
from kdflow.modeling import load_pretrained
from kdflow.fitting.batches import DataOrder, build_dataset
from kdflow.fitting.optim import build_scheduler, total_steps
from kdflow.fitting.objective import hard_label_objective
from kdflow.fitting.recipe import TrainingCancelled, train
from kdflow.train.losses import distillation_objective
from kdflow.fitting.reporting import DELIVER_EVERY, TrainingDiverged

WORKER = Path(__file__).with_name("toy_training.py")
# Everything but throughput is deterministic on the CPU.
TIMING = {"samples_per_s"}


@pytest.fixture(scope="module")
def tok():
    return toy.tokenizer()


@pytest.fixture(scope="module")
def labeled():
    """The resume worker's data: 64 training questions with made-up soft labels, 16 validation ones."""
    return toy.worker_examples()


def _run(tok, examples, cfg, out_dir, *, val=None, seed=0, **kwargs):
    rows: list[dict] = []
    model = toy.fresh_model(tok, seed=seed)
    result = train(model, tok, examples, cfg, toy.SCORING, objective=distillation_objective(cfg), out_dir=out_dir,
                   val_examples=val, progress=False, on_metrics=rows.extend, **kwargs)
    return model, result, rows


def _deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_teacher_preparation_then_distillation_raises_agreement(tok, tmp_path):
    # A task-tuned teacher first (alpha = 1, gold answers only, no soft labels): the teacher-prep stage.
    train_questions, val, held_out = toy.questions(256, seed=1), toy.questions(32, seed=2), toy.questions(96, seed=3)
    teacher = toy.fresh_model(tok, hidden=48, layers=2)
    prep = TrainingConfig(alpha=1.0, max_steps=80, batch_size=16, learning_rate=1e-2, warmup_ratio=0.1,
                          eval_every=20, eval_questions=32)
    prepared = train(teacher, tok, train_questions, prep, toy.SCORING, objective=hard_label_objective,
                     out_dir=tmp_path / "teacher",
                     val_examples=val, progress=False)
    assert prepared.best_val_accuracy >= 0.9
    assert toy.accuracy(teacher, tok, held_out) >= 0.9

    # A tinier student (half the width, one layer) learns from the teacher's soft labels.
    teacher_answers = toy.predictions(teacher, tok, held_out)
    student = toy.fresh_model(tok, hidden=32, layers=1, seed=1)
    before = (toy.predictions(student, tok, held_out) == teacher_answers).float().mean().item()
    recipe = TrainingConfig(alpha=0.5, temperature=2.0, max_steps=80, batch_size=16, learning_rate=1e-2,
                            warmup_ratio=0.1, eval_every=40, eval_questions=32)
    rows: list[dict] = []
    train(student, tok, toy.with_soft_labels(teacher, tok, train_questions), recipe, toy.SCORING,
          objective=distillation_objective(recipe), out_dir=tmp_path / "student", val_examples=val, progress=False, on_metrics=rows.extend)
    after = (toy.predictions(student, tok, held_out) == teacher_answers).float().mean().item()
    assert before < 0.5 and after >= 0.9, (before, after)
    assert rows[-1]["kd"] < rows[0]["kd"] / 4


def test_metric_rows_mix_the_loss_parts_and_arrive_in_batches(tok, labeled, tmp_path):
    examples, val = labeled
    cfg = TrainingConfig(alpha=0.3, temperature=2.0, max_steps=DELIVER_EVERY + 5, batch_size=4, eval_every=20,
                         eval_questions=8, checkpoint_every=1000)
    deliveries: list[list[dict]] = []
    model = toy.fresh_model(tok)
    result = train(model, tok, examples, cfg, toy.SCORING, objective=distillation_objective(cfg), out_dir=tmp_path,
                   val_examples=val, progress=False, on_metrics=deliveries.append)

    assert [len(d) for d in deliveries] == [DELIVER_EVERY, 5]
    rows = [row for d in deliveries for row in d]
    assert [r["step"] for r in rows] == list(range(1, cfg.max_steps + 1))
    for row in rows:
        assert set(row) == {"step", "epoch", "loss", "ce", "kd", "lr", "grad_norm", "samples_per_s", "val_accuracy"}
        assert row["loss"] == pytest.approx(0.3 * row["ce"] + 0.7 * 4.0 * row["kd"], rel=1e-5)
        assert row["grad_norm"] > 0 and row["samples_per_s"] > 0
        assert row["epoch"] == pytest.approx(row["step"] * 4 / len(examples))
    evaluated = [r["step"] for r in rows if r["val_accuracy"] is not None]
    assert evaluated == [20, 40, cfg.max_steps]
    assert result.metrics == rows[-1] and result.val_accuracy == rows[-1]["val_accuracy"]
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in rows if r["val_accuracy"] is not None)


def test_gold_only_training_needs_no_soft_labels(tok, labeled, tmp_path):
    examples = [{k: v for k, v in q.items() if k != "probs"} for q in labeled[0]]
    cfg = TrainingConfig(alpha=1.0, max_steps=3, batch_size=4)
    _, result, rows = _run(tok, examples, cfg, tmp_path)
    assert result.steps == 3
    assert all(r["kd"] is None and r["loss"] == r["ce"] for r in rows)


def test_unlabeled_questions_learn_from_the_teacher_alone(tok, labeled, tmp_path):
    examples, _ = labeled
    mixed = [dict(q, answer=None) if i % 3 else q for i, q in enumerate(examples)]  # soft labels kept
    cfg = TrainingConfig(alpha=0.3, temperature=2.0, max_steps=5, batch_size=4, checkpoint_every=1000)
    _, result, rows = _run(tok, mixed, cfg, tmp_path / "mixed")
    order = DataOrder(len(mixed), seed=0)
    for row in rows:  # the loss is a mean over questions: the batch's labeled share weighs the CE term
        batch = order.next(4)
        share = sum(mixed[i]["answer"] is not None for i in batch) / 4
        ce = row["ce"] or 0.0  # None: no question of the step had a gold answer
        # An unlabeled question's KD term weighs 1, a labeled one's 1 - alpha: the KD part of the loss lies
        # between 0.7 T^2 kd (every question labeled) and T^2 kd (none), strictly inside with both kinds.
        kd_part = row["loss"] - 0.3 * share * ce
        assert 0.7 * 4.0 * row["kd"] * (1 - 1e-5) <= kd_part <= 4.0 * row["kd"] * (1 + 1e-5)
        if 0 < share < 1:
            assert 0.7 * 4.0 * row["kd"] < kd_part < 4.0 * row["kd"]
    assert result.steps == 5
    _, _, kd_rows = _run(tok, [dict(q, answer=None) for q in examples], cfg, tmp_path / "none")
    assert all(r["ce"] is None and r["loss"] == pytest.approx(4.0 * r["kd"], rel=1e-6) for r in kd_rows)
    with pytest.raises(ValueError, match="s1-q1.*alpha = 1 learns from gold answers alone"):
        _run(tok, mixed, TrainingConfig(alpha=1.0, max_steps=1), tmp_path / "hard")
    with pytest.raises(ValueError, match="s1-q1.*nothing to learn from"):
        build_dataset([{k: v for k, v in q.items() if k != "probs"} for q in mixed], tok, toy.SCORING,
                      with_probs=False)


def test_seeded_runs_are_identical(tok, labeled, tmp_path):
    examples, val = labeled
    cfg = TrainingConfig(max_steps=6, batch_size=4, eval_every=3, eval_questions=8, seeds=[7])

    def run(out_dir):
        model = toy.fresh_model(tok)
        model.config.attention_dropout = 0.2  # draws from torch's RNG, which the run must seed
        rows: list[dict] = []
        train(model, tok, examples, cfg, toy.SCORING, objective=distillation_objective(cfg), out_dir=out_dir,
              val_examples=val, progress=False, on_metrics=rows.extend)
        return rows, model.state_dict()

    rows_a, weights_a = run(tmp_path / "a")
    rows_b, weights_b = run(tmp_path / "b")
    assert _deterministic(rows_a) == _deterministic(rows_b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _lrs(cfg: TrainingConfig, total: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, cfg, total)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_decay_schedules():
    # warm-up of 2 steps (0.2 of 10) from 0 reaches the peak at step 2, then decays over the remaining 8 steps.
    cosine = _lrs(TrainingConfig(warmup_ratio=0.2), 10)
    pinned = {0: 0.0, 1: 0.5, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5}
    pinned[9] = 0.5 * (1 + math.cos(math.pi * 7 / 8))
    assert [cosine[step] for step in pinned] == pytest.approx(list(pinned.values()))
    linear = _lrs(TrainingConfig(warmup_ratio=0.2, lr_schedule="linear"), 10)
    assert linear == pytest.approx([0, 0.5] + [1 - k / 8 for k in range(8)])
    constant = _lrs(TrainingConfig(warmup_ratio=0.2, lr_schedule="constant_with_warmup"), 10)
    assert constant == pytest.approx([0, 0.5] + [1] * 8)
    assert _lrs(TrainingConfig(warmup_ratio=0.0), 10)[0] == 1.0
    assert total_steps(TrainingConfig(epochs=2, batch_size=8, grad_accum=2), 100) == 13
    assert total_steps(TrainingConfig(epochs=2, max_steps=5), 100) == 5


def test_logged_learning_rates_follow_the_schedule(tok, labeled, tmp_path):
    cfg = TrainingConfig(max_steps=10, batch_size=2, learning_rate=0.01, warmup_ratio=0.2)
    _, _, rows = _run(tok, labeled[0], cfg, tmp_path)
    assert [r["lr"] for r in rows] == pytest.approx([0.01 * f for f in _lrs(cfg, 10)])


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(10, seed=1)
    first = order.next(4) + order.next(4) + order.next(4)  # the third batch crosses into epoch 1
    assert sorted(first[:10]) == list(range(10)) and (order.epoch, order.position) == (1, 2)
    assert first[:10] != list(range(10))
    resumed = DataOrder(10, seed=1, epoch=1, position=2)
    assert resumed.next(8) == order.next(8)
    assert DataOrder(10, seed=2).next(10) != first[:10]


def test_grad_accumulation_matches_a_bigger_batch(tok, labeled, tmp_path):
    examples, _ = labeled
    big, _, big_rows = _run(tok, examples, TrainingConfig(max_steps=8, batch_size=8), tmp_path / "big")
    accumulated = TrainingConfig(max_steps=8, batch_size=4, grad_accum=2)
    small, _, small_rows = _run(tok, examples, accumulated, tmp_path / "small")
    for key in ("loss", "ce", "kd", "grad_norm", "epoch", "lr"):
        assert [r[key] for r in small_rows] == pytest.approx([r[key] for r in big_rows], rel=1e-4), key
    big_weights, small_weights = big.state_dict(), small.state_dict()
    # float32 sums in another order: summed (not per-character) cloze log-likelihoods give larger gradients,
    # and the weights differ by ~2e-5 after 8 Adam steps.
    assert all(torch.allclose(big_weights[k], small_weights[k], atol=1e-4) for k in big_weights)


def test_early_stopping_stops_and_exports_the_best_weights(tok, tmp_path):
    # Validation answers are wrong on purpose: the better the model learns the facts, the lower its
    # validation accuracy, so the best check comes early and patience runs out.
    examples = toy.questions(64, seed=1)
    val = [dict(q, answer=(q["answer"] + 1) % 4) for q in toy.questions(32, seed=2)]
    cfg = TrainingConfig(alpha=1.0, max_steps=200, batch_size=8, learning_rate=1e-2, eval_every=5,
                         eval_questions=32, early_stopping_patience=2, checkpoint_every=1000)
    _, result, rows = _run(tok, examples, cfg, tmp_path, val=val)

    assert result.stopped_early and result.steps < cfg.max_steps
    checks = [r["val_accuracy"] for r in rows if r["val_accuracy"] is not None]
    assert checks[-1] < max(checks) == result.best_val_accuracy
    assert result.best_step == rows[[r["val_accuracy"] for r in rows].index(max(checks))]["step"]
    exported, _ = load_pretrained(str(result.final_dir), device="cpu")
    assert toy.accuracy(exported, tok, val) == pytest.approx(result.best_val_accuracy)


def test_cancelled_run_checkpoints_and_resumes_onto_the_same_trajectory(tok, labeled, tmp_path):
    examples, val = labeled
    cfg = TrainingConfig(max_steps=8, batch_size=4, eval_every=3, eval_questions=8, checkpoint_every=5)
    _, reference, reference_rows = _run(tok, examples, cfg, tmp_path / "reference", val=val)

    saved: list[int] = []
    answers = iter([False, False, True])
    with pytest.raises(TrainingCancelled, match="after step 3") as cancelled:
        _run(tok, examples, cfg, tmp_path / "run", val=val, should_stop=lambda: next(answers),
             on_checkpoint=lambda step, path, metrics: saved.append(step))
    assert saved == [3] and cancelled.value.checkpoint == latest_checkpoint(tmp_path / "run" / "checkpoints")

    # A fresh process would build the model again from its seed; resume then restores the rest.
    _, resumed, resumed_rows = _run(tok, examples, cfg, tmp_path / "run", val=val, seed=0, resume=True)
    assert _deterministic(resumed_rows) == _deterministic(reference_rows[3:])
    assert resumed.best_val_accuracy == reference.best_val_accuracy


def test_resume_refuses_changed_settings_and_a_fresh_start_clears_checkpoints(tok, labeled, tmp_path):
    examples = labeled[0]
    cfg = TrainingConfig(max_steps=2, batch_size=4, checkpoint_every=1)
    _run(tok, examples, cfg, tmp_path)
    with pytest.raises(KdflowError, match=r"training\.learning_rate"):
        _run(tok, examples, cfg.model_copy(update={"learning_rate": 0.5}), tmp_path, resume=True)
    # Checkpoint cadence does not change the trajectory: resuming with another one is fine.
    _, result, rows = _run(tok, examples, cfg.model_copy(update={"checkpoint_every": 7}), tmp_path, resume=True)
    assert result.steps == 2 and rows == []
    _run(tok, examples, cfg.model_copy(update={"max_steps": 1}), tmp_path, resume=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


@pytest.mark.slow  # two fresh Python processes importing torch and transformers
def test_training_after_sigkill_resumes_to_the_same_result(tok, tmp_path):
    env = worker_env()
    toy.run_worker(tmp_path / "reference", resume=False, step_delay=0.0)
    reference = json.loads((tmp_path / "reference" / "result.json").read_text())

    run_dir = tmp_path / "killed"
    worker = subprocess.Popen([sys.executable, str(WORKER), str(run_dir), "--step-delay", "0.5"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_when(worker, lambda: latest_checkpoint(run_dir / "checkpoints") is not None, "a checkpoint")
    assert not (run_dir / "final").exists()

    subprocess.run([sys.executable, str(WORKER), str(run_dir), "--resume"], env=env, check=True,
                   capture_output=True)
    resumed = json.loads((run_dir / "result.json").read_text())
    assert resumed["steps"] == reference["steps"] == toy.WORKER_CONFIG.max_steps
    for key in ("loss", "ce", "kd", "grad_norm", "val_accuracy"):
        assert resumed["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-6, abs=1e-9), key
    final, expected = load_file(str(run_dir / "final" / "model.safetensors")), load_file(
        str(tmp_path / "reference" / "final" / "model.safetensors"))
    assert all(torch.allclose(final[k], expected[k], atol=1e-6) for k in expected)


def test_letter_mode_trains(tok, labeled, tmp_path):
    model = toy.fresh_model(tok)
    cfg = TrainingConfig(max_steps=3, batch_size=4, eval_every=3, eval_questions=4)
    result = train(model, tok, labeled[0], cfg, ScoringConfig(mode="letter"), objective=distillation_objective(cfg),
                   out_dir=tmp_path,
                   val_examples=labeled[1], progress=False)
    assert result.steps == 3 and result.val_accuracy is not None and math.isfinite(result.metrics["loss"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda qs: [{k: v for k, v in q.items() if k != "probs"} for q in qs], "needs teacher probs"),
        (lambda qs: [dict(q, probs=[0.5, 0.5]) for q in qs], "needs teacher probs for its 4 options"),
        (lambda qs: [dict(q, probs=[math.nan, 0.5, 0.5, 0.0]) for q in qs], "finite and non-negative"),
        (lambda qs: [dict(q, answer=7) for q in qs], "needs an option index"),
        (lambda qs: [], "no training examples"),
    ],
)
def test_bad_examples_are_rejected_before_training(tok, labeled, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _run(tok, change(labeled[0]), TrainingConfig(alpha=0.5, max_steps=1), tmp_path)


def test_early_stopping_needs_validation_examples(tok, labeled, tmp_path):
    with pytest.raises(ValueError, match="needs validation examples"):
        _run(tok, labeled[0], TrainingConfig(max_steps=1, early_stopping_patience=2), tmp_path)


def test_divergence_stops_before_a_checkpoint_keeps_it(tok, labeled, tmp_path):
    model = toy.fresh_model(tok)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match="at step 1"):
        cfg = TrainingConfig(max_steps=3, batch_size=4, checkpoint_every=1)
        train(model, tok, labeled[0], cfg, toy.SCORING, objective=distillation_objective(cfg), out_dir=tmp_path,
              progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_distributed_settings_are_refused(tok, labeled, tmp_path):
    with pytest.raises(KdflowError, match="num_processes: 1"):
        _run(tok, labeled[0], TrainingConfig(max_steps=1, num_processes=2), tmp_path)


def _subnormals_flush() -> bool:
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


def test_cpu_training_flushes_subnormals_and_restores_the_setting(tok, labeled, tmp_path):
    # Subnormal gradients and Adam moments made late CPU steps many times slower; training flushes them.
    examples, val = labeled
    cfg = TrainingConfig(alpha=0.3, max_steps=3, batch_size=4, eval_every=100, checkpoint_every=1000)
    seen: list[bool] = []
    assert not _subnormals_flush()
    train(toy.fresh_model(tok), tok, examples, cfg, toy.SCORING, objective=distillation_objective(cfg),
          out_dir=tmp_path / "a", progress=False,
          on_checkpoint=lambda *_: seen.append(_subnormals_flush()))
    assert seen == [True] and not _subnormals_flush()

    torch.set_flush_denormal(True)  # a caller that flushes keeps flushing afterwards
    try:
        train(toy.fresh_model(tok), tok, examples, cfg, toy.SCORING, objective=distillation_objective(cfg),
              out_dir=tmp_path / "b", progress=False)
        assert _subnormals_flush()
    finally:
        torch.set_flush_denormal(False)
