from __future__ import annotations

import copy
import functools
import math
import types

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kdflow.config import ArchitectureConfig, ScoringConfig
from kdflow.errors import KdflowError
from kdflow.modeling import build_model
from kdflow.prompts import cloze_context, letter_prompt
from kdflow.records import LETTERS
from kdflow.scoring import (
    EncodingMemo,
    ScoringError,
    collate,
    encode,
    merge_rows,
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
    """After "Answer:" the natural letter token is " A" (byte-level "ĠA"); `sum` adds "A"."""
    ids = tokenizer(letter_prompt(q["question"], q["options"], q["category"], cfg))["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
    forms = [[tokenizer.convert_tokens_to_ids("Ġ" + L)] for L in LETTERS]
    if cfg.letter_forms == "sum":
        forms = [f + [tokenizer.convert_tokens_to_ids(L)] for f, L in zip(forms, LETTERS)]
    return [torch.logsumexp(log_probs[forms[i]], 0).item() for i in range(len(q["options"]))]


def _joint(tokenizer, context: str, option: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: encode context + " option" whole, cut at len(encode(context))."""
    ctx = tokenizer(context)["input_ids"]
    return ctx, tokenizer(context + " " + option)["input_ids"][len(ctx) :]


def _per_option(model, tokenizer, q) -> torch.Tensor:
    """Each option's summed log-probability from a plain causal pass over context + that option alone."""
    totals = []
    for option in q["options"]:
        context, cont = _joint(tokenizer, cloze_context(q["question"], q["category"], CLOZE), option)
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


@pytest.mark.parametrize("cfg", [LETTER, ScoringConfig(letter_forms="sum")], ids=["natural", "sum"])
def test_letter_matches_hand_computation(cfg, model, tiny_tokenizer, tiny_questions):
    batch = encode(tiny_questions, tiny_tokenizer, cfg)
    assert batch.option_mask.shape == (5, 5) and batch.n_options.tolist() == [3, 4, 5, 2, 4]
    with torch.no_grad():
        out = option_logits(model, batch)
    expected = [_hand_letter(model, tiny_tokenizer, q, cfg) for q in tiny_questions]
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
    # Scores (and so soft labels) are the summed log-likelihoods; per-character ones only rank.
    _check(out.scores, [_hand_cloze(model, tiny_tokenizer, q, normalise=False) for q in tiny_questions])
    if cfg.length_normalise:
        _check(out.normalised, [_hand_cloze(model, tiny_tokenizer, q, normalise=True) for q in tiny_questions])
    else:
        assert out.normalised is None


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


def test_letter_scores_the_natural_token_after_the_prompt(tiny_tokenizer, tiny_questions):
    # After "Answer:" the tokenizer writes " A"; at the start of a chat answer "A". Only that form is scored
    # by default: adding the unnatural form adds its prior (a model that puts mass on "A" glued to
    # "Answer:" would look like it answers A).
    q = tiny_questions[1]
    spaced = [tiny_tokenizer.convert_tokens_to_ids("Ġ" + L) for L in "ABCD"]
    bare = [tiny_tokenizer.convert_tokens_to_ids(L) for L in "ABCD"]
    (plain,) = tokenize([q], tiny_tokenizer, LETTER)
    assert plain.letter_ids == tuple((i,) for i in spaced)
    (summed,) = tokenize([q], tiny_tokenizer, ScoringConfig(letter_forms="sum"))
    assert summed.letter_ids == tuple(zip(spaced, bare))
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    (chatted,) = tokenize([q], chat, LETTER)
    assert chatted.letter_ids == tuple((i,) for i in bare)
    # A template ending in a space or newline: the letter follows it bare.
    (newline,) = tokenize([q], tiny_tokenizer, ScoringConfig(letter_template="{question}\n{options}\nAnswer:\n"))
    assert newline.letter_ids == tuple((i,) for i in bare)


class _FixedNextToken(torch.nn.Module):
    """A causal LM whose next-token logits are `logits` at every position, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        keep = logits_to_keep or input_ids.shape[1]
        return types.SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], keep, -1))


def test_letter_sum_does_not_shift_a_prior_onto_one_letter(tiny_tokenizer, tiny_questions):
    # Mass on the bare "A" (a form that never follows "Answer:"), the natural " A".." D" equally likely:
    # natural scoring sees no preference; summing both forms would answer A with high confidence.
    logits = torch.zeros(len(tiny_tokenizer))
    logits[tiny_tokenizer.convert_tokens_to_ids("A")] = 8.0
    net = _FixedNextToken(logits)
    q = tiny_questions[1]
    natural = to_soft_labels(option_logits(net, encode([q], tiny_tokenizer, LETTER)))[0]
    summed = to_soft_labels(option_logits(net, encode([q], tiny_tokenizer, ScoringConfig(letter_forms="sum"))))[0]
    assert natural.probs == pytest.approx([0.25] * 4)
    assert summed.predicted == 0 and summed.confidence > 0.9


def test_coinciding_letter_forms_count_once(model, tiny_tokenizer, tiny_questions):
    # A normaliser that drops spaces makes "A" and " A" the same token: with letter_forms sum it counts once.
    stripped = copy.deepcopy(tiny_tokenizer)
    stripped.backend_tokenizer.normalizer = normalizers.Replace(" ", "")
    a, b = stripped.convert_tokens_to_ids(["A", "B"])
    cfg = ScoringConfig(letter_forms="sum")
    q = tiny_questions[1]
    (encoded,) = tokenize([q], stripped, cfg)
    assert encoded.letter_ids[:2] == ((a,), (b,))
    ids = stripped(letter_prompt(q["question"], q["options"], q["category"], cfg))["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
        scores = option_logits(model, encode([q], stripped, cfg)).scores[0]
    expected = log_probs[[stripped.convert_tokens_to_ids(L) for L in "ABCD"]]
    assert torch.allclose(scores, expected, atol=1e-5)


def test_multi_token_letter_is_a_clear_error(tiny_questions):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bare = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bare, pad_token="a")
    with pytest.raises(ScoringError, match=r"question 0 \(q0\): the answer letter ' A' .* not one token"):
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
    with pytest.raises(KdflowError, match="no chat template"):
        tokenize([q], tiny_tokenizer, ScoringConfig(chat_template="on"))
    # A system prompt is the first message; cloze never uses the template.
    system = tokenize([q], chat, ScoringConfig(system_prompt="Answer with a letter."))[0].row
    with_system = "<|im_start|>system\nAnswer with a letter.<|im_end|>\n" + expected
    assert list(system) == chat(with_system, add_special_tokens=False)["input_ids"]
    cloze = tokenize([q], chat, ScoringConfig(mode="cloze", chat_template="on"))[0]
    assert list(cloze.context) == chat(cloze_context(q["question"], q["category"], CLOZE))["input_ids"]


def test_thinking_with_letter_mode_is_refused_at_config_time():
    from kdflow.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="enable_thinking.*letter.*'<think>', not an option letter"):
        load_config(None, ["teacher.enable_thinking=true", "scoring.mode=letter"])
    assert load_config(None, ["teacher.enable_thinking=true", "scoring.mode=cloze"]).teacher.enable_thinking


def test_chat_template_off_in_yaml_is_off(tmp_path):
    # YAML 1.1 reads a bare off/on as false/true.
    path = tmp_path / "c.yaml"
    path.write_text("scoring:\n  chat_template: off\n")
    from kdflow.config import load_config

    assert load_config(path).scoring.chat_template == "off"
    path.write_text("scoring:\n  chat_template: on\n")
    assert load_config(path).scoring.chat_template == "on"


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


# --- cloze tokenisation: context and option encoded together, split at the context (lm-eval) ------------

SP_TEXTS = [
    cloze_context(q["question"], q["category"], CLOZE) + " " + " ".join(q["options"])
    for q in [
        {"question": "Which river flows through the capital?", "category": "", "options": ["The long river", "The sea", "A mountain"]},
        {"question": "What colour is the sky at noon?", "category": "", "options": ["Green", "Blue", "Red"]},
        {"question": "Who built the old stone bridge?", "category": "", "options": ["The Romans", "Nobody"]},
    ]
]


def _sentencepiece_style(layout: str) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE ("▁" marks a space, byte fallback, <s> prepended) in one of two layouts.

    prepend: the Llama-2 / Mistral-v0.1 tokenizer.json (a Prepend("▁") + Replace(" ", "▁") normaliser and no
    pre-tokenizer): " option" alone encodes as "▁", "▁option". metaspace: a Metaspace pre-tokenizer
    (prepend_scheme "first", as newer conversions write it).
    """
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["▁"])
    tok.train_from_iterator(SP_TEXTS * 30, trainer)
    if layout == "prepend":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


SP_QUESTIONS = [
    {"question_id": "sp0", "question": "Which river flows through the capital?", "category": "",
     "options": ["The long river", "The sea", "A mountain"]},
    {"question_id": "sp1", "question": "What colour is the sky at noon?", "category": "",
     "options": ["Green", "Blue", "Red"]},
]


@pytest.mark.parametrize("layout", ["prepend", "metaspace"])
def test_cloze_options_are_encoded_jointly_with_the_context(layout):
    tokenizer = _sentencepiece_style(layout)
    stray = tokenizer.convert_tokens_to_ids("▁")
    for e, q in zip(tokenize(SP_QUESTIONS, tokenizer, CLOZE_SUM), SP_QUESTIONS):
        context = cloze_context(q["question"], q["category"], CLOZE)
        assert list(e.context) == tokenizer(context)["input_ids"] and e.context[0] == tokenizer.bos_token_id
        for row, option in zip(e.option_rows, q["options"]):
            ctx, cont = _joint(tokenizer, context, option)
            assert list(row) == ctx + cont
            # The option starts with its first word ("▁The", all in the vocabulary), never with a lone "▁".
            assert tokenizer.convert_ids_to_tokens(row[len(ctx)]) == "▁" + option.split()[0]
            alone = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
            # What encoding " option" on its own gives: a stray "▁" first with the Prepend layout.
            assert (alone == [stray, *cont]) if layout == "prepend" else (alone == cont)


@pytest.mark.parametrize("layout", ["prepend", "metaspace"])
def test_packed_cloze_equals_unpacked_with_a_sentencepiece_tokenizer(layout):
    tokenizer = _sentencepiece_style(layout)
    torch.manual_seed(0)
    net = _sharpen(build_model(ArchitectureConfig(family="llama", hidden_size=32, num_layers=2, num_heads=4,
                                                  num_kv_heads=2), tokenizer))
    encoded = tokenize(SP_QUESTIONS, tokenizer, CLOZE)
    with torch.no_grad():
        out = option_logits(net, collate(encoded, pad_id=tokenizer.pad_token_id))
        for i, e in enumerate(encoded):
            context = len(e.context)
            for j, row in enumerate(e.option_rows):
                log_probs = torch.log_softmax(net(torch.tensor([list(row)])).logits[0], dim=-1)
                targets = torch.tensor(row[context:])
                alone = log_probs[torch.arange(context - 1, len(row) - 1), targets].sum()
                assert torch.isclose(out.scores[i, j], alone, atol=1e-5)
                assert torch.isclose(out.normalised[i, j], alone / len(SP_QUESTIONS[i]["options"][j]), atol=1e-5)


def test_trailing_whitespace_of_the_context_moves_to_the_option(tiny_tokenizer):
    # A cloze template ending in a newline: the newline is encoded with the option (lm-eval _encode_pair).
    cfg = ScoringConfig(mode="cloze", cloze_template="Question: {question}\nAnswer:\n", length_normalise=False)
    q = {"question": "Which is it?", "category": "", "options": ["Blue", "Red"]}
    (e,) = tokenize([q], tiny_tokenizer, cfg)
    assert list(e.context) == tiny_tokenizer("Question: Which is it?\nAnswer:")["input_ids"]
    whole = tiny_tokenizer("Question: Which is it?\nAnswer:\n Blue")["input_ids"]
    assert list(e.option_rows[0]) == whole


@pytest.mark.parametrize("cfg", [CLOZE, CLOZE_SUM], ids=["normalised", "sum"])
def test_cloze_soft_labels_are_the_summed_likelihood_distribution(cfg, model, tiny_tokenizer, tiny_questions):
    # The soft label is softmax(summed log-likelihoods) with or without length normalisation, which only
    # adds predicted_norm (acc_norm's choice).
    with torch.no_grad():
        labels = to_soft_labels(option_logits(model, encode(tiny_questions, tiny_tokenizer, cfg)))
    for label, q in zip(labels, tiny_questions):
        summed = torch.tensor(_hand_cloze(model, tiny_tokenizer, q, normalise=False))
        assert label.probs == pytest.approx(torch.softmax(summed, 0).tolist(), abs=1e-5)
        per_char = _hand_cloze(model, tiny_tokenizer, q, normalise=True)
        expected_norm = max(range(len(per_char)), key=per_char.__getitem__) if cfg.length_normalise else None
        assert label.predicted_norm == expected_norm


# --- truncation: keep BOS, frame, options and cue; cut the question's middle; count it -----------------

LONG_QUESTION = {
    "question_id": "long-x",
    "category": "history",
    "question": "Read the passage. " + "The old stone bridge stood over the river for many years. " * 30
    + "QUESTION: who built the bridge?",
    "options": ["The Romans", "A baker", "Nobody", "The king"],
    "answer": 0,
}


def test_letter_truncation_keeps_bos_frame_options_and_cue(tiny_tokenizer, tiny_questions):
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    for tokenizer, cfg in [(tiny_tokenizer, ScoringConfig(max_length=128)),
                           (chat, ScoringConfig(max_length=192, system_prompt="Answer with a letter."))]:
        encoded = tokenize([LONG_QUESTION, tiny_questions[0]], tokenizer, cfg)
        long, short = encoded
        assert len(long.row) <= cfg.max_length and long.truncated and not short.truncated
        text = tokenizer.decode(long.row)
        options = "\nA. The Romans\nB. A baker\nC. Nobody\nD. The king\nAnswer:"
        if tokenizer is chat:
            assert text.startswith("<|im_start|>system\nAnswer with a letter.<|im_end|>\n<|im_start|>user\n")
            assert text.endswith(options + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
        else:
            assert long.row[0] == tokenizer.bos_token_id
            assert text.endswith(options)
        # The start (instructions) and the end (the question asked) survive; the middle is elided.
        assert "Read the passage." in text and "QUESTION: who built the bridge?" in text and " ... " in text
        assert long.letter_ids == tokenize([tiny_questions[1]], tokenizer, cfg)[0].letter_ids


def test_cloze_truncation_keeps_bos_cue_and_every_option(tiny_tokenizer):
    cfg = ScoringConfig(mode="cloze", max_length=64)
    (e,) = tokenize([LONG_QUESTION], tiny_tokenizer, cfg)
    assert e.truncated and len(e.row) <= 64 and e.row[0] == tiny_tokenizer.bos_token_id
    context = tiny_tokenizer.decode(e.context)
    assert context.startswith("<|bos|>Question: Read the") and context.endswith("QUESTION: who built the bridge?\nAnswer:")
    for row, option in zip(e.option_rows, LONG_QUESTION["options"]):
        assert tiny_tokenizer.decode(row[len(e.context):]) == " " + option


def test_a_question_that_cannot_fit_names_itself_and_max_length(tiny_tokenizer):
    many = dict(LONG_QUESTION, options=[f"option number {i} of many" for i in range(12)])
    with pytest.raises(ScoringError, match=r"question 0 \(long-x\) does not fit scoring.max_length = 40"):
        tokenize([many], tiny_tokenizer, ScoringConfig(max_length=40))
    with pytest.raises(ScoringError, match=r"question 0 \(long-x\) does not fit scoring.max_length = 40"):
        tokenize([many], tiny_tokenizer, ScoringConfig(mode="cloze", max_length=40))


# --- real tokenizers: SmolLM2 (byte-level BPE, chat template) and Gemma-3 (SentencePiece, BOS) ------------


@functools.cache
def _real_tokenizer(directory, gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_tokenizers_split_like_lm_eval_and_score_the_natural_letter(model, request, tiny_questions):
    tokenizer = _real_tokenizer(*request.getfixturevalue(model))
    space = "Ġ" if model == "smollm2" else "▁"
    for e, q in zip(tokenize(tiny_questions, tokenizer, CLOZE), tiny_questions):
        context = cloze_context(q["question"], q["category"], CLOZE)
        ctx = tokenizer(context)["input_ids"]
        assert list(e.context) == ctx
        for row, option in zip(e.option_rows, q["options"]):
            assert list(row) == tokenizer(context + " " + option)["input_ids"]  # lm-eval's whole encoding
            # Here the option encodes alike on its own: the joint split keeps what already matched lm-eval.
            assert list(row[len(ctx):]) == tokenizer(" " + option, add_special_tokens=False)["input_ids"]
    (plain,) = tokenize(tiny_questions[1:2], tokenizer, ScoringConfig(chat_template="off"))
    assert [tokenizer.convert_ids_to_tokens(list(f)) for f in plain.letter_ids] == [[space + L] for L in "ABCD"]
    (auto,) = tokenize(tiny_questions[1:2], tokenizer, LETTER)
    if model == "smollm2":  # a chat template: auto uses it, and the answer starts with a bare letter
        assert tokenizer.decode(auto.row).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
        assert [tokenizer.convert_ids_to_tokens(list(f)) for f in auto.letter_ids] == [[L] for L in "ABCD"]
    else:  # no chat template: auto is the plain prompt, with the tokenizer's BOS
        assert auto == plain and plain.row[0] == tokenizer.bos_token_id


def test_server_prompt_is_what_the_local_renderer_sends(tiny_tokenizer, tiny_questions):
    from kdflow.prompts import CHAT_TEMPLATE_KWARGS, server_prompt

    q = tiny_questions[0]
    cfg = ScoringConfig(system_prompt="Answer with a letter.")
    sent = server_prompt(q["question"], q["options"], q["category"], cfg)
    assert sent.prompt == letter_prompt(q["question"], q["options"], q["category"], cfg)
    assert sent.messages == [{"role": "system", "content": "Answer with a letter."},
                             {"role": "user", "content": sent.prompt}]
    # A server rendering these messages with CHAT_TEMPLATE_KWARGS produces the hf backend's row.
    chat = copy.deepcopy(tiny_tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    text = chat.apply_chat_template(sent.messages, tokenize=False, add_generation_prompt=True, **CHAT_TEMPLATE_KWARGS)
    assert list(tokenize([q], chat, cfg)[0].row) == chat(text, add_special_tokens=False)["input_ids"]
    cloze = server_prompt(q["question"], q["options"], q["category"], CLOZE)
    assert cloze.messages == [] and cloze.prompt == cloze_context(q["question"], q["category"], CLOZE)


def _repeating(tiny_questions) -> list[dict]:
    """The tiny questions plus exact repeats, the same question with its options reordered, and the same
    question with partly different options: work the scorer may share, in rows of unequal length."""
    q0, q1 = tiny_questions[0], tiny_questions[1]
    return [
        *tiny_questions,
        dict(q0),
        dict(q1, options=list(reversed(q1["options"]))),
        dict(q0, options=["A mountain", "The long river", "A lake far away", "The sea"]),
        dict(q1),
    ]


def _plain_letter(net, tokenizer, q, cfg) -> list[float]:
    """Each letter's log-probability from a plain causal pass over the question's prompt alone."""
    e = tokenize([q], tokenizer, cfg)[0]
    with torch.no_grad():
        log_probs = torch.log_softmax(net(torch.tensor([e.row])).logits[0, -1], dim=-1)
    return [torch.logsumexp(log_probs[list(forms)], 0).item() for forms in e.letter_ids]


@pytest.mark.parametrize("cfg", [LETTER, CLOZE_SUM], ids=["letter", "cloze"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_shared_rows_and_prefix_match_plain_per_option_passes(
    cfg, family, grad, model, other_models, tiny_tokenizer, tiny_questions
):
    net = model if family == "llama" else other_models[family]
    questions = _repeating(tiny_questions)
    batch = encode(questions, tiny_tokenizer, cfg)
    # Repeats share rows (cloze: each distinct option once per context), all rows share their first tokens.
    assert batch.input_ids.shape[0] == (7 if cfg.mode == "letter" else 5) and batch.prefix > 0
    assert batch.pad_tokens > 0
    with torch.set_grad_enabled(grad):
        scores = option_logits(net, batch).scores.detach()
    if cfg.mode == "letter":
        expected = [_plain_letter(net, tiny_tokenizer, q, cfg) for q in questions]
    else:
        expected = [_hand_cloze(net, tiny_tokenizer, q, normalise=False) for q in questions]
    _check(scores, expected)


def test_shared_rows_pass_gradients_of_every_question(tiny_model, tiny_tokenizer, tiny_questions):
    student = copy.deepcopy(tiny_model).train()
    questions = _repeating(tiny_questions)
    batch = encode(questions, tiny_tokenizer, CLOZE_SUM)
    weights = torch.randn(batch.option_mask.shape, generator=torch.Generator().manual_seed(0))
    (option_logits(student, batch).scores.masked_fill(~batch.option_mask, 0.0) * weights).sum().backward()
    shared = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    sum(
        (_per_option(student, tiny_tokenizer, q) * weights[i, : len(q["options"])]).sum()
        for i, q in enumerate(questions)
    ).backward()
    for name, p in student.named_parameters():
        assert torch.allclose(shared[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_shared_cloze_rows_stay_within_the_row_cap(tiny_tokenizer, tiny_questions):
    q = tiny_questions[2]
    # Neighbours share an option, so rows fill up with distinct options until the cap opens another.
    variants = [dict(q, options=[f"{n} degrees", f"{n + 1} degrees"]) for n in range(30)]
    encoded = tokenize(variants, tiny_tokenizer, CLOZE_SUM)
    assert max(e.n_tokens for e in encoded) <= 40
    rows, placements = merge_rows(encoded, max_row_tokens=40)
    assert 1 < len(rows) < len(encoded) / 2
    assert max(r.n_tokens for r in rows) <= 40
    for e, (row, columns) in zip(encoded, placements):
        assert [rows[row].options[c] for c in columns] == list(e.options)
        assert rows[row].context == e.context


@pytest.mark.parametrize("mode", ["letter", "cloze"])
def test_an_encoding_memo_encodes_like_tokenize_and_tokenizes_each_question_once(mode, tiny_tokenizer, tiny_questions):
    cfg = ScoringConfig(mode=mode)
    memo = EncodingMemo(tiny_tokenizer, cfg)
    first = memo.tokenize(tiny_questions[:3])
    # Repeated and new questions, in another order: encodings as tokenize gives them, in the order asked.
    asked = [tiny_questions[4], tiny_questions[0], tiny_questions[4], tiny_questions[1]]
    assert memo.tokenize(asked) == tokenize(asked, tiny_tokenizer, cfg)
    assert first == tokenize(tiny_questions[:3], tiny_tokenizer, cfg)
    # Every question is known now: no further call reaches the tokenizer.
    memo.tokenizer = None
    assert memo.tokenize(tiny_questions[:2] + tiny_questions[4:]) == [first[0], first[1], tokenize(
        tiny_questions[4:], tiny_tokenizer, cfg)[0]]


def test_an_encoding_memo_names_a_bad_question_by_its_place_in_the_call(tiny_tokenizer, tiny_questions):
    memo = EncodingMemo(tiny_tokenizer, ScoringConfig(mode="cloze", max_length=64))
    memo.tokenize(tiny_questions[:1])
    # Options too long for max_length even without the question text: found while tokenizing, after the
    # known first question was left out of the batch sent to the tokenizer.
    broken = dict(tiny_questions[1], question_id="q-broken", options=[" ".join(["ocean"] * 80)] * 2)
    with pytest.raises(ScoringError, match=r"question 2 \(q-broken\)"):
        memo.tokenize([tiny_questions[0], tiny_questions[2], broken])


def test_training_data_refuses_a_memo_of_another_scoring_config(tiny_tokenizer, tiny_questions):
    from kdflow.fitting.batches import build_dataset

    examples = [dict(q, answer=0) for q in tiny_questions]
    memo = EncodingMemo(tiny_tokenizer, LETTER)
    assert build_dataset(examples, tiny_tokenizer, LETTER, with_probs=False, memo=memo).encoded == tokenize(
        examples, tiny_tokenizer, LETTER)
    with pytest.raises(ValueError, match="another tokenizer or scoring config"):
        build_dataset(examples, tiny_tokenizer, CLOZE, with_probs=False, memo=memo)
