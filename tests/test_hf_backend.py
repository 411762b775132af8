from __future__ import annotations

import copy
import random

import pytest
import torch

from kdflow.label.backends.base import TeacherBackend
from kdflow.softlabels import ScoredQuestion
from kdflow.label.backends.hf import HFBackend
from kdflow.config import ScoringConfig, TeacherConfig
from kdflow.modeling import ModelLoadError, ModelSource, save_pretrained
from kdflow.scoring import encode, option_logits, to_soft_labels, tokenize


@pytest.fixture(scope="module")
def teacher(tiny_model) -> torch.nn.Module:
    """The tiny model with large random weights, so its labels are far from uniform."""
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def questions(tiny_questions) -> list[dict]:
    """Twelve questions of mixed lengths and option counts, shuffled so bucketing has to reorder them."""
    rng = random.Random(0)
    out = []
    for copy_no in range(3):
        for q in tiny_questions:
            words = q["question"].split()
            out.append(dict(q, question=" ".join(words[: max(2, len(words) - 3 * copy_no)])))
    rng.shuffle(out)
    return out[:12]


def _probs(scored: list[ScoredQuestion]) -> torch.Tensor:
    width = max(len(s.label.probs) for s in scored)
    return torch.tensor([s.label.probs + [0.0] * (width - len(s.label.probs)) for s in scored])


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_bucketed_labels_are_in_input_order(mode, teacher, tiny_tokenizer, questions):
    scoring = ScoringConfig(mode=mode)
    backend = HFBackend(teacher, tiny_tokenizer, scoring, batch_size=3, device="cpu")
    assert isinstance(backend, TeacherBackend)
    scored = backend.score(questions)
    one_by_one = HFBackend(teacher, tiny_tokenizer, scoring, batch_size=1, device="cpu").score(questions)
    with torch.no_grad():
        direct = to_soft_labels(option_logits(teacher, encode(questions, tiny_tokenizer, scoring)))
    assert [len(s.label.probs) for s in scored] == [len(q["options"]) for q in questions]
    assert torch.allclose(_probs(scored), _probs(one_by_one), atol=1e-5)
    direct_probs = torch.tensor([d.probs + [0.0] * (5 - len(d.probs)) for d in direct])
    assert torch.allclose(_probs(scored), direct_probs, atol=1e-5)
    assert all(s.latency_ms > 0 and s.reasoning is None for s in scored)


def test_reasoning_is_generated(tiny_model, tiny_tokenizer, tiny_questions):
    backend = HFBackend(tiny_model, tiny_tokenizer, ScoringConfig(), batch_size=4, device="cpu", reasoning_max_tokens=3)
    scored = backend.score(tiny_questions)
    assert all(isinstance(s.reasoning, str) for s in scored)


def test_from_config_loads_a_prepared_teacher(tmp_path, tiny_model, tiny_tokenizer, tiny_questions):
    path = save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "teacher")
    teacher = TeacherConfig(batch_size=2, device="cpu")
    backend = HFBackend.from_config(teacher, ScoringConfig(), ModelSource(str(path)))
    parts = backend.key_parts()
    assert parts["backend"] == "hf" and parts["model"] == str(path) and parts["weights"]
    loaded = backend.score(tiny_questions)
    in_memory = HFBackend(tiny_model, tiny_tokenizer, ScoringConfig(), batch_size=2, device="cpu").score(tiny_questions)
    assert [s.label.probs for s in loaded] == [s.label.probs for s in in_memory]
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.score(tiny_questions)


def test_from_config_without_weights_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="teacher.model"):
        HFBackend.from_config(TeacherConfig(), ScoringConfig(), None)


def test_in_memory_key_changes_with_weights(tiny_model, tiny_tokenizer):
    model = copy.deepcopy(tiny_model)
    backend = HFBackend(model, tiny_tokenizer, ScoringConfig(), batch_size=2, device="cpu")
    before = backend.key_parts()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2.0)
    after = backend.key_parts()
    assert before["model"] == "in-memory" and before["weights"] != after["weights"]


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_repeated_questions_are_computed_once_and_labeled_each(mode, teacher, tiny_tokenizer, questions):
    scoring = ScoringConfig(mode=mode)
    first = questions[0]
    repeated = [*questions, dict(first), dict(first, options=list(reversed(first["options"]))), dict(first)]
    rows = []
    hook = teacher.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        scored = HFBackend(teacher, tiny_tokenizer, scoring, batch_size=4, device="cpu").score(repeated)
    finally:
        hook.remove()
    # Passes of one row compute a shared prefix; the repeats add no row (letter: reordered options do).
    assert sum(r for r in rows if r > 1) <= len(questions) + (1 if mode == "letter" else 0)
    with torch.no_grad():
        alone = [to_soft_labels(option_logits(teacher, encode([q], tiny_tokenizer, scoring)))[0] for q in repeated]
    for s, a in zip(scored, alone):
        assert torch.allclose(torch.tensor(s.label.probs), torch.tensor(a.probs), atol=1e-5)
    assert scored[-1].label.probs == scored[0].label.probs


def test_long_shared_rows_do_not_pad_short_ones(teacher, tiny_tokenizer, tiny_questions):
    # Many questions share q2's context with distinct options: one long row, longer than any question's.
    shared = [dict(tiny_questions[2], options=[f"{n} degrees", f"{n + 1} degrees"]) for n in range(0, 40, 2)]
    repeated = [*tiny_questions, *shared]
    scoring = ScoringConfig(mode="cloze")
    longest = max(len(r) for e in tokenize(repeated, tiny_tokenizer, scoring) for r in [e.row])
    passes = []
    hook = teacher.register_forward_hook(lambda module, args, kwargs, out: passes.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    try:
        scored = HFBackend(teacher, tiny_tokenizer, scoring, batch_size=4, device="cpu").score(repeated)
    finally:
        hook.remove()
    # The shared row (longer than the budget of 4 of the longest question's rows) runs alone; no batch pads
    # rows beyond that budget.
    assert [length for rows, length in passes if length > longest] == [max(length for _, length in passes)]
    assert all(rows * length <= 4 * longest for rows, length in passes if rows > 1), (passes, longest)
    with torch.no_grad():
        alone = [to_soft_labels(option_logits(teacher, encode([q], tiny_tokenizer, scoring)))[0] for q in repeated]
    for s, a in zip(scored, alone):
        assert torch.allclose(torch.tensor(s.label.probs), torch.tensor(a.probs), atol=1e-5)
