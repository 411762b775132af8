"""One forward pass of a model over a ScoringBatch, read out as per-option scores (see kdflow.scoring)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kdflow.scoring.batch import ScoringBatch
from kdflow.scoring.encoding import Mode, ScoringError
from kdflow.softlabels import SoftLabel, soft_label_from_logprobs


@dataclass(frozen=True)
class OptionScores:
    """What `option_logits` returns for a batch of B questions with at most K options.

    scores [B, K]: log-score of each option, -inf for padded options; differentiable. letter: the letter's
    log-probability; cloze: the option's summed log-likelihood.
    log_mass [B]: letter mode, log of the probability mass on all option letters (log coverage); cloze None.
    normalised [B, K]: cloze with length_normalise, scores / option length in characters (a ranking rule,
    lm-evaluation-harness acc_norm, not a distribution); else None.
    """

    mode: Mode
    scores: torch.Tensor
    log_mass: torch.Tensor | None
    n_options: torch.Tensor
    real_tokens: int
    pad_tokens: int
    normalised: torch.Tensor | None = None


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside PEFT / DDP / FSDP wrappers (whose forward takes **kwargs)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            return model


def _packed_mask(model: torch.nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """The [R, 1, L, L] attention mask of packed cloze rows, in the form the model's attention takes.

    A query attends to an earlier-or-same key of the context or of its own segment. A padding query
    attends to the padding before it (never to nothing, which would give NaN). transformers passes a 4D
    mask through unchanged: sdpa takes it as bool (True = attend), eager adds it to the scores, so it gets
    0 / most negative float in the dtype the scores are computed in (the autocast dtype where one is on).
    Flash attention and flex attention take no such mask.
    """
    inner = _unwrapped(model)
    attention = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        raise ScoringError(
            f"cloze scoring packs a question's options into one row with a custom attention mask, which "
            f"attn_implementation {attention!r} cannot take; load the model with attn_implementation 'sdpa' or "
            "'eager', or use scoring.mode: letter"
        )
    columns = torch.arange(segments.shape[1], device=segments.device)
    keys = segments[:, None, :]
    allowed = (columns[None, :] <= columns[:, None]) & ((keys == 0) | (keys == segments[:, :, None]))
    if attention == "sdpa":
        return allowed[:, None]
    device = segments.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else inner.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


@contextlib.contextmanager
def _head_only_at(model: torch.nn.Module, keep: int, index: torch.Tensor | None) -> Iterator[None]:
    """While active, the model's output head (and whatever the model applies after it, such as logit
    soft-capping) sees only the hidden states at `index` of its last `keep` columns, flattened: the
    model's logits come out [N, V] instead of [R, keep, V] (a cloze batch of merged rows can have a wide
    window, and most of its [R, keep] positions predict nothing scored)."""
    head = _unwrapped(model).get_output_embeddings() if index is not None else None
    if head is None:
        yield
        return

    def gather(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0][:, -keep:]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _logits(model: torch.nn.Module, batch: ScoringBatch, keep: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the last `keep` columns, [R, keep, V]; with `index` (into the flattened [R, keep]) only
    those positions, [N, V].

    Without gradients, a prefix shared by all rows is computed once (one row) and its keys/values reused
    by every row. With gradients (training) the plain pass runs, so DDP/FSDP see one forward per step.
    """
    mask = batch.attention_mask if batch.segments is None else _packed_mask(model, batch.segments)
    parameters = inspect.signature(_unwrapped(model).forward).parameters
    supports_keep = "logits_to_keep" in parameters
    # transformers renamed past_key_values to cache (both in and out); take whichever this version has.
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    extra = {"logits_to_keep": keep} if supports_keep else {}
    inputs: dict[str, Any] = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids)
    p, rows = batch.prefix, batch.input_ids.shape[0]
    if p and rows > 1 and not torch.is_grad_enabled():
        first = model(
            input_ids=batch.input_ids[:1, :p],
            position_ids=batch.position_ids[:1, :p],
            use_cache=True,
            **({"logits_to_keep": 1} if supports_keep else {}),
        )
        cache = getattr(first, cache_name)
        cache.batch_repeat_interleave(rows)
        inputs = dict(
            input_ids=batch.input_ids[:, p:],
            attention_mask=mask if mask.dim() == 2 else mask[:, :, p:],
            position_ids=batch.position_ids[:, p:],
            **{cache_name: cache},
            use_cache=True,
        )
    else:
        inputs["use_cache"] = False
    with _head_only_at(model, keep, index):
        logits = model(**inputs, **extra).logits
    if index is None:
        return logits[:, -keep:]
    if logits.dim() == 2:
        return logits
    return logits[:, -keep:].reshape(-1, logits.shape[-1]).index_select(0, index)


def option_logits(model: torch.nn.Module, batch: ScoringBatch) -> OptionScores:
    """Score every option of every question in `batch` with one forward pass of `model`.

    No grad mode is set here: training backpropagates through the scores, labeling wraps the call in
    torch.inference_mode. Log-softmax runs in float32 on the few positions needed.
    """
    normalised = None
    rows, row_k = batch.input_ids.shape[0], batch.row_options
    if batch.mode == "letter":
        log_probs = torch.log_softmax(_logits(model, batch, 1)[:, -1].float(), dim=-1)  # [R, V]
        f = batch.letter_ids.shape[-1]
        forms = log_probs.gather(1, batch.letter_ids.view(rows, row_k * f)).view(rows, row_k, f)
        row_scores = torch.logsumexp(forms.masked_fill(~batch.letter_form_mask, float("-inf")), dim=-1)  # [R, KR]
    else:
        picked = _logits(model, batch, batch.window + 1, batch.target_index).float()  # [N, V]
        token_lp = picked.gather(1, batch.target_ids[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)  # [N]
        row_scores = torch.zeros(rows * row_k, device=token_lp.device).index_add(0, batch.target_slot, token_lp)
    scores = row_scores.reshape(-1)[batch.option_source].masked_fill(~batch.option_mask, float("-inf"))  # [B, K]
    log_mass = torch.logsumexp(scores, dim=-1) if batch.mode == "letter" else None
    if batch.norms is not None:
        normalised = scores / batch.norms
    return OptionScores(
        mode=batch.mode,
        scores=scores,
        log_mass=log_mass,
        n_options=batch.n_options,
        real_tokens=batch.real_tokens,
        pad_tokens=batch.pad_tokens,
        normalised=normalised,
    )


def to_soft_labels(scores: OptionScores) -> list[SoftLabel]:
    """One SoftLabel per question: letter scores are vocabulary log-probs (coverage = their mass), cloze
    scores (summed log-likelihoods) are renormalised over the options (coverage 1). With length
    normalisation, `predicted_norm` is the argmax of the per-character scores (a prediction rule only)."""
    rows = scores.scores.detach().float().cpu()
    if scores.mode == "cloze":
        # Softmax is shift-invariant; shifting keeps long options above softlabels' "missing" floor.
        rows = rows - rows.max(dim=-1, keepdim=True).values
    counts = scores.n_options.tolist()
    normalised = scores.normalised.detach().float().cpu().tolist() if scores.normalised is not None else None
    return [
        soft_label_from_logprobs(
            row[:n],
            normalised=scores.mode == "cloze",
            rank_by=normalised[i][:n] if normalised is not None else None,
        )
        for i, (row, n) in enumerate(zip(rows.tolist(), counts))
    ]
