from __future__ import annotations

import json
import multiprocessing
import os
import signal

import duckdb
import pyarrow as pa
import pytest
import torch
import toy_training as toy
from safetensors.torch import load_file
from toy_training import one_thread  # noqa: F401 (autouse fixture)
from transformers import GPT2Config, GPT2LMHeadModel

from kdflow.fitting.checkpoints import latest_checkpoint, load_checkpoint
from kdflow.config import ArchitectureConfig, LoraConfig, RunConfig, StudentConfig, TeacherConfig, TrainingConfig
from kdflow.errors import KdflowError, TransientError
from kdflow.label.preparation import prepare_teacher, prepared_teacher_id
from kdflow.label.teacher import TeacherRef
from kdflow.modeling import ModelSource, build_model, cpu_threads, load_pretrained, save_pretrained
from kdflow.scoring import encode, option_logits
from kdflow.train.initialisation import every_kth_layer, init_student
from kdflow.fitting.optim import build_optimizer, build_scheduler
from kdflow.fitting.recipe import TrainingCancelled, train
from kdflow.train.losses import distillation_objective
from kdflow.store import Store
from kdflow.train.students_run import find_students, role_examples, student_id, student_plan, train_students

RECIPE = TrainingConfig(alpha=0.5, max_steps=4, batch_size=8, learning_rate=1e-2, checkpoint_every=4)


@pytest.fixture(scope="module")
def tok():
    return toy.tokenizer()


@pytest.fixture(scope="module")
def examples():
    return toy.worker_examples()[0]


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    """A saved 4-layer model: the pretrained student base and the teacher of from_teacher students."""
    return save_pretrained(toy.fresh_model(tok, layers=4), tok, tmp_path_factory.mktemp("base"))


def _scores(model, tok, questions=None):
    model.eval()
    with torch.no_grad():
        return option_logits(model, encode(questions or toy.questions(8, seed=5), tok, toy.SCORING)).scores


def _train(model, tok, examples, out_dir, **kwargs):
    return train(model, tok, examples, RECIPE, toy.SCORING, objective=distillation_objective(RECIPE), out_dir=out_dir,
                 progress=False, **kwargs)


def test_fresh_student_follows_its_architecture(tok):
    arch = ArchitectureConfig(family="qwen3", hidden_size=16, num_layers=1, num_heads=2, vocab_size=512)
    model, same_tok = init_student(StudentConfig(init="fresh", architecture=arch, device="cpu"), tokenizer=tok)
    assert same_tok is tok
    assert model.config.model_type == "qwen3" and model.config.num_hidden_layers == 1
    assert model.get_input_embeddings().weight.shape == (len(tok), 16)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        init_student(StudentConfig(init="fresh"))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_from_teacher_keeps_every_kth_layer(family, tok):
    arch = ArchitectureConfig(family=family, hidden_size=32, num_layers=5, num_heads=4, num_kv_heads=2, vocab_size=512)
    torch.manual_seed(0)
    teacher = build_model(arch, tok)
    student = every_kth_layer(teacher, 2)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    if getattr(teacher.config, "layer_types", None) is not None:
        assert len(student.config.layer_types) == 3
    teacher_weights, student_weights = teacher.state_dict(), student.state_dict()
    for name, value in student_weights.items():
        source = name
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            source = name.replace(f"model.layers.{index}.", f"model.layers.{2 * index}.", 1)
        assert torch.equal(value, teacher_weights[source]), name
    assert student.get_input_embeddings().weight.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()


def test_from_teacher_student_trains_and_exports(tok, examples, base_dir, tmp_path):
    cfg = StudentConfig(init="from_teacher", layer_stride=3, device="cpu")
    model, student_tok = init_student(cfg, teacher=ModelSource(str(base_dir)))
    assert model.config.num_hidden_layers == 2  # layers 0 and 3 of 4
    result = _train(model, student_tok, examples, tmp_path)
    exported, _ = load_pretrained(str(result.final_dir), device="cpu")
    assert exported.config.num_hidden_layers == 2
    assert torch.allclose(_scores(exported, tok), _scores(model, tok), atol=1e-6)
    with pytest.raises(ValueError, match="teacher's weights"):
        init_student(cfg)


