from __future__ import annotations

import json

import pytest
import torch
import toy_training as toy
from safetensors.torch import load_file
from toy_training import one_thread  # noqa: F401 (autouse fixture)

from kdflow.fitting.checkpoints import (
    CheckpointError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    trainable_state,
)
from kdflow.config import LoraConfig, TrainingConfig
from kdflow.scoring import encode, option_logits
from kdflow.train.initialisation import with_lora
from kdflow.fitting.optim import build_optimizer, build_scheduler

CFG = TrainingConfig(learning_rate=1e-2, weight_decay=0.1)


@pytest.fixture(scope="module")
def tok():
    return toy.tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return encode(toy.questions(6, seed=1), tok, toy.SCORING)


def _setup(tok, seed=0, lora=False):
    model = toy.fresh_model(tok, seed=seed)
    if lora:
        model = with_lora(model, LoraConfig(enabled=True, r=2))
    optimizer = build_optimizer(model, CFG)
    return model, optimizer, build_scheduler(optimizer, CFG.model_copy(update={"warmup_ratio": 0.2}), 10)


def _step(model, optimizer, scheduler, batch):
    option_logits(model, batch).scores.logsumexp(-1).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _scores(model, batch):
    model.eval()  # LoRA dropout off
    with torch.no_grad():
        scores = option_logits(model, batch).scores
    model.train()
    return scores


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tok, batch, tmp_path):
    model, optimizer, scheduler = _setup(tok)
    for _ in range(3):
        _step(model, optimizer, scheduler, batch)
    state = TrainState(step=3, epoch=1, position=5, best_val_accuracy=0.5, best_step=2, evals_since_best=1,
                       metrics={"step": 3, "loss": 1.25, "kd": None})
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                           config={"training": CFG.model_dump(mode="json")})
    after_save = torch.rand(4)

    other, other_optimizer, other_scheduler = _setup(tok, seed=1)
    loaded = load_checkpoint(path, other, other_optimizer, other_scheduler)
    assert torch.equal(torch.rand(4), after_save)
    assert torch.equal(_scores(other, batch), _scores(model, batch))
    assert (loaded.step, loaded.epoch, loaded.position, loaded.best_step, loaded.metrics) == (3, 1, 5, 2, state.metrics)
    assert other_scheduler.get_last_lr() == scheduler.get_last_lr()
    saved_state, loaded_state = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved_state["param_groups"] == loaded_state["param_groups"]
    for index, entries in saved_state["state"].items():
        assert all(torch.equal(value, loaded_state["state"][index][name]) for name, value in entries.items())

    # Both continue identically: the next step needs Adam's moments and the schedule, not just weights.
    _step(model, optimizer, scheduler, batch)
    _step(other, other_optimizer, other_scheduler, batch)
    assert torch.equal(_scores(other, batch), _scores(model, batch))
    assert json.loads((path / "config.json").read_text())["training"]["learning_rate"] == CFG.learning_rate


def test_nothing_is_pickled(tok, tmp_path):
    model, optimizer, scheduler = _setup(tok)
    best = {k: v.detach().clone() for k, v in trainable_state(model).items()}
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                           state=TrainState(step=4, best_step=2, best_weights=best), config={})
    assert sorted(p.name for p in path.iterdir()) == [
        "best.safetensors", "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json",
    ]
    loaded = load_checkpoint(path, *_setup(tok, seed=1))
    assert all(torch.equal(loaded.best_weights[k], v) for k, v in best.items())


def test_only_the_newest_complete_checkpoint_is_kept(tok, tmp_path):
    model, optimizer, scheduler = _setup(tok)
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in range(1, 5):
        save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                        state=TrainState(step=step), config={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]
    # What a killed writer leaves behind: a temporary directory, or a step directory without its state file.
    (tmp_path / ".tmp-step-5-123").mkdir()
    (tmp_path / "step-6").mkdir()
    (tmp_path / "step-6" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-4"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-6", model, optimizer, scheduler)
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, state=TrainState(step=7),
                    config={})
    assert not (tmp_path / ".tmp-step-5-123").exists() and latest_checkpoint(tmp_path) == tmp_path / "step-7"


def test_lora_checkpoint_holds_the_adapter_only_and_refuses_another_model(tok, batch, tmp_path):
    model, optimizer, scheduler = _setup(tok, lora=True)
    _step(model, optimizer, scheduler, batch)
    path = save_checkpoint(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                           state=TrainState(step=1), config={})
    assert all("lora_" in name for name in load_file(str(path / "model.safetensors")))
    other, other_optimizer, other_scheduler = _setup(tok, lora=True)
    load_checkpoint(path, other, other_optimizer, other_scheduler)
    assert torch.equal(_scores(other, batch), _scores(model, batch))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(path, *_setup(tok))
