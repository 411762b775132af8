"""Capacity planning: FLOPs, memory, GPUs and hours for labeling with the teacher and training the student.

Parameter counts are exact: the model is instantiated from its config on PyTorch's meta device (no
weights, no memory), so mixture-of-experts totals and active parameters come from the real module tree.
Configs come from the hub or a local directory when reachable, else from presets of well-known models
(kdflow/data/model_presets.yaml), else from the run config's `architecture` for fresh models.
Throughput is FLOPs / (GPUs x peak x utilisation): utilisation is a stated assumption, not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdflow.config import ArchitectureConfig, RunConfig
from kdflow.errors import KdflowError

PRESETS = Path(__file__).resolve().parent / "data" / "model_presets.yaml"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense peak
    fp8_tflops: float | None


GPUS = {
    "h100": Gpu("H100 SXM 80GB", 80, 989, 1979),
    "h200": Gpu("H200 141GB", 141, 989, 1979),
    "a100": Gpu("A100 SXM 80GB", 80, 312, None),
    "l40s": Gpu("L40S 48GB", 48, 362, 733),
}
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class ModelShape:
    name: str
    total_params: int
    active_params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, bytes_per_value: float = 2.0) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value


@dataclass(frozen=True)
class StagePlan:
    stage: str
    model: str
    tokens: float
    flops: float
    weights_gb: float
    memory_gb_needed: float
    gpus: int
    layout: str
    hours: float
    notes: str


def _config_from_preset(name: str) -> Any | None:
    from transformers import AutoConfig

    presets = yaml.safe_load(PRESETS.read_text(encoding="utf-8"))
    key = name.removesuffix("-FP8")
    if key not in presets:
        return None
    values = dict(presets[key])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_model_config(
    name: str | None, architecture: ArchitectureConfig, *, trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> Any:
    """A transformers config for `name` (local dir, preset, then hub; a GGUF file's own metadata when
    `gguf_file` is given or `name` is a .gguf file) or for the fresh `architecture`.

    Presets come before the hub so planning the well-known models needs no network."""
    if name is None:
        from kdflow.modeling import architecture_config

        return architecture_config(architecture, vocab_size=architecture.vocab_size)
    from transformers import AutoConfig

    if gguf_file or name.endswith(".gguf"):
        from kdflow.sources import ModelSource, load_args

        source = ModelSource(name, gguf_file=gguf_file)
        name_or_path, file = load_args(source)
        try:
            return AutoConfig.from_pretrained(name_or_path, gguf_file=file, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise KdflowError(
                f"cannot read the config of {source.describe()} from its GGUF file: {' '.join(str(e).split())}"
            ) from e

    if not Path(name).expanduser().is_dir():
        preset = _config_from_preset(name)
        if preset is not None:
            return preset
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise KdflowError(
            f"cannot read the config of {name!r} ({e.__class__.__name__}) and it has no preset in {PRESETS}: "
            "give a local directory with its config.json, or add a preset"
        ) from e


def model_shape(name: str, config: Any) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM

    from kdflow.modeling import count_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total, active = count_parameters(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        name=name, total_params=total, active_params=active, layers=config.num_hidden_layers,
        hidden=config.hidden_size, kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
    )


def _power_of_two_at_least(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def plan_labeling(shape: ModelShape, *, questions: int, tokens_per_question: float, gpu: Gpu,
                  weight_bytes: float, utilisation: float, concurrent_sequences: int = 128,
                  memory_utilisation: float = 0.9) -> StagePlan:
    """One prefill per question (letter mode): 2 x active params FLOPs per token, weights sharded by TP."""
    tokens = questions * tokens_per_question
    flops = 2 * shape.active_params * tokens
    weights_gb = shape.total_params * weight_bytes / 1e9
    kv_gb = concurrent_sequences * tokens_per_question * shape.kv_bytes_per_token() / 1e9
    needed = (weights_gb + kv_gb) * 1.1  # ~10% for activations, CUDA graphs and fragmentation
    tp = _power_of_two_at_least(needed / (gpu.memory_gb * memory_utilisation))
    if tp > GPUS_PER_NODE:
        layout = f"TP{GPUS_PER_NODE} x PP{math.ceil(tp / GPUS_PER_NODE)} (multi-node)"
    else:
        layout = f"TP{tp} x {GPUS_PER_NODE // tp} replicas per {GPUS_PER_NODE}-GPU node"
    gpus = max(tp, GPUS_PER_NODE) if tp <= GPUS_PER_NODE else tp
    peak = (gpu.fp8_tflops if weight_bytes < 2 and gpu.fp8_tflops else gpu.bf16_tflops) * 1e12
    hours = flops / (gpus * peak * utilisation) / 3600
    return StagePlan("label", shape.name, tokens, flops, weights_gb, needed, gpus, layout, hours,
                     f"{concurrent_sequences} sequences in flight, KV cache {kv_gb:.1f} GB")


def plan_training(shape: ModelShape, *, questions: int, tokens_per_question: float, epochs: float, gpu: Gpu,
                  lora: bool, utilisation: float, processes: int) -> StagePlan:
    """Full fine-tune: 6 x active FLOPs per token and ~16 bytes per parameter (bf16 weights and grads,
    fp32 Adam moments and master weights), sharded by FSDP. LoRA: frozen bf16 weights, ~4 x active FLOPs
    per token (no weight gradients for the base), optimizer state for the adapters only."""
    tokens = questions * tokens_per_question * epochs
    flops = (4 if lora else 6) * shape.active_params * tokens
    weights_gb = shape.total_params * 2 / 1e9
    state_gb = weights_gb if lora else shape.total_params * 16 / 1e9
    needed = state_gb * 1.2  # activations with checkpointing and buffers
    gpus = max(processes, math.ceil(needed / (gpu.memory_gb * 0.9)))
    layout = ("FSDP" if gpus > 1 else "single GPU") + f" over {gpus} GPUs" + (" (LoRA)" if lora else " (full)")
    hours = flops / (gpus * gpu.bf16_tflops * 1e12 * utilisation) / 3600
    return StagePlan("train", shape.name, tokens, flops, weights_gb, needed, gpus, layout, hours,
                     f"{epochs:g} epochs; the teacher is not loaded (offline soft labels)")


def plan(cfg: RunConfig, *, questions: int, tokens_per_question: float, gpu_name: str = "h100",
         utilisation: float = 0.35) -> list[StagePlan]:
    """The labeling and training plan of a run config."""
    if gpu_name not in GPUS:
        raise KdflowError(f"unknown GPU {gpu_name!r}: choose one of {', '.join(GPUS)}")
    gpu = GPUS[gpu_name]
    teacher_name = cfg.teacher.model
    teacher = model_shape(teacher_name or "teacher (fresh)",
                          load_model_config(teacher_name, cfg.teacher.architecture,
                                            trust_remote_code=cfg.teacher.trust_remote_code,
                                            gguf_file=cfg.teacher.gguf_file))
    student_name = cfg.student.model if cfg.student.init == "pretrained" else None
    student = model_shape(student_name or "student (fresh)",
                          load_model_config(student_name, cfg.student.architecture,
                                            trust_remote_code=cfg.student.trust_remote_code,
                                            gguf_file=cfg.student.gguf_file))
    fp8 = cfg.teacher.vllm.quantization == "fp8" or (teacher_name or "").upper().endswith("-FP8")
    label = plan_labeling(teacher, questions=questions, tokens_per_question=tokens_per_question, gpu=gpu,
                          weight_bytes=1.0 if fp8 else 2.0, utilisation=utilisation,
                          memory_utilisation=cfg.teacher.vllm.gpu_memory_utilization)
    train_questions = int(questions * cfg.data.splits.train)
    train = plan_training(student, questions=train_questions, tokens_per_question=tokens_per_question,
                          epochs=cfg.training.epochs, gpu=gpu, lora=cfg.student.lora.enabled,
                          utilisation=utilisation, processes=cfg.training.num_processes)
    return [label, train]

