"""The student before training: a pretrained model, a fresh one, or every k-th layer of the teacher.

- pretrained: a hub id or local directory, fully fine-tuned or wrapped in LoRA adapters (peft);
- fresh: `student.architecture` built from scratch on the teacher's / dataset's tokenizer;
- from_teacher: the teacher with layers 0, k, 2k, ... kept (DistilBERT's initialisation): embeddings, kept
  decoder layers, final norm and LM head are copied, so training starts from the teacher's knowledge.

kdflow.fitting.export writes the trained student so that `modeling.load_model` reads it back.
"""

from __future__ import annotations

import copy
import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdflow.config import LoraConfig, StudentConfig
from kdflow.modeling import (
    MODEL_CONSTRUCTION,
    ModelSource,
    build_model,
    load_model,
    resolve_device,
    resolve_dtype,
)
from kdflow.sources import configured_source

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def init_student(
    cfg: StudentConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    teacher: ModelSource | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The untrained student on `cfg.device` and its tokenizer; `seed` fixes fresh weights and LoRA init.

    `tokenizer` is needed for init: fresh (the teacher's or the dataset's); pretrained and from_teacher
    students bring their own. `teacher` is where the teacher's weights are (kdflow.label.teacher.teacher_source),
    for init: from_teacher. Raises ModelLoadError when a model cannot be loaded.
    """
    if cfg.lora.enabled and not cfg.lora.merge_on_export and cfg.init != "pretrained":
        raise ValueError(
            f"student.lora.merge_on_export: false saves only the adapter, which needs a base model that can be "
            f"loaded by name; init: {cfg.init} has none. Use init: pretrained or merge_on_export: true"
        )
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(seed)
    if cfg.init == "pretrained":
        model, tokenizer = load_model(configured_source(cfg, "student"), dtype=cfg.dtype, device=cfg.device)
    elif cfg.init == "fresh":
        if tokenizer is None:
            raise ValueError(
                "student.init: fresh needs the tokenizer the student reads with (the teacher's or the dataset's)"
            )
        model = build_model(cfg.architecture, tokenizer).to(device=device, dtype=dtype)
    else:
        if teacher is None:
            raise ValueError(
                "student.init: from_teacher needs the teacher's weights (a hub id, directory or GGUF file)"
            )
        # The teacher is loaded on the CPU, already in the student's dtype: only kept layers reach the device.
        dtype_name = str(dtype).removeprefix("torch.")
        full, tokenizer = load_model(teacher, dtype=dtype_name, device="cpu")
        model = every_kth_layer(full, cfg.layer_stride).to(device=device, dtype=dtype)
        del full
    if cfg.lora.enabled:
        model = with_lora(model, cfg.lora)
    return model, tokenizer


def every_kth_layer(teacher: PreTrainedModel, stride: int) -> PreTrainedModel:
    """A copy of `teacher` keeping decoder layers 0, stride, 2 * stride, ... and everything around them.

    Works for decoder-only transformers models that keep their layers in `model.layers` (Llama, Qwen,
    Mistral, Gemma ...); per-layer config lists (`layer_types`) are cut to the kept layers.
    """
    if stride < 1:
        raise ValueError(f"layer_stride must be at least 1, got {stride}")
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"student.init: from_teacher needs a decoder-only model with its layers in `model.layers` (Llama, Qwen, "
            f"Mistral ...); {type(teacher).__name__} has none. Use student.init: fresh or pretrained"
        )
    kept = list(range(0, len(layers), stride))
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    student = type(teacher)(config)
    source = teacher.state_dict()
    weights = {}
    for name in student.state_dict():
        match = _LAYER_KEY.match(name)
        weights[name] = source[f"model.layers.{kept[int(match.group(1))]}.{match.group(2)}" if match else name]
    student.load_state_dict(weights)
    return student.to(dtype=next(teacher.parameters()).dtype)


def with_lora(model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    """Freeze `model` and wrap it in LoRA adapters on `lora.target_modules`."""
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        with MODEL_CONSTRUCTION:  # new adapter modules, never built while another thread loads on meta
            return get_peft_model(model, config)
    except ValueError as e:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"student.lora.target_modules {lora.target_modules} do not fit {type(model).__name__}: {e}. "
            f"Its linear layers are named {names}"
        ) from e