def test_from_teacher_needs_model_layers(tok, tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    save_pretrained(gpt2, tok, tmp_path)
    with pytest.raises(ValueError, match="model.layers"):
        init_student(StudentConfig(init="from_teacher", device="cpu"), teacher=ModelSource(str(tmp_path)))


def _lora_student(base_dir, merge: bool = True):
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"],
                      merge_on_export=merge)
    return init_student(StudentConfig(init="pretrained", model=str(base_dir), device="cpu", lora=lora), seed=1)


def test_lora_student_trains_adapters_only_and_exports_merged(tok, examples, base_dir, tmp_path):
    model, student_tok = _lora_student(base_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = _train(model, student_tok, examples, tmp_path)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)

    # The merged export scores like the adapter model that training left in the last checkpoint.
    adapter_model, _ = _lora_student(base_dir)
    optimizer = build_optimizer(adapter_model, RECIPE)
    load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"), adapter_model, optimizer,
                    build_scheduler(optimizer, RECIPE, 4))
    merged, _ = load_pretrained(str(result.final_dir), device="cpu")
    assert not any("lora" in name for name in load_file(str(result.final_dir / "model.safetensors")))
    base, _ = load_pretrained(str(base_dir), device="cpu")
    assert not torch.allclose(_scores(adapter_model, tok), _scores(base, tok), atol=1e-4)  # the adapter learned
    assert torch.allclose(_scores(merged, tok), _scores(adapter_model, tok), atol=1e-5)


def test_lora_adapter_export_loads_on_its_base_and_matches_the_merged_one(tok, examples, base_dir, tmp_path):
    merged_model, student_tok = _lora_student(base_dir, merge=True)
    merged = _train(merged_model, student_tok, examples, tmp_path / "merged")
    adapter_model, student_tok = _lora_student(base_dir, merge=False)
    adapter = _train(adapter_model, student_tok, examples, tmp_path / "adapter", merge_lora=False)

    assert (adapter.final_dir / "adapter_config.json").is_file()
    from_adapter, _ = load_pretrained(str(adapter.final_dir), device="cpu")
    from_merged, _ = load_pretrained(str(merged.final_dir), device="cpu")
    base, _ = load_pretrained(str(base_dir), device="cpu")
    assert not torch.allclose(_scores(from_adapter, tok), _scores(base, tok), atol=1e-4)
    assert torch.allclose(_scores(from_adapter, tok), _scores(from_merged, tok), atol=1e-5)


def test_lora_configuration_errors(tok, base_dir):
    with pytest.raises(ValueError, match="merge_on_export: false"):
        init_student(StudentConfig(init="fresh", lora=LoraConfig(enabled=True, merge_on_export=False)), tokenizer=tok)
    bad = LoraConfig(enabled=True, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="q_proj"):
        init_student(StudentConfig(init="pretrained", model=str(base_dir), device="cpu", lora=bad))


# ---------------------------------------------------------------- the train stage: roles, seeds, ids


TEACHER = TeacherRef("toy-teacher", None, "t-toy", {})
VALIDATION_ID = "v-toy"
UNLABELED = {"s1-q1", "s1-q4", "s1-q7", "s1-q10", "s1-q13", "s1-q16", "s1-q19", "s1-q22"}


def _stage_config(home, **training) -> RunConfig:
    arch = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 300, "max_position_embeddings": 128}
    return RunConfig.model_validate({
        "home": str(home), "scoring": {"mode": "cloze"},
        "student": {"init": "fresh", "device": "cpu", "architecture": arch},
        "training": {"max_steps": 2, "batch_size": 4, "eval_every": 100, "eval_questions": 4,
                     "checkpoint_every": 100, "soft_labels": "raw", "seeds": [0, 1], **training},
    })


