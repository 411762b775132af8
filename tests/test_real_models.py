"""Real pretrained models, loaded as they ship (a directory holding a GGUF file), scored by kdflow and checked
against a direct per-option computation with plain transformers.

Each model is loaded once per module, through kdflow's own path (config -> teacher_source -> HFBackend),
and shared. The direct computation encodes prompt + answer (letter) or context + option (cloze) together
and takes the tokens after the prompt's own tokens, as lm-evaluation-harness does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdflow.label.backends.hf import HFBackend
from kdflow.config import RunConfig, ScoringConfig
from kdflow.ingest.datasets import run_dataset_ids
from kdflow.modeling import ModelSource, load_model, save_pretrained
from kdflow.records import LETTERS
from kdflow.store import Store
from kdflow.label.teacher import teacher_ref, teacher_source

# MMLU-shaped questions written for these tests (subject, question, four options, gold index).
QUESTIONS = [
    ("astronomy", "Which planet is closest to the Sun?", ["Venus", "Mercury", "Earth", "Mars"], 1),
    ("astronomy", "What is the largest planet in the Solar System?", ["Saturn", "Neptune", "Jupiter", "Uranus"], 2),
    ("biology", "Which organelle produces most of a cell's ATP?",
     ["Nucleus", "Ribosome", "Golgi apparatus", "Mitochondrion"], 3),
    ("biology", "DNA is made of units called", ["amino acids", "nucleotides", "fatty acids", "monosaccharides"], 1),
    ("chemistry", "What is the chemical symbol for sodium?", ["Na", "So", "Sd", "S"], 0),
    ("chemistry", "Which gas makes up most of Earth's atmosphere?",
     ["Oxygen", "Carbon dioxide", "Nitrogen", "Argon"], 2),
    ("physics", "The SI unit of force is the", ["joule", "newton", "watt", "pascal"], 1),
    ("physics", "Which colour of visible light has the longest wavelength?", ["Red", "Green", "Blue", "Violet"], 0),
    ("mathematics", "What is the derivative of x squared?", ["x", "2x", "x squared", "2"], 1),
    ("mathematics", "How many degrees are in the interior angles of a triangle?", ["90", "360", "270", "180"], 3),
    ("mathematics", "Which number is prime?", ["21", "27", "29", "33"], 2),
    ("geography", "What is the capital of France?", ["Paris", "Lyon", "Marseille", "Nice"], 0),
    ("geography", "Which is the longest river in South America?", ["Orinoco", "Parana", "Amazon", "Magdalena"], 2),
    ("world history", "In which year did the Second World War end?", ["1918", "1939", "1945", "1950"], 2),
    ("world history", "Who was the first emperor of Rome?", ["Julius Caesar", "Augustus", "Nero", "Trajan"], 1),
    ("us history", "Who was the first President of the United States?",
     ["Thomas Jefferson", "Abraham Lincoln", "John Adams", "George Washington"], 3),
    ("computer science", "Which data structure works first in, first out?", ["Stack", "Queue", "Tree", "Heap"], 1),
    ("computer science", "Binary search on a sorted list takes time proportional to",
     ["n", "n squared", "log n", "1"], 2),
    ("economics", "When demand rises and supply stays the same, the price usually",
     ["falls", "rises", "stays the same", "becomes zero"], 1),
    ("anatomy", "How many chambers does the human heart have?", ["Two", "Three", "Four", "Five"], 2),
    ("philosophy", "Who wrote 'The Republic'?", ["Aristotle", "Plato", "Socrates", "Kant"], 1),
    ("literature", "Who wrote 'Romeo and Juliet'?",
     ["Charles Dickens", "Jane Austen", "William Shakespeare", "Mark Twain"], 2),
    ("nutrition", "Which vitamin does the skin make in sunlight?",
     ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"], 2),
    ("electrical engineering", "Ohm's law relates voltage, current and",
     ["power", "resistance", "frequency", "charge"], 1),
]
ROWS = [
    {"question_id": f"q{i}", "category": c, "question": q, "options": o, "answer": a}
    for i, (c, q, o, a) in enumerate(QUESTIONS)
]
# Every setting spelled out, so the test states the prompt it checks instead of inheriting defaults.
LETTER = ScoringConfig(mode="letter", chat_template="off", max_length=4096)
LETTER_CHAT = ScoringConfig(mode="letter", chat_template="on", max_length=4096)
CLOZE = ScoringConfig(mode="cloze", length_normalise=False, max_length=4096)
TOLERANCE = 1e-4


def _load_through_kdflow(tmp_path_factory, model) -> HFBackend:
    """Config -> teacher_ref -> teacher_source -> HFBackend.from_config: how `kdflow label` opens it."""
    directory, gguf_file = model
    cfg = RunConfig.model_validate({
        "home": str(tmp_path_factory.mktemp("home")),
        "teacher": {"model": str(directory), "gguf_file": gguf_file, "device": "cpu", "batch_size": 8},
    })
    ref = teacher_ref(cfg, Store(cfg.home_dir), [])
    assert ref.model_dir == directory.resolve()
    return HFBackend.from_config(cfg.teacher, cfg.scoring, teacher_source(cfg, ref))


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory) -> HFBackend:
    return _load_through_kdflow(tmp_path_factory, smollm2)


@pytest.fixture(scope="module")
def gemma(gemma3, tmp_path_factory) -> HFBackend:
    return _load_through_kdflow(tmp_path_factory, gemma3)


def _split(tokenizer, prefix: str, continuation: str, special: bool) -> tuple[list[int], list[int]]:
    """prefix + continuation encoded together, split after the prefix's own tokens (lm-evaluation-harness)."""
    whole = tokenizer(prefix + continuation, add_special_tokens=special)["input_ids"]
    head = tokenizer(prefix, add_special_tokens=special)["input_ids"]
    assert whole[: len(head)] == head, "the prompt's tokens change when the answer follows it"
    assert len(whole) > len(head), f"{continuation!r} adds no token"
    return head, whole[len(head):]


