"""Models and tokenizers: train a tokenizer, build a fresh model, load and save pretrained ones.

Everything that turns a name, a path or an architecture config into a (model, tokenizer) pair lives here,
so teacher preparation, labeling, training and evaluation load models the same way. Scoring itself is in
kdflow/scoring/.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kdflow.config import ArchitectureConfig
from kdflow.records import LETTERS
from kdflow.sources import ModelLoadError, ModelSource, load_args

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

# Byte-level BPE writes a leading space as "Ġ"; " A" must be the single token "ĠA" (the answer token).
_SPACE = "Ġ"
_SPACED_LETTERS = frozenset(_SPACE + letter for letter in LETTERS)
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + len(LETTERS)


# transformers builds a pretrained model's modules on the meta device by patching torch for the duration of
# `from_pretrained`, process-wide: a model built in another thread meanwhile (a sweep's students train on a
# thread pool) gets meta parameters ("Cannot copy out of meta tensor"). Every construction of modules in
# kdflow holds this lock; re-entrant, so a loader may build inside it.
MODEL_CONSTRUCTION = threading.RLock()


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (seconds for 50K short questions).

    Every letter "A".."Z" and " A".." Z" is one token, as letter scoring needs: the bare letters are in the
    byte alphabet, and any " X" merge that training did not learn replaces one of the last-learned merges
    (nothing depends on those), so the vocabulary keeps its size. The encoder prepends <|bos|>.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {_MIN_VOCAB} (bytes, special tokens, ' A'..' Z'), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer = _with_spaced_letters(tokenizer, vocab_size)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def _with_spaced_letters(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """Make " A".." Z" single tokens, replacing the newest merges when the vocabulary is full.

    Merges are applied by rank and the newest ones are learned last, so no kept merge builds on a dropped
    token; a " X" merge only joins two bytes, so it never depends on anything either.
    """
    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list[list[str]] = data["model"]["merges"]
    missing = [_SPACE + letter for letter in LETTERS if _SPACE + letter not in vocab]
    if not missing:
        return tokenizer
    excess = len(vocab) + len(missing) - vocab_size
    # vocab_size >= _MIN_VOCAB leaves enough learned tokens to drop before reaching the bytes.
    newest_first = [t for t in sorted(vocab, key=vocab.__getitem__, reverse=True) if t not in _SPACED_LETTERS]
    dropped = set(newest_first[: max(0, excess)])
    kept = [t for t in sorted(vocab, key=vocab.__getitem__) if t not in dropped] + missing
    data["model"]["vocab"] = {token: i for i, token in enumerate(kept)}
    data["model"]["merges"] = [m for m in merges if "".join(m) not in dropped] + [[_SPACE, t[1:]] for t in missing]
    return Tokenizer.from_str(json.dumps(data))


def architecture_config(
    arch: ArchitectureConfig, *, vocab_size: int, special_ids: dict[str, int | None] | None = None
) -> LlamaConfig | Qwen3Config:
    """The transformers config of a fresh model (also what `kdflow plan` sizes without building it)."""
    if arch.hidden_size % arch.num_heads:
        raise ValueError(f"hidden_size {arch.hidden_size} is not divisible by num_heads {arch.num_heads}")
    kv_heads = arch.num_kv_heads or arch.num_heads
    if arch.num_heads % kv_heads:
        raise ValueError(f"num_heads {arch.num_heads} is not divisible by num_kv_heads {kv_heads}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size or 4 * arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=kv_heads,
        head_dim=arch.hidden_size // arch.num_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=True,
        **(special_ids or {}),
    )
    return LlamaConfig(**common) if arch.family == "llama" else Qwen3Config(**common)


def build_model(arch: ArchitectureConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised causal LM (tied embeddings); seed with torch.manual_seed before calling."""
    config = architecture_config(
        arch,
        vocab_size=len(tokenizer),
        special_ids={"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
    )
    with MODEL_CONSTRUCTION:
        return LlamaForCausalLM(config) if arch.family == "llama" else Qwen3ForCausalLM(config)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads (torch.set_num_threads: intra-op, OpenMP and MKL) set to n while active, then
    restored; None leaves them as they are. ValueError for n < 1.

    kdflow starts with OMP_WAIT_POLICY=PASSIVE (kdflow.cli), so an idle OpenMP thread sleeps instead of
    spinning against other work on the cores; the price is a wake-up for every parallel operation, which
    the small matrices of a small model do not repay: one thread is then faster than two.
    """
    if n is not None and n < 1:
        raise ValueError(f"CPU threads must be at least 1, got {n}")
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> torch.device:
    """"auto" is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use device: auto or cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA (float16 where the card lacks bf16) and float32 on the CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return resolved


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()).rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _advice(source: ModelSource, error: BaseException) -> str:
    """What to do about a transformers load error, by what it says."""
    text = str(error)
    if "sentencepiece" in text or "tiktoken" in text:
        return ("Its tokenizer is a SentencePiece or tiktoken model that transformers converts: "
                "pip install sentencepiece protobuf (or tiktoken)")
    if isinstance(error, ImportError):
        return "Install the package the message names"
    if source.gguf_file or source.name_or_path.endswith(".gguf"):
        return "Check that the file is a complete GGUF model of an architecture transformers supports"
    if source.is_local:
        return "The directory needs config.json, the weights and the tokenizer files (see save_pretrained)"
    return (
        "It is not in the local Hugging Face cache and the hub did not serve it: check the id and revision; "
        "on an offline machine or for a gated repo, download it first (`hf download ID --local-dir DIR`, "
        "HF_TOKEN for gated repos) and pass DIR"
    )


