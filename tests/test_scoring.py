from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kdflow.config import ArchitectureConfig, ScoringConfig
from kdflow.modeling import build_model
from kdflow.prompts import cloze_context, cloze_continuation, letter_prompt
from kdflow.records import LETTERS
from kdflow.scoring import (
    ScoringError,
    collate,
    encode,
    letter_token_ids,
    option_logits,
    to_soft_labels,
    tokenize,
)

LETTER = ScoringConfig(mode="letter")
CLOZE = ScoringConfig(mode="cloze")
CLOZE_SUM = ScoringConfig(mode="cloze", length_normalise=False)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large random weights: distributions far from uniform, so small scoring mistakes show."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model(tiny_model):
    return _sharpen(copy.deepcopy(tiny_model))


@pytest.fixture(scope="module")
def other_models(tiny_tokenizer) -> dict[str, torch.nn.Module]:
    """Qwen3 (RoPE, q/k norms) and GPT-2, whose absolute positions go wrong if padding shifts them."""
    arch = ArchitectureConfig(family="qwen3", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256))
    return {"qwen3": _sharpen(build_model(arch, tiny_tokenizer)), "gpt2": _sharpen(gpt2)}


def _hand_letter(model, tokenizer, q, cfg=LETTER) -> list[float]:
    ids = tokenizer(letter_prompt(q["question"], q["options"], q["category"], cfg))["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
    forms = [(tokenizer.convert_tokens_to_ids(L), tokenizer.convert_tokens_to_ids("Ġ" + L)) for L in LETTERS]
    return [torch.logsumexp(log_probs[list(forms[i])], 0).item() for i in range(len(q["options"]))]


def _per_option(model, tokenizer, q) -> torch.Tensor:
    """Each option's summed log-probability from a plain causal pass over context + that option alone."""
    context = tokenizer(cloze_context(q["question"], q["category"], CLOZE))["input_ids"]
    totals = []
    for option in q["options"]:
        cont = tokenizer(cloze_continuation(option), add_special_tokens=False)["input_ids"]
        log_probs = torch.log_softmax(model(torch.tensor([context + cont])).logits[0], dim=-1)
        totals.append(log_probs[torch.arange(len(context) - 1, len(context) - 1 + len(cont)), cont].sum())
    return torch.stack(totals)


def _hand_cloze(model, tokenizer, q, normalise=True) -> list[float]:
    with torch.no_grad():
        totals = _per_option(model, tokenizer, q).tolist()
    return [t / len(o) if normalise else t for t, o in zip(totals, q["options"])]


def _check(scores, expected_rows):
    for i, expected in enumerate(expected_rows):
        k = len(expected)
        assert torch.allclose(scores[i, :k], torch.tensor(expected), atol=1e-5), (i, scores[i], expected)
        assert torch.isneginf(scores[i, k:]).all()


def test_letter_matches_hand_computation(model, tiny_tokenizer, tiny_questions):
    batch = encode(tiny_questions, tiny_tokenizer, LETTER)
    assert batch.option_mask.shape == (5, 5) and batch.n_options.tolist() == [3, 4, 5, 2, 4]
    with torch.no_grad():
        out = option_logits(model, batch)
    expected = [_hand_letter(model, tiny_tokenizer, q) for q in tiny_questions]
    _check(out.scores, expected)
    mass = torch.tensor([math.log(sum(math.exp(v) for v in row)) for row in expected])
    assert torch.allclose(out.log_mass, mass, atol=1e-5)
    assert out.real_tokens == int(batch.attention_mask.sum()) and out.pad_tokens > 0


@pytest.mark.parametrize("cfg", [CLOZE, CLOZE_SUM], ids=["normalised", "sum"])
def test_cloze_matches_hand_computation(cfg, model, tiny_tokenizer, tiny_questions):
    batch = encode(tiny_questions, tiny_tokenizer, cfg)
    assert batch.input_ids.shape[0] == len(tiny_questions)  # one packed row per question
    with torch.no_grad():
        out = option_logits(model, batch)
    assert out.log_mass is None
    expected = [_hand_cloze(model, tiny_tokenizer, q, cfg.length_normalise) for q in tiny_questions]
    _check(out.scores, expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_packed_cloze_matches_per_option_passes(attention, family, model, other_models, tiny_tokenizer, tiny_questions):
    # Options of one to many tokens, in rows of unequal length (left padding), each scored as if alone.
    uneven = {"question": "Which is it?", "category": "misc", "options": ["A", "The old stone bridge", "Blue", "No"]}
    questions = [*tiny_questions, uneven]
    net = copy.deepcopy(model if family == "llama" else other_models[family])
    net.set_attn_implementation(attention)
    encoded = tokenize(questions, tiny_tokenizer, CLOZE_SUM)
    assert min(encoded[-1].option_lengths) == 1 and max(encoded[-1].option_lengths) > 2
    batch = collate(encoded)
    assert len({e.n_tokens for e in encoded}) > 1 and batch.pad_tokens > 0
    with torch.no_grad():
        scores = option_logits(net, batch).scores
    _check(scores, [_hand_cloze(net, tiny_tokenizer, q, normalise=False) for q in questions])


def test_packed_cloze_gradients_match_per_option_passes(tiny_model, tiny_tokenizer, tiny_questions):
    student = copy.deepcopy(tiny_model).train()
    batch = encode(tiny_questions, tiny_tokenizer, CLOZE_SUM)
    weights = torch.randn(batch.option_mask.shape, generator=torch.Generator().manual_seed(0))
    (option_logits(student, batch).scores.masked_fill(~batch.option_mask, 0.0) * weights).sum().backward()
    packed = {name: p.grad.clone() for name, p in student.named_parameters()}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in packed.values())
    student.zero_grad()
    sum(
        (_per_option(student, tiny_tokenizer, q) * weights[i, : len(q["options"])]).sum()
        for i, q in enumerate(tiny_questions)
    ).backward()
    for name, p in student.named_parameters():
        assert torch.allclose(packed[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_attention_without_custom_masks_is_a_clear_error(tiny_model, tiny_tokenizer, tiny_questions):
    net = copy.deepcopy(tiny_model)
    net.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ScoringError, match="'flash_attention_2' cannot take.*'sdpa' or 'eager'.*letter"):
        option_logits(net, encode(tiny_questions, tiny_tokenizer, CLOZE))


@pytest.mark.parametrize("cfg", [LETTER, CLOZE], ids=["letter", "cloze"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_padding_does_not_change_scores(cfg, family, model, other_models, tiny_tokenizer, tiny_questions):
    net = model if family == "llama" else other_models[family]
    with torch.no_grad():
        together = option_logits(net, encode(tiny_questions, tiny_tokenizer, cfg)).scores
        for i, q in enumerate(tiny_questions):
            alone = option_logits(net, encode([q], tiny_tokenizer, cfg)).scores[0]
            k = len(q["options"])
            assert torch.allclose(together[i, :k], alone, atol=1e-5)


@pytest.mark.parametrize("cfg", [LETTER, CLOZE], ids=["letter", "cloze"])
def test_soft_labels(cfg, model, tiny_tokenizer, tiny_questions):
    with torch.no_grad():
        labels = to_soft_labels(option_logits(model, encode(tiny_questions, tiny_tokenizer, cfg)))
    for label, q in zip(labels, tiny_questions):
        assert len(label.probs) == len(q["options"])
        assert math.isclose(sum(label.probs), 1.0, abs_tol=1e-9)
        assert 0.0 < label.coverage <= 1.0
        assert label.predicted == max(range(len(label.probs)), key=label.probs.__getitem__)
        if cfg.mode == "cloze":
            assert label.coverage == 1.0


@pytest.mark.parametrize("cfg", [LETTER, CLOZE], ids=["letter", "cloze"])
def test_gradients_reach_the_model(cfg, tiny_model, tiny_tokenizer, tiny_questions):
    student = copy.deepcopy(tiny_model).train()
    out = option_logits(student, encode(tiny_questions, tiny_tokenizer, cfg))
    answers = torch.tensor([q["answer"] for q in tiny_questions])
    loss = -torch.log_softmax(out.scores, dim=-1)[torch.arange(len(answers)), answers].mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0


def test_both_letter_forms_are_combined(tiny_tokenizer):
    ids = letter_token_ids(tiny_tokenizer, 3)
    assert ids[0] == (tiny_tokenizer.convert_tokens_to_ids("A"), tiny_tokenizer.convert_tokens_to_ids("ĠA"))
    assert len({i for pair in ids for i in pair}) == 6


def test_coinciding_letter_forms_count_once(model, tiny_tokenizer, tiny_questions):
    # Stripping the text makes "A" and " A" the same token: that id must be counted once, not twice.
    stripped = copy.deepcopy(tiny_tokenizer)
    stripped.backend_tokenizer.normalizer = normalizers.Strip()
    a, b = stripped.convert_tokens_to_ids(["A", "B"])
    assert letter_token_ids(stripped, 2) == ((a,), (b,))
    q = tiny_questions[1]
    ids = stripped(letter_prompt(q["question"], q["options"], q["category"], LETTER))["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
        scores = option_logits(model, encode([q], stripped, LETTER)).scores[0]
    expected = log_probs[[stripped.convert_tokens_to_ids(L) for L in "ABCD"]]
    assert torch.allclose(scores, expected, atol=1e-5)


def test_multi_token_letter_is_a_clear_error(tiny_questions):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bare = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bare, pad_token="a")
    with pytest.raises(ScoringError, match="' A' is not a single token"):
        encode(tiny_questions, tokenizer, LETTER)


def test_chat_template_is_applied_with_thinking_off(tiny_tokenizer, tiny_questions):
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    q = tiny_questions[0]
    prompt = letter_prompt(q["question"], q["options"], q["category"], LETTER)
    expected = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for mode in ("auto", "on"):
        row = tokenize([q], chat, ScoringConfig(chat_template=mode))[0].row
        assert list(row) == chat(expected, add_special_tokens=False)["input_ids"]
    plain = tokenize([q], chat, ScoringConfig(chat_template="off"))[0].row
    assert list(plain) == chat(prompt)["input_ids"]
    with pytest.raises(ScoringError, match="no chat template"):
        tokenize([q], tiny_tokenizer, ScoringConfig(chat_template="on"))


def test_truncation_keeps_answer_position_and_options(tiny_tokenizer, tiny_questions):
    q = tiny_questions[4]
    letter_row = tokenize([q], tiny_tokenizer, ScoringConfig(max_length=16))[0].row
    full = tiny_tokenizer(letter_prompt(q["question"], q["options"], q["category"], LETTER))["input_ids"]
    assert list(letter_row) == full[-16:]
    q = dict(q, options=[f"{o}, {o}" for o in q["options"]])  # options of 16+ tokens together (min max_length)
    conts = [tiny_tokenizer(cloze_continuation(o), add_special_tokens=False)["input_ids"] for o in q["options"]]
    packed = [t for cont in conts for t in cont]
    context = tiny_tokenizer(cloze_context(q["question"], q["category"], CLOZE))["input_ids"]
    max_length = len(packed) + 3
    encoded = tokenize([q], tiny_tokenizer, ScoringConfig(mode="cloze", max_length=max_length))[0]
    assert list(encoded.row) == context[-3:] + packed and list(encoded.context) == context[-3:]
    assert [list(row) for row in encoded.option_rows] == [context[-3:] + cont for cont in conts]
    with pytest.raises(ScoringError, match=r"question 0 \(q4\).*raise scoring.max_length or use scoring.mode: letter"):
        tokenize([q], tiny_tokenizer, ScoringConfig(mode="cloze", max_length=len(packed)))


def test_bad_questions_are_rejected(tiny_tokenizer):
    with pytest.raises(ScoringError, match="2..26 options"):
        encode([{"question": "q?", "options": ["only one"], "category": ""}], tiny_tokenizer, LETTER)
    with pytest.raises(ScoringError, match="letter and cloze"):
        q = {"question": "q?", "options": ["a", "b"], "category": ""}
        collate(tokenize([q], tiny_tokenizer, LETTER) + tokenize([q], tiny_tokenizer, CLOZE))


def test_batch_moves_to_device(tiny_tokenizer, tiny_questions):
    batch = encode(tiny_questions, tiny_tokenizer, CLOZE).to("cpu")
    assert batch.input_ids.device.type == "cpu" and batch.target_index.dtype == torch.long
    assert batch.segments.device.type == "cpu"


def test_works_through_a_lora_wrapper(tiny_model, tiny_tokenizer, tiny_questions):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    batch = encode(tiny_questions, tiny_tokenizer, CLOZE)
    out = option_logits(student, batch)
    with torch.no_grad():
        plain = option_logits(tiny_model, batch)
    assert torch.allclose(out.scores, plain.scores, atol=1e-5)  # LoRA B starts at zero
    out.scores.masked_fill(~batch.option_mask, 0.0).sum().backward()
    lora = [p for name, p in student.named_parameters() if "lora_" in name]
    assert lora and all(p.grad is not None for p in lora)
