from __future__ import annotations

import pytest
import torch
import toy_training as toy
from safetensors.torch import load_file
from toy_training import one_thread  # noqa: F401 (autouse fixture)
from transformers import GPT2Config, GPT2LMHeadModel

from kdflow.train.checkpoints import latest_checkpoint, load_checkpoint
from kdflow.config import ArchitectureConfig, LoraConfig, StudentConfig, TrainingConfig
from kdflow.modeling import ModelSource, build_model, load_pretrained, save_pretrained
from kdflow.scoring import encode, option_logits
from kdflow.train.students import every_kth_layer, init_student
from kdflow.train.optim import build_optimizer, build_scheduler
from kdflow.train.recipe import train

RECIPE = TrainingConfig(alpha=0.5, max_steps=4, batch_size=8, learning_rate=1e-2, checkpoint_every=4)


@pytest.fixture(scope="module")
def tok():
    return toy.tokenizer()


@pytest.fixture(scope="module")
def examples():
    return toy.worker_examples()[0]


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    """A saved 4-layer model: the pretrained student base and the teacher of from_teacher students."""
    return save_pretrained(toy.fresh_model(tok, layers=4), tok, tmp_path_factory.mktemp("base"))


def _scores(model, tok, questions=None):
    model.eval()
    with torch.no_grad():
        return option_logits(model, encode(questions or toy.questions(8, seed=5), tok, toy.SCORING)).scores


def _train(model, tok, examples, out_dir, **kwargs):
    return train(model, tok, examples, RECIPE, toy.SCORING, out_dir=out_dir, progress=False, **kwargs)


def test_fresh_student_follows_its_architecture(tok):
    arch = ArchitectureConfig(family="qwen3", hidden_size=16, num_layers=1, num_heads=2, vocab_size=512)
    model, same_tok = init_student(StudentConfig(init="fresh", architecture=arch, device="cpu"), tokenizer=tok)
    assert same_tok is tok
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 1
    assert model.get_input_embeddings().weight.shape == (len(tok), 16)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        init_student(StudentConfig(init="fresh"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_from_teacher_keeps_every_kth_layer(family, tok):
    arch = ArchitectureConfig(family=family, hidden_size=32, num_layers=5, num_heads=4, num_kv_heads=2, vocab_size=512)
    torch.manual_seed(0)
    teacher = build_model(arch, tok)
    student = every_kth_layer(teacher, 2)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    if getattr(teacher.config, "layer_types", None) is not None:
        assert len(student.config.layer_types) == 3
    teacher_weights, student_weights = teacher.state_dict(), student.state_dict()
    for name, value in student_weights.items():
        source = name
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            source = name.replace(f"model.layers.{index}.", f"model.layers.{2 * index}.", 1)
        assert torch.equal(value, teacher_weights[source]), name
    assert student.get_input_embeddings().weight.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()


def test_from_teacher_student_trains_and_exports(tok, examples, base_dir, tmp_path):
    cfg = StudentConfig(init="from_teacher", layer_stride=3, device="cpu")
    model, student_tok = init_student(cfg, teacher=ModelSource(str(base_dir)))
    assert model.config.num_hidden_layers == 2  # layers 0 and 3 of 4
    result = _train(model, student_tok, examples, tmp_path)
    exported, _ = load_pretrained(str(result.final_dir), device="cpu")
    assert exported.config.num_hidden_layers == 2
    assert torch.allclose(_scores(exported, tok), _scores(model, tok), atol=1e-6)
    with pytest.raises(ValueError, match="teacher's weights"):
        init_student(cfg)


def test_from_teacher_needs_model_layers(tok, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    save_pretrained(gpt2, tok, tmp_path)
    with pytest.raises(ValueError, match="model.layers"):
        init_student(StudentConfig(init="from_teacher", device="cpu"), teacher=ModelSource(str(tmp_path)))


def _lora_student(base_dir, merge: bool = True):
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"],
                      merge_on_export=merge)
    return init_student(StudentConfig(init="pretrained", model=str(base_dir), device="cpu", lora=lora), seed=1)


def test_lora_student_trains_adapters_only_and_exports_merged(tok, examples, base_dir, tmp_path):
    model, student_tok = _lora_student(base_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = _train(model, student_tok, examples, tmp_path)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)

    # The merged export scores like the adapter model that training left in the last checkpoint.
    adapter_model, _ = _lora_student(base_dir)
    optimizer = build_optimizer(adapter_model, RECIPE)
    load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"), adapter_model, optimizer,
                    build_scheduler(optimizer, RECIPE, 4))
    merged, _ = load_pretrained(str(result.final_dir), device="cpu")
    assert not any("lora" in name for name in load_file(str(result.final_dir / "model.safetensors")))
    base, _ = load_pretrained(str(base_dir), device="cpu")
    assert not torch.allclose(_scores(adapter_model, tok), _scores(base, tok), atol=1e-4)  # the adapter learned
    assert torch.allclose(_scores(merged, tok), _scores(adapter_model, tok), atol=1e-5)


def test_lora_adapter_export_loads_on_its_base_and_matches_the_merged_one(tok, examples, base_dir, tmp_path):
    merged_model, student_tok = _lora_student(base_dir, merge=True)
    merged = _train(merged_model, student_tok, examples, tmp_path / "merged")
    adapter_model, student_tok = _lora_student(base_dir, merge=False)
    adapter = _train(adapter_model, student_tok, examples, tmp_path / "adapter", merge_lora=False)

    assert (adapter.final_dir / "adapter_config.json").is_file()
    from_adapter, _ = load_pretrained(str(adapter.final_dir), device="cpu")
    from_merged, _ = load_pretrained(str(merged.final_dir), device="cpu")
    base, _ = load_pretrained(str(base_dir), device="cpu")
    assert not torch.allclose(_scores(from_adapter, tok), _scores(base, tok), atol=1e-4)
    assert torch.allclose(_scores(from_adapter, tok), _scores(from_merged, tok), atol=1e-5)


def test_lora_configuration_errors(tok, base_dir):
    with pytest.raises(ValueError, match="merge_on_export: false"):
        init_student(StudentConfig(init="fresh", lora=LoraConfig(enabled=True, merge_on_export=False)), tokenizer=tok)
    bad = LoraConfig(enabled=True, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="q_proj"):
        init_student(StudentConfig(init="pretrained", model=str(base_dir), device="cpu", lora=bad))
