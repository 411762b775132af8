from __future__ import annotations

import copy
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from helpers import session_server_env
from kdflow.config import ArchitectureConfig, StudentConfig, TeacherConfig
from kdflow.errors import KdflowError
from kdflow.fingerprints import tokenizer_fingerprint, weights_fingerprint
from kdflow.modeling import (
    ModelLoadError,
    ModelSource,
    build_model,
    count_parameters,
    load_model,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    save_pretrained,
    train_tokenizer,
)
from kdflow.records import LETTERS
from kdflow.sources import configured_source


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the river mountain capital bridge colour answer question boils degrees which what how".split()
    return [" ".join(rng.choice(words) for _ in range(15)) for _ in range(n)]


def test_letters_are_single_tokens_and_vocab_size_is_kept():
    # A full vocabulary: the " X" letters must displace learned merges, not grow the vocabulary.
    tokenizer = train_tokenizer(_corpus(2000), vocab_size=300)
    assert len(tokenizer) == 300
    for letter in LETTERS:
        assert len(tokenizer.encode(letter, add_special_tokens=False)) == 1
        assert len(tokenizer.encode(" " + letter, add_special_tokens=False)) == 1
    text = "Which river? A. the capital\nAnswer: B"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("Answer: A")["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.convert_ids_to_tokens(ids[-1]) == "ĠA"
    assert {tiny_tokenizer.pad_token, tiny_tokenizer.eos_token, tiny_tokenizer.unk_token} == {
        "<|pad|>",
        "<|eos|>",
        "<|unk|>",
    }


def test_tokenizer_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_tokenizer(["hello"], vocab_size=100)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_build_model(family, tiny_tokenizer):
    arch = ArchitectureConfig(family=family, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    model = build_model(arch, tiny_tokenizer)
    assert model.config.vocab_size == len(tiny_tokenizer)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.head_dim == 8
    logits = model(torch.tensor([tiny_tokenizer("Answer: A")["input_ids"]])).logits
    assert logits.shape[-1] == len(tiny_tokenizer)


def test_build_model_rejects_bad_heads(tiny_tokenizer):
    with pytest.raises(ValueError, match="not divisible"):
        build_model(ArchitectureConfig(hidden_size=30, num_heads=4), tiny_tokenizer)


def test_save_load_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    path = save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "m")
    assert (path / "model.safetensors").exists()
    assert not list(path.glob("*.bin"))
    model, tokenizer = load_pretrained(str(path), device="cpu")
    assert not model.training and model.dtype == torch.float32
    text = "Which river flows through the capital?\nA. x\nB. y\nAnswer:"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer.pad_token_id == tiny_tokenizer.pad_token_id
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, tiny_model(torch.tensor([ids])).logits)


def test_fingerprint_changes_with_weights(tmp_path, tiny_model, tiny_tokenizer):
    before = weights_fingerprint(save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "m"))
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.get_input_embeddings().weight.add_(1.0)
    after = weights_fingerprint(save_pretrained(changed, tiny_tokenizer, tmp_path / "m"))
    assert before and after and before != after
    assert weights_fingerprint(tmp_path / "missing") is None


def test_tokenizer_fingerprint_follows_the_tokenizer_files_not_the_weights(tmp_path, tiny_model, tiny_tokenizer):
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.get_input_embeddings().weight.add_(1.0)
    first = tokenizer_fingerprint(save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "a"))
    assert first is not None and tokenizer_fingerprint(save_pretrained(changed, tiny_tokenizer, tmp_path / "b")) == first
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["Tavoria"])
    assert tokenizer_fingerprint(save_pretrained(tiny_model, other, tmp_path / "c")) != first
    # config.json's model type can decide which tokenizer class transformers loads
    config = tmp_path / "b" / "config.json"
    config.write_text(config.read_text().replace('"llama"', '"qwen2"'))
    assert tokenizer_fingerprint(tmp_path / "b") != first
    assert tokenizer_fingerprint(tmp_path / "missing") is None


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_pretrained(str(missing))
    assert str(missing) in str(info.value)


def test_directory_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model") as info:
        load_pretrained(str(tmp_path), device="cpu")
    assert "config.json" in str(info.value) and str(tmp_path) in str(info.value)


def _load_error(source: ModelSource) -> str:
    """The message of the ModelLoadError loading `source` raises; it must be one line."""
    with pytest.raises(ModelLoadError) as info:
        load_model(source, device="cpu")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, KdflowError)
    return message


