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


def _hand_cloze(model, tokenizer, q, normalise=True) -> list[float]:
    context = tokenizer(cloze_context(q["question"], q["category"], CLOZE))["input_ids"]
    scores = []
    for option in q["options"]:
        cont = tokenizer(cloze_continuation(option), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([context + cont])).logits[0], dim=-1)
        total = sum(log_probs[len(context) - 1 + j, t].item() for j, t in enumerate(cont))
        scores.append(total / len(option) if normalise else total)
    return scores


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
    assert batch.input_ids.shape[0] == sum(len(q["options"]) for q in tiny_questions)
    with torch.no_grad():
        out = option_logits(model, batch)
    assert out.log_mass is None
    expected = [_hand_cloze(model, tiny_tokenizer, q, cfg.length_normalise) for q in tiny_questions]
    _check(out.scores, expected)


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
        (row,) = tokenize([q], chat, ScoringConfig(chat_template=mode))[0].rows
        assert list(row) == chat(expected, add_special_tokens=False)["input_ids"]
    (plain,) = tokenize([q], chat, ScoringConfig(chat_template="off"))[0].rows
    assert list(plain) == chat(prompt)["input_ids"]
    with pytest.raises(ScoringError, match="no chat template"):
        tokenize([q], tiny_tokenizer, ScoringConfig(chat_template="on"))


def test_truncation_keeps_answer_position_and_option(tiny_tokenizer, tiny_questions):
    q = tiny_questions[4]
    (letter_row,) = tokenize([q], tiny_tokenizer, ScoringConfig(max_length=16))[0].rows
    full = tiny_tokenizer(letter_prompt(q["question"], q["options"], q["category"], LETTER))["input_ids"]
    assert list(letter_row) == full[-16:]
    encoded = tokenize([q], tiny_tokenizer, ScoringConfig(mode="cloze", max_length=16))[0]
    for row, option, n in zip(encoded.rows, q["options"], encoded.targets):
        cont = tiny_tokenizer(cloze_continuation(option), add_special_tokens=False)["input_ids"]
        assert len(row) == min(16, len(row)) and list(row[-n:]) == cont


def test_bad_questions_are_rejected(tiny_tokenizer):
    with pytest.raises(ScoringError, match="2..26 options"):
        encode([{"question": "q?", "options": ["only one"], "category": ""}], tiny_tokenizer, LETTER)
    with pytest.raises(ScoringError, match="letter and cloze"):
        q = {"question": "q?", "options": ["a", "b"], "category": ""}
        collate(tokenize([q], tiny_tokenizer, LETTER) + tokenize([q], tiny_tokenizer, CLOZE))


def test_batch_moves_to_device(tiny_tokenizer, tiny_questions):
    batch = encode(tiny_questions, tiny_tokenizer, CLOZE).to("cpu")
    assert batch.input_ids.device.type == "cpu" and batch.target_index.dtype == torch.long


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