def _sequence_logprobs(model, sequences: list[list[int]], start: int) -> list[float]:
    """For token sequences sharing their first `start` tokens, the summed log-probability of each one's
    tokens from `start` on; one right-padded batch, the padding masked, logits kept only where needed."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    keep = width - start + 1  # positions start - 1 .. width - 1 predict the continuation tokens
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.double()
    logprobs = torch.log_softmax(logits, dim=-1)  # column j is position start - 1 + j
    return [float(sum(logprobs[row, t - start, seq[t]] for t in range(start, len(seq))))
            for row, seq in enumerate(sequences)]


def _render_letter(tokenizer, row: dict, chat: bool) -> str:
    """The MMLU prompt of lm-evaluation-harness, as ScoringConfig's letter_template and description say."""
    subject = row["category"]
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
    prompt = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
              f"{row['question']}\n{options}\nAnswer:")
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    return prompt


def direct_letter_probs(backend: HFBackend, row: dict, chat: bool) -> list[float]:
    """Softmax over the options' letter tokens at the last prompt position; each letter is the token the
    tokenizer writes for it after the prompt (" A" after "Answer:", "A" at the start of a chat answer)."""
    prompt = _render_letter(backend.tokenizer, row, chat)
    letter_ids = []
    for letter in LETTERS[: len(row["options"])]:
        head, tail = _split(backend.tokenizer, prompt, letter if prompt[-1].isspace() else " " + letter, not chat)
        assert len(tail) == 1, (letter, tail)
        letter_ids.append(tail[0])
    with torch.inference_mode():
        logits = backend.model(torch.tensor([head]), logits_to_keep=1).logits[0, -1].double()
    return torch.softmax(logits[letter_ids], dim=0).tolist()