@pytest.fixture
def gguf_dir(tmp_path):
    """A directory holding GGUF files: one garbage, one truncated after the magic bytes."""
    (tmp_path / "garbage.gguf").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00rest")
    return tmp_path


def test_model_load_errors_name_the_setting_and_what_to_change(gguf_dir, tmp_path):
    message = _load_error(ModelSource(str(gguf_dir), gguf_file="model.Q4.gguf", setting="teacher"))
    assert "no file 'model.Q4.gguf'" in message and "it holds garbage.gguf, truncated.gguf" in message
    assert "set teacher.gguf_file" in message
    message = _load_error(ModelSource(str(gguf_dir), setting="student"))
    assert "has no config.json but holds GGUF weights" in message and "set student.gguf_file: garbage.gguf" in message
    message = _load_error(ModelSource(str(tmp_path / "nowhere"), gguf_file="m.gguf", setting="teacher"))
    assert "does not exist; check teacher.model" in message
    (tmp_path / "weights.bin").write_bytes(b"x")
    message = _load_error(ModelSource(str(tmp_path / "weights.bin"), setting="teacher"))
    assert "is a file; teacher.model must be a model directory, a hub id or a .gguf file" in message


@pytest.mark.parametrize("name", ["garbage.gguf", "truncated.gguf"])
def test_a_broken_gguf_file_is_one_line(gguf_dir, name):
    for source in (ModelSource(str(gguf_dir), gguf_file=name, setting="teacher"),
                   ModelSource(str(gguf_dir / name), setting="teacher")):  # the file itself as the model
        message = _load_error(source)
        assert message.startswith("cannot load") and name in message and "complete GGUF model" in message


def test_gguf_without_its_package_says_what_to_install(gguf_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    message = _load_error(ModelSource(str(gguf_dir), gguf_file="garbage.gguf", setting="teacher"))
    assert "needs the gguf package" in message and "pip install 'gguf>=0.10'" in message


def test_a_sentencepiece_tokenizer_without_its_packages_says_what_to_install(tmp_path, tiny_model, tiny_tokenizer):
    """A directory whose tokenizer is only a SentencePiece model (no tokenizer.json): transformers needs
    sentencepiece (or tiktoken) to convert it, neither of which kdflow requires."""
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed here")
    path = save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "m")
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.model").write_bytes(bytes(100))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    message = _load_error(ModelSource(str(path), setting="student"))
    assert "cannot load the tokenizer of student.model" in message
    assert "pip install sentencepiece protobuf (or tiktoken)" in message


def test_unknown_hub_id_offline_is_one_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _load_error(ModelSource("kdflow-tests/no-such-model", setting="teacher"))
    assert "teacher.model 'kdflow-tests/no-such-model'" in message and "hf download ID --local-dir DIR" in message


def test_configured_source_names_the_missing_setting():
    with pytest.raises(ModelLoadError, match="student.model is not set"):
        configured_source(StudentConfig(init="fresh"), "student")
    source = configured_source(TeacherConfig(model="/m/x.gguf"), "teacher")
    assert source.describe() == "teacher.model '/m/x.gguf'"


def test_resolve_device_and_dtype():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", cpu)


def test_count_parameters_dense(tiny_model):
    total, active = count_parameters(tiny_model)
    assert total == active == sum(p.numel() for p in tiny_model.parameters())


def test_count_parameters_moe():
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
    )
    model = Qwen3MoeForCausalLM(config)
    total, active = count_parameters(model)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert experts > 0
    assert total == sum(p.numel() for p in model.parameters())
    assert active == total - experts + experts * 2 // 8
    assert active < total


@pytest.mark.usefixtures("prefect_harness")
def test_kdflow_run_with_an_unloadable_teacher_is_one_line_and_exit_2(gguf_dir, tmp_path):
    """Through the CLI and the Prefect flow: no traceback (neither ours nor Prefect's log of it)."""
    root = Path(__file__).resolve().parent.parent
    env = session_server_env()
    done = subprocess.run(
        [sys.executable, "-m", "kdflow.cli", "run", "-c", str(root / "configs" / "tiny.yaml"),
         "--set", f"home={tmp_path / 'home'}", "--set", "teacher.prepare.enabled=false",
         "--set", f"teacher.model={gguf_dir}", "--set", "teacher.gguf_file=missing.gguf"],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no file 'missing.gguf'" in errors[0] and "set teacher.gguf_file" in errors[0], output
