"""The worker side of a launched training (kdflow.train.launcher is the parent side): `run(RUN_DIR)`, what
each process torchrun starts runs (`python -m kdflow.train.worker RUN_DIR`) and what a WorkerPool's
processes run, one training after another.

A worker reads only the run directory the parent wrote (its contents are listed in kdflow.train.launcher),
trains with the recipe's `train` and the collectives of kdflow.fitting.distributed, and the main worker
(rank 0) reports through EVENTS: metric rows, checkpoints, then the result, a cancellation or an error
(named as one of `reported_exceptions`, which the parent raises again as it was). It stops after the step
at which the parent creates STOP.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from kdflow.config import ScoringConfig, TrainingConfig
from kdflow.errors import KdflowError
from kdflow.fitting.checkpoints import CheckpointError
from kdflow.fitting.recipe import TrainingCancelled, train
from kdflow.fitting.reporting import TrainingDiverged
from kdflow.scoring import EncodingMemo
from kdflow.train.losses import distillation_objective

# The columns of examples.parquet and val.parquet.
EXAMPLES_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("category", pa.string()),
        ("answer", pa.int64()),
        ("probs", pa.list_(pa.float64())),
    ]
)
EVENTS, STOP = "events.jsonl", "stop"


def reported_exceptions() -> dict[str, type[Exception]]:
    """Exceptions a worker reports by name and the parent raises again as they were."""

    return {cls.__name__: cls for cls in (TrainingDiverged, CheckpointError, KdflowError, ValueError)}


def read_examples(path: Path) -> list[dict[str, Any]]:
    """The examples of a run directory's Parquet file (EXAMPLES_SCHEMA), as dicts."""
    return pq.read_table(path).to_pylist()


def _load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model kdflow.train.launcher's `_save_model` wrote, on `device`."""
    from peft import PeftConfig, get_peft_model
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((path / "kdflow.json").read_text(encoding="utf-8"))
    with device:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, meta["dtype"]))
    if (path / "adapter").is_dir():
        model = get_peft_model(model, PeftConfig.from_pretrained(str(path / "adapter")))
    load_model(model, str(path / "weights.safetensors"), device=str(device))
    trainable = set(meta["trainable"])
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model, AutoTokenizer.from_pretrained(path)


class _Events:
    """The main worker's reports to the parent, one JSON line each, appended whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, kind: str, **fields: Any) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")


# In a WorkerPool's process: the encoding memo of each key the parent sent, kept from one training to the next.
_MEMOS: dict[str, EncodingMemo] = {}


def run(run_dir: Path) -> None:
    """Train as the run directory says, reporting to its events file (rank 0 only)."""
    spec = json.loads((run_dir / "spec.json").read_text(encoding="utf-8"))
    events = _Events(run_dir / EVENTS)
    main = int(os.environ.get("RANK", "0")) == 0
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if spec["device"] == "cuda" else "cpu")
    val_file = run_dir / "val.parquet"
    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    try:
        model, tokenizer = _load_model(run_dir / "model", device)
        training = TrainingConfig.model_validate(spec["training"])
        scoring = ScoringConfig.model_validate(spec["scoring"])
        memo = None
        if spec["memo"] is not None:  # a pool's worker: the parent's memo key names the same tokenizer files
            memo = _MEMOS.setdefault(spec["memo"], EncodingMemo(tokenizer, scoring))
            tokenizer = memo.tokenizer
        result = train(
            model, tokenizer, read_examples(run_dir / "examples.parquet"), training, scoring,
            objective=distillation_objective(training), out_dir=Path(spec["out_dir"]),
            val_examples=read_examples(val_file) if val_file.exists() else None,
            resume=spec["resume"], merge_lora=spec["merge_lora"], progress=False, memo=memo,
            should_stop=(run_dir / STOP).exists,
            on_metrics=lambda rows: events.write("metrics", rows=rows),
            on_checkpoint=lambda step, path, metrics: events.write("checkpoint", step=step, path=path, metrics=metrics),
        )
    except TrainingCancelled as e:
        if main:
            events.write("cancelled", step=e.step, checkpoint=e.checkpoint)
        return
    except Exception as e:
        reraised = reported_exceptions()
        if main:
            reported = next((c.__name__ for c in type(e).__mro__ if c.__name__ in reraised), type(e).__name__)
            events.write("error", type=reported, message=str(e))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if main:
        fields = ("steps", "val_accuracy", "best_val_accuracy", "best_step", "stopped_early", "samples_per_s",
                  "final_dir", "metrics")
        events.write("result", **{name: getattr(result, name) for name in fields})


if __name__ == "__main__":
    run(Path(sys.argv[1]))