def direct_cloze_probs(backend: HFBackend, row: dict) -> list[float]:
    """Softmax over each option's summed log-likelihood after "Question: ...\nAnswer:"."""
    context = f"Question: {row['question']}\nAnswer:"
    splits = [_split(backend.tokenizer, context, " " + o, True) for o in row["options"]]
    assert len({len(h) for h, _ in splits}) == 1
    scores = _sequence_logprobs(backend.model, [h + t for h, t in splits], len(splits[0][0]))
    return torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()


def kdflow_probs(backend: HFBackend, scoring: ScoringConfig) -> list[list[float]]:
    scorer = HFBackend(backend.model, backend.tokenizer, scoring, batch_size=8, device="cpu")
    return [s.label.probs for s in scorer.score(ROWS)]


def _largest_gap(ours: list[list[float]], direct: list[list[float]]) -> float:
    return max(abs(a - b) for x, y in zip(ours, direct, strict=True) for a, b in zip(x, y, strict=True))


def test_smollm2_loads_from_its_gguf_directory_as_a_plain_model(smol, smollm2):
    directory, gguf_file = smollm2
    assert type(smol.model).__name__ == "LlamaForCausalLM" and smol.model.config.num_hidden_layers == 30
    assert getattr(smol.model, "hf_quantizer", None) is None, "GGUF weights must be de-quantised on load"
    assert smol.tokenizer.chat_template and smol.model_id == str(directory)


def test_smollm2_letter_matches_direct_computation(smol):
    ours = kdflow_probs(smol, LETTER)
    direct = [direct_letter_probs(smol, row, chat=False) for row in ROWS]
    assert _largest_gap(ours, direct) < TOLERANCE


def test_smollm2_chat_letter_matches_direct_computation(smol):
    ours = kdflow_probs(smol, LETTER_CHAT)
    direct = [direct_letter_probs(smol, row, chat=True) for row in ROWS]
    assert _largest_gap(ours, direct) < TOLERANCE


def test_smollm2_cloze_matches_direct_computation(smol):
    ours = kdflow_probs(smol, CLOZE)
    direct = [direct_cloze_probs(smol, row) for row in ROWS]
    assert _largest_gap(ours, direct) < TOLERANCE


def test_gemma3_loads_with_its_sentencepiece_tokenizer(gemma):
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM"
    assert getattr(gemma.model, "hf_quantizer", None) is None
    pieces = gemma.tokenizer.convert_ids_to_tokens(gemma.tokenizer("Answer: A", add_special_tokens=False)["input_ids"])
    assert pieces[-1] == "▁A", pieces


def test_gemma3_letter_matches_direct_computation(gemma):
    ours = kdflow_probs(gemma, LETTER)
    direct = [direct_letter_probs(gemma, row, chat=False) for row in ROWS]
    assert _largest_gap(ours, direct) < TOLERANCE


def test_gemma3_cloze_matches_direct_computation(gemma):
    ours = kdflow_probs(gemma, CLOZE)
    direct = [direct_cloze_probs(gemma, row) for row in ROWS]
    assert _largest_gap(ours, direct) < TOLERANCE


def test_gguf_teacher_saves_a_dequantised_copy_that_loads_back_the_same(smol, tmp_path):
    """What teacher preparation does with a GGUF base: save_pretrained writes safetensors (no quantizer left
    to refuse it), and the copy loads as a plain directory with the same outputs."""
    saved = save_pretrained(smol.model, smol.tokenizer, tmp_path / "copy")
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.gguf"))
    model, tokenizer = load_model(ModelSource(str(saved)), device="cpu")
    ids = smol.tokenizer("Question: What is the capital of France?\nAnswer: Paris")["input_ids"]
    assert tokenizer("Question: What is the capital of France?\nAnswer: Paris")["input_ids"] == ids
    with torch.inference_mode():
        before = smol.model(torch.tensor([ids])).logits
        after = model(torch.tensor([ids])).logits
    assert torch.equal(before, after)