def _stage_store(home, unlabeled: set[str]) -> tuple[Store, dict[str, int]]:
    """24 training questions (those in `unlabeled` with a NULL answer) with teacher labels that are right on
    every third question only, and 4 validation questions; returns the store and each question's
    teacher-predicted option."""
    store = Store(home)
    questions = [dict(q, split="train") for q in toy.questions(24, seed=1)]
    questions += [dict(q, split="val") for q in toy.questions(4, seed=2)]
    con = duckdb.connect(str(home / "kdflow.duckdb"))  # an unlabeled question's answer is NULL
    con.execute("ALTER TABLE questions ALTER COLUMN answer DROP NOT NULL")
    con.close()
    table = pa.table({
        "question_id": [q["question_id"] for q in questions], "dataset": ["toy"] * len(questions),
        "split": [q["split"] for q in questions], "category": [q["category"] for q in questions],
        "question": [q["question"] for q in questions], "options": [q["options"] for q in questions],
        "answer": pa.array([None if q["question_id"] in unlabeled else q["answer"] for q in questions], pa.int32()),
        "metadata": ["{}"] * len(questions), "question_hash": ["h-" + q["question_id"] for q in questions],
    })
    store.execute("insert_questions", table, dataset_id="toy@0")
    train = [q for q in questions if q["split"] == "train"]
    predicted = [q["answer"] if i % 3 == 0 else (q["answer"] + 1) % 4 for i, q in enumerate(train)]
    store.execute("insert_labels", pa.table({
        "question_id": [q["question_id"] for q in train], "teacher_key": [TEACHER.key] * len(train),
        "question_hash": ["h-" + q["question_id"] for q in train],
        "probs": [[0.7 if k == p else 0.1 for k in range(4)] for p in predicted],
        "confidence": [0.7] * len(train), "predicted": predicted,
    }))
    return store, {q["question_id"]: p for q, p in zip(train, predicted)}


def _train_stage(home, store, **training):
    return train_students(_stage_config(home, **training), store, ["toy@0"], TEACHER, VALIDATION_ID, progress=False)


def test_every_seed_trains_each_role_and_a_change_retrains_only_what_it_changes(tmp_path):
    store, _ = _stage_store(tmp_path, UNLABELED)
    trained = _train_stage(tmp_path, store)
    assert {role: list(by_seed) for role, by_seed in trained.dirs.items()} == {
        "student_init": [0], "student": [0, 1], "student_hard": [0, 1], "student_pseudo": [0, 1]}
    assert trained.reused == [] and (trained.n_questions, trained.n_labeled) == (24, 16)
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"), read_only=True)
    models = con.execute("SELECT role, seed, spec, (SELECT count(*) FROM training_metrics t WHERE t.model_id = "
                         "m.model_id) FROM models m ORDER BY role, seed").fetchall()
    con.close()
    # student_hard learns from the 16 labeled questions alone, in as many optimizer steps as the others.
    assert [(role, seed, json.loads(spec)["n_train_questions"], steps) for role, seed, spec, steps in models] == [
        ("student", 0, 24, 2), ("student", 1, 24, 2), ("student_hard", 0, 16, 2), ("student_hard", 1, 16, 2),
        ("student_init", 0, None, 0), ("student_pseudo", 0, 24, 2), ("student_pseudo", 1, 24, 2)]

    # alpha changes the distilled students only; the hard-label ones and the untrained one are reused.
    changed = _train_stage(tmp_path, store, alpha=0.8)
    assert sorted(changed.reused) == [("student_hard", 0), ("student_hard", 1), ("student_init", 0),
                                      ("student_pseudo", 0), ("student_pseudo", 1)]
    assert changed.dirs["student"][0] != trained.dirs["student"][0]
    # A seed added to the list trains that seed's students alone.
    more = _train_stage(tmp_path, store, alpha=0.8, seeds=[0, 1, 2])
    assert sorted({seed for _, seed in more.reused}) == [0, 1] and len(more.reused) == 7
    assert list(more.dirs["student_hard"]) == [0, 1, 2]
    found = find_students(_stage_config(tmp_path, alpha=0.8, seeds=[0, 1, 2]), store, TEACHER, VALIDATION_ID)
    assert found == more.dirs
    with pytest.raises(KdflowError, match=r"seed\(s\) \[5\]"):
        find_students(_stage_config(tmp_path, seeds=[0, 5]), store, TEACHER, VALIDATION_ID)


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(next(model_dir.glob("*.safetensors"))))


def _metric_rows(home) -> list[tuple]:
    con = duckdb.connect(str(home / "kdflow.duckdb"), read_only=True)
    rows = con.execute("SELECT m.role, m.seed, t.step, t.loss, m.status FROM training_metrics t JOIN models m "
                       "USING (model_id) ORDER BY m.role, m.seed, t.step").fetchall()
    con.close()
    return rows