def _dequantised() -> dict[str, Any]:
    """from_pretrained arguments that unpack GGUF weights into a plain model (trainable, saved as
    safetensors); transformers versions without GgufConfig always unpack them."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


# Errors transformers and the libraries under it raise for weights or tokenizers that cannot be read.
# struct.error: a truncated GGUF file.
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, RuntimeError, ImportError,
                                                  SafetensorError, struct.error)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer of `source` (from its GGUF file when it has one), with a pad token.

    Tokenizers without a pad token get eos as pad (padding is always masked, so any id would do).
    Raises ModelLoadError, one line naming the model and what to do.
    """
    name_or_path, gguf_file = load_args(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code, gguf_file=gguf_file
        )
    except _LOAD_ERRORS as e:
        raise ModelLoadError(
            f"cannot load the tokenizer of {source.describe()}: {_one_line(e)}. {_advice(source, e)}"
        ) from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of {source.describe()} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: ModelSource, *, dtype: str = "auto", device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file, in eval mode.

    This is the one way kdflow loads pretrained weights: teacher labeling, teacher preparation, students
    initialised from a pretrained model or from the teacher, evaluation and routing all come here, so a
    GGUF file is honoured everywhere. GGUF weights are de-quantised into `dtype`. Raises ModelLoadError
    (a KdflowError: one line naming the model and what to install or change) for anything that cannot load.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = load_tokenizer(source)
    name_or_path, gguf_file = load_args(source)
    try:
        with MODEL_CONSTRUCTION:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code,
                gguf_file=gguf_file, dtype=torch_dtype, device_map={"": torch_device},
                **(_dequantised() if gguf_file else {}),
            )
    except _LOAD_ERRORS as e:
        raise ModelLoadError(f"cannot load {source.describe()}: {_one_line(e)}. {_advice(source, e)}") from e
    model.eval()
    return model, tokenizer


def load_pretrained(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`load_model` for a model named by its parts (a directory kdflow saved, a hub id ...)."""
    source = ModelSource(name_or_path, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code)
    return load_model(source, dtype=dtype, device=device)


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path) -> Path:
    """Write model (safetensors) and tokenizer to a directory that `load_pretrained` reads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active) parameters; they differ for mixture-of-experts models only.

    Routed expert weights (parameters under a module named `experts`) count as active in proportion
    num_experts_per_tok / num_experts, as each token passes through that many experts; shared experts,
    routers, attention and embeddings are always active.
    """
    total = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    names = ("num_local_experts", "num_experts", "n_routed_experts")
    n_experts = next((getattr(config, k) for k in names if getattr(config, k, None)), None)
    k = getattr(config, "num_experts_per_tok", None)
    if not n_experts or not k:
        return total, total
    expert = sum(p.numel() for name, p in model.named_parameters() if "experts" in name.split("."))
    return total, total - expert + round(expert * k / n_experts)