@pytest.mark.slow
def test_students_built_from_an_unprepared_gguf_teacher_get_its_weights_and_tokenizer(smol, smollm2, tmp_path):
    """from_teacher copies layers of the teacher loaded from its GGUF file; a fresh student reads with the
    teacher's tokenizer, from the same file (the paths that used to drop gguf_file)."""
    from kdflow.config import StudentConfig
    from kdflow.modeling import load_tokenizer
    from kdflow.train.initialisation import init_student

    directory, gguf_file = smollm2
    cfg = RunConfig.model_validate({"home": str(tmp_path),
                                    "teacher": {"model": str(directory), "gguf_file": gguf_file}})
    source = teacher_source(cfg, teacher_ref(cfg, Store(cfg.home_dir), []))
    student, tokenizer = init_student(StudentConfig(init="from_teacher", layer_stride=10, device="cpu"), teacher=source)
    assert student.config.num_hidden_layers == 3
    for kept, copied in zip((0, 10, 20), student.model.layers, strict=True):
        assert torch.equal(copied.mlp.down_proj.weight, smol.model.model.layers[kept].mlp.down_proj.weight)
    text = "The following are multiple choice questions (with answers) about astronomy."
    expected = smol.tokenizer(text)["input_ids"]
    assert tokenizer(text)["input_ids"] == load_tokenizer(source)(text)["input_ids"] == expected


def test_plan_reads_the_gguf_teachers_shape(smollm2):
    """`kdflow plan` sizes a GGUF teacher from the file's metadata, as a directory or as the file itself."""
    from kdflow.config import load_config
    from kdflow.planning import plan

    directory, gguf_file = smollm2
    for model in ([f"teacher.model={directory}", f"teacher.gguf_file={gguf_file}"],
                  [f"teacher.model={directory / gguf_file}", "teacher.gguf_file=null"]):
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "smollm2-gguf.yaml", model)
        label, _ = plan(cfg, questions=1000, tokens_per_question=200)
        assert label.model == str(model[0].split("=", 1)[1]) and 130e6 < label.flops / (2 * 1000 * 200) < 140e6


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_kdflow_run_with_the_gguf_teacher_end_to_end(smollm2, tmp_path):
    """configs/smollm2-gguf.yaml through the real Prefect flow: the GGUF teacher is prepared for two steps and
    saved de-quantised (safetensors), labels 48 MMLU-layout questions from that copy, and a from_teacher
    student (3 of its 30 layers) is distilled and evaluated."""
    import shutil

    from kdflow.flows.distill import distill
    from kdflow.config import load_config

    directory, gguf_file = smollm2
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "smollm2-gguf.yaml", [
        f"home={tmp_path / 'home'}", f"teacher.model={directory}", f"teacher.gguf_file={gguf_file}",
        f"data.sources=[{{path: {root / 'configs' / 'data' / 'mmlu-sample.jsonl'}, format: mmlu}}]",
        "training.pseudo_label_baseline=false",  # a second 3-layer student that tests nothing GGUF-specific
    ])
    run_id = distill(cfg)
    store = Store(cfg.home_dir, read_only=True)
    stages = {stage: status for stage, status, _s, _d in store.fetch("stage_timings", run_id=run_id)}
    assert set(stages.values()) == {"completed"} and "prepare_teacher" in stages, stages

    prepared = next((cfg.home_dir / "models").glob("teacher-*/final"))
    assert (prepared / "model.safetensors").is_file() and not list(prepared.glob("*.gguf"))
    ref = teacher_ref(cfg, store, run_dataset_ids(cfg, store))
    assert ref.model_dir == prepared and teacher_source(cfg, ref) == ModelSource(str(prepared))
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM soft_labels WHERE teacher_key = ?", [ref.key]).fetchone()[0] == 48
    student = next((cfg.home_dir / "models").glob("student-*/final"))
    config = json.loads((student / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "quantization_config" not in config
    assert (cfg.home_dir / "reports" / run_id / "report.html").is_file()
    shutil.rmtree(cfg.home_dir / "models")  # about 2.5 GB of weights, optimizer states and checkpoints
