"""A trained model written out so that `kdflow.modeling.load_model` reads it back (students and prepared
teachers alike)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from kdflow.modeling import save_pretrained


def save_trained_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path, *, merge_lora: bool = True
) -> Path:
    """Write a trained model and its tokenizer to `path` for `modeling.load_pretrained`; returns `path`.

    A LoRA model is merged into its base weights in place (`merge_and_unload`: `model` is a plain model
    afterwards) when `merge_lora`, else saved as an adapter that names its base model.
    """
    if isinstance(model, PeftModel):
        if merge_lora:
            model = model.merge_and_unload()
        else:
            path = Path(path)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            return path
    return save_pretrained(model, tokenizer, path)