def test_students_trained_at_once_are_the_students_trained_one_by_one(tmp_path):
    # Each student of the parallel stage trains in a worker process (one CPU thread each, as here), its
    # metrics relayed to the same store; stopped together after their first step and resumed, they end with
    # the same weights and the same metric rows as students trained in turn, uninterrupted.
    one_by_one, at_once = tmp_path / "one", tmp_path / "at-once"
    trained = {}
    for home, parallel in ((one_by_one, 1), (at_once, 2)):
        store, _ = _stage_store(home, UNLABELED)
        if parallel > 1:  # stopped after their first step, then resumed from their checkpoints
            with pytest.raises(TrainingCancelled):
                train_students(_stage_config(home, parallel_students=parallel), store, ["toy@0"], TEACHER,
                               VALIDATION_ID, progress=False, should_stop=lambda: True)
            # The two running students stopped after their first step; the four waiting ones never started.
            assert len(list(home.glob("models/*/checkpoints/step-1"))) == 2
        trained[parallel] = _train_stage(home, store, parallel_students=parallel)
    assert trained[2].dirs.keys() == trained[1].dirs.keys()
    for role, by_seed in trained[1].dirs.items():
        for seed, model_dir in by_seed.items():
            assert trained[2].dirs[role][seed].is_relative_to(at_once)
            for name, tensor in _weights(model_dir).items():
                torch.testing.assert_close(_weights(trained[2].dirs[role][seed])[name], tensor, rtol=0, atol=0,
                                           msg=lambda m: f"{role} {seed} {name}: {m}")
    assert _metric_rows(at_once) == _metric_rows(one_by_one) and len(_metric_rows(at_once)) == 12
    assert not list(at_once.glob("models/*/launch"))  # each worker's contract folder is removed


def test_a_killed_worker_process_fails_the_stage_with_a_retryable_error(tmp_path):
    # SIGKILL of one worker (as the OOM killer does) breaks the pool: the stage must raise TransientError, which
    # orchestration retries, not hang or report the students as trained.
    store, _ = _stage_store(tmp_path, UNLABELED)
    cfg = _stage_config(tmp_path, parallel_students=2, max_steps=2000, seeds=[0])
    killed = []

    def kill_a_worker(done: int, total: int) -> None:
        if done > 0 and not killed:
            killed.append(multiprocessing.active_children()[0].pid)
            os.kill(killed[0], signal.SIGKILL)

    with pytest.raises(TransientError, match="lost"):
        train_students(cfg, store, ["toy@0"], TEACHER, VALIDATION_ID, progress=False, on_progress=kill_a_worker)
    assert killed and not multiprocessing.active_children()
    con = duckdb.connect(str(tmp_path / "kdflow.duckdb"), read_only=True)
    statuses = dict(con.execute("SELECT status, count(*) FROM models WHERE role != 'student_init' GROUP BY 1")
                    .fetchall())
    con.close()
    # A student the broken pool stopped is recorded as training, so a retry resumes it (one that finished
    # before the kill stays completed and is reused).
    assert statuses.get("training", 0) >= 1


def test_students_trained_at_once_need_one_process_each():
    with pytest.raises(ValueError, match=r"parallel_students \(2\).*num_processes \(2\).*choose one"):
        TrainingConfig(parallel_students=2, num_processes=2)


def test_a_hard_label_student_needs_labeled_questions(tmp_path):
    store, _ = _stage_store(tmp_path, {q["question_id"] for q in toy.questions(24, seed=1)})
    with pytest.raises(KdflowError, match="none of the 24 training questions has a gold answer"):
        _train_stage(tmp_path, store)


def test_teacher_preparation_learns_from_the_labeled_questions_only(tmp_path):
    store, _ = _stage_store(tmp_path, UNLABELED)
    cfg = _stage_config(tmp_path).model_copy(update={"teacher": TeacherConfig(
        architecture=ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2, vocab_size=300),
        prepare={"enabled": True, "epochs": 1, "batch_size": 8})})
    # The preparation is trained with alpha = 1, which refuses a question without a gold answer.
    model_dir, reused = prepare_teacher(cfg, store, ["toy@0"], progress=False)
    assert not reused and (model_dir / "config.json").is_file()


def test_teacher_preparation_runs_on_its_cpu_threads_and_they_change_no_weight(tmp_path, monkeypatch):
    import kdflow.fitting.recipe

    def prepared(name: str, cpu_threads: int | None):
        home = tmp_path / name
        home.mkdir()
        store, _ = _stage_store(home, set())
        cfg = _stage_config(home).model_copy(update={"teacher": TeacherConfig(
            architecture=ArchitectureConfig(hidden_size=32, num_layers=1, num_heads=2, vocab_size=300),
            prepare={"enabled": True, "epochs": 1, "batch_size": 8, "cpu_threads": cpu_threads})})
        model_dir, _ = prepare_teacher(cfg, store, ["toy@0"], progress=False)
        return prepared_teacher_id(cfg, ["toy@0"]), load_file(str(model_dir / "model.safetensors"))

    seen = []
    real_train = kdflow.fitting.recipe.train

    def observed_train(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(kdflow.fitting.recipe, "train", observed_train)
    with cpu_threads(2):
        two_id, two = prepared("default", None)
        one_id, one = prepared("one", 1)
        assert seen == [2, 1] and torch.get_num_threads() == 2  # set for the preparation, then restored
    assert one_id == two_id and all(torch.equal(one[name], two[name]) for name in two)


def test_the_prepared_teachers_id_follows_the_content_of_its_own_questions(tmp_path):
    from kdflow.config import SourceConfig

    corpus = tmp_path / "teacher.jsonl"

    def teacher_id(answer: str) -> str:
        row = {"question": "Which is a colour?", "options": ["red", "tin"], "answer": answer}
        corpus.write_text(json.dumps(row) + "\n")
        cfg = _stage_config(tmp_path).model_copy(update={"teacher": TeacherConfig(
            architecture=ArchitectureConfig(hidden_size=16, num_layers=1, num_heads=2, vocab_size=300),
            prepare={"enabled": True, "source": SourceConfig(path=str(corpus))})})
        return prepared_teacher_id(cfg, ["toy@0"])

    # Same settings, an edited file: another teacher, never the one prepared on the old questions.
    assert teacher_id("A") == teacher_id("A") != teacher_id("B")
    corpus.unlink()
    with pytest.raises(KdflowError, match=r"teacher.prepare.source: .*teacher.jsonl"):
        prepared_teacher_id(_stage_config(tmp_path).model_copy(update={"teacher": TeacherConfig(
            prepare={"enabled": True, "source": SourceConfig(path=str(corpus))})}), ["toy@0"])


def test_each_role_learns_its_own_target():
    examples = [{"question_id": "a", "answer": 2, "probs": [0.1, 0.6, 0.3], "predicted": 1},
                {"question_id": "b", "answer": None, "probs": [0.2, 0.2, 0.6], "predicted": None},
                {"question_id": "c", "answer": 0, "probs": [0.5, 0.5, 0.0], "predicted": None}]
    assert role_examples(examples, "student") == examples
    # A CE-only distilled student (alpha = 1, a sweep point) has nothing to learn from unlabeled questions.
    assert role_examples(examples, "student", alpha=1.0) == [examples[0], examples[2]]
    assert role_examples(examples, "student_hard") == [dict(examples[0], probs=None), dict(examples[2], probs=None)]
    # The teacher's argmax: the stored `predicted`, else the first largest probability.
    assert [e["answer"] for e in role_examples(examples, "student_pseudo")] == [1, 2, 0]
    assert all(e["probs"] is None for e in role_examples(examples, "student_pseudo"))


def test_student_ids_hold_the_seed_and_what_the_role_learns_from(tmp_path):
    cfg = _stage_config(tmp_path)
    other = _stage_config(tmp_path, alpha=0.9, temperature=3.0, divergence="jsd", soft_labels="calibrated")

    def ids(config, seed):
        return {role: student_id(config, role, TEACHER, VALIDATION_ID, seed=seed) for role, _ in student_plan(config)}

    assert all(model_id.startswith(role + "-") for role, model_id in ids(cfg, 0).items())
    assert set(ids(cfg, 0).values()).isdisjoint(ids(cfg, 1).values())
    changed = {role for role, model_id in ids(other, 0).items() if model_id != ids(cfg, 0)[role]}
    assert changed == {"student"}  # the KD settings touch nothing the alpha = 1 students learn
    assert student_plan(_stage_config(tmp_path, hard_label_baseline=False, pseudo_label_baseline=False)) == [
        ("student_init", 0), ("student", 0), ("student", 1)]
    assert ids(_stage_config(tmp_path, seeds=[1, 0]), 1)["student_init"] != ids(cfg, 0)["student_init"]
