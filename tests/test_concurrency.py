"""Several processes on one home: a held database, queued runs, dead runs, and cache keys that see content."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pytest
import torch

from helpers import labeling_world, worker_env
from kdflow.config import ArchitectureConfig, ScoringConfig, TeacherConfig, load_config
from kdflow.homelock import home_lock
from kdflow.label.labeling import teacher_spec
from kdflow.modeling import build_model, save_pretrained
from kdflow.runs import mark_crashed_runs
from kdflow.store import Store, StoreLocked

ROOT = Path(__file__).resolve().parent.parent
KDFLOW = [sys.executable, "-c", "from kdflow.cli import app; app(prog_name='kdflow')"]


def _holder(code: str) -> subprocess.Popen:
    """A Python process that runs `code` (which prints 'ready' when it holds what it holds) and then waits
    for its stdin to close."""
    script = textwrap.dedent(code) + "\nprint('ready', flush=True)\nsys.stdin.read()\n"
    proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + script], env=worker_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise AssertionError(proc.communicate()[1])
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()


def _hold_database(home: Path) -> subprocess.Popen:
    return _holder(f"import duckdb\ncon = duckdb.connect({str(home / 'kdflow.duckdb')!r})")


def test_a_briefly_held_database_is_waited_for(tmp_path):
    store = Store(tmp_path)
    holder = _hold_database(tmp_path)
    try:
        # The reader retries while the holder lives; releasing it lets the read through.
        threading.Timer(1.0, holder.stdin.close).start()
        assert store.fetch("list_runs", limit=5) == []
    finally:
        holder.wait(timeout=60)
        holder.stdout.close()
        holder.stderr.close()


def test_a_database_held_too_long_names_the_holder_in_one_line(tmp_path, monkeypatch):
    Store(tmp_path)
    holder = _hold_database(tmp_path)
    try:
        monkeypatch.setenv("KDFLOW_DB_LOCK_TIMEOUT", "0.3")
        with pytest.raises(StoreLocked, match=rf"kdflow.duckdb is held by process {holder.pid} \(.*python"):
            Store(tmp_path, read_only=True).fetch("list_runs", limit=5)
        env = {**worker_env(), "KDFLOW_HOME": str(tmp_path), "KDFLOW_DB_LOCK_TIMEOUT": "0.3"}
        for command in (["runs"], ["ingest", str(ROOT / "tests" / "fixtures" / "mmlu.csv")]):
            done = subprocess.run([*KDFLOW, *command], env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 2, (command, done.stdout, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
            assert str(tmp_path / "kdflow.duckdb") in lines[0] and f"process {holder.pid}" in lines[0], lines[0]
    finally:
        _release(holder)


def test_a_second_run_on_a_home_waits_and_says_for_which_run(tmp_path):
    holder = _holder(f"""
        from kdflow.homelock import home_lock
        lock = home_lock({str(tmp_path)!r}, run_id="nightly-1")
        lock.__enter__()
    """)
    said: list[str] = []

    def waiting(message: str) -> None:
        said.append(message)
        holder.stdin.close()  # the first run ends once the second is queued

    with home_lock(tmp_path, run_id="manual-2", on_wait=waiting, poll_s=0.2):
        pass
    holder.wait(timeout=60)
    assert len(said) == 1
    assert "run manual-2 is queued" in said[0] and f"run nightly-1 (process {holder.pid}" in said[0]
    assert "Ctrl-C" in said[0]


def test_runs_on_a_home_with_no_database_yet_is_an_empty_listing(tmp_path):
    """What `kdflow runs` says while the first run of a home is still starting."""
    done = subprocess.run([*KDFLOW, "runs"], env={**worker_env(), "KDFLOW_HOME": str(tmp_path / "new")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "no runs recorded" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "new").exists()


def test_a_queued_run_shows_as_queued_and_ctrl_c_cancels_it(tmp_path):
    from kdflow.runs import recorded_run

    holder = _holder(f"""
        from kdflow.homelock import home_lock
        lock = home_lock({str(tmp_path)!r}, run_id="nightly-1")
        lock.__enter__()
    """)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"home={tmp_path}"])
    store = Store(tmp_path)
    seen = []

    def interrupted(message: str) -> None:  # the user presses Ctrl-C while the run waits
        seen.append(store.fetch("list_runs", limit=5)[0][2])
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt), recorded_run(store, cfg, on_wait=interrupted):
            pytest.fail("a queued run ran")
    finally:
        _release(holder)
    assert seen == ["queued"]
    assert [(r[2], r[7]) for r in store.fetch("list_runs", limit=5)] == [("cancelled", None)], "no stage ran"


def test_a_killed_run_is_marked_crashed_and_its_stage_closed(tmp_path):
    runner = _holder(f"""
        from kdflow.config import load_config
        from kdflow.runs import recorded_run, stage
        from kdflow.store import Store
        cfg = load_config({str(ROOT / 'configs' / 'tiny.yaml')!r}, ["home={tmp_path}"])
        store = Store(cfg.home_dir)
        run = recorded_run(store, cfg)
        run_id = run.__enter__()
        in_stage = stage(store, run_id, "train")  # kept referenced: a collected one would end the stage
        in_stage.__enter__()
    """)
    store = Store(tmp_path)
    [(run_id, status)] = [(r[0], r[2]) for r in store.fetch("list_runs", limit=5)]
    assert status == "running"
    assert mark_crashed_runs(store) == [], "a live run is left alone"
    runner.send_signal(signal.SIGKILL)
    runner.wait(timeout=60)
    for stream in (runner.stdin, runner.stdout, runner.stderr):
        stream.close()

    done = subprocess.run([*KDFLOW, "runs"], env={**worker_env(), "KDFLOW_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "crashed" in done.stdout, done.stdout + done.stderr
    run = store.fetch_one("get_run", run_id=run_id)
    status, error = run[3], run[5]
    assert status == "crashed" and f"process {runner.pid}" in error
    assert store.fetch("stage_timings", run_id=run_id)[0][:2] == ("train", "crashed")


def test_labels_rewritten_in_place_are_validated_again(tmp_path):
    """The gate's verdict is keyed on the label values: corrupted values get a new (failing) verdict."""
    from kdflow.label.backends.hf import HFBackend
    from kdflow.validate.gate import run_gate
    from kdflow.label.labeling import label_questions
    from kdflow.modeling import load_pretrained

    world = labeling_world(tmp_path, 120)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"home={world['home']}"])
    store, key = world["store"], "t-test"

    def open_backend() -> HFBackend:
        model, tokenizer = load_pretrained(str(world["teacher"]), device="cpu")
        return HFBackend(model, tokenizer, ScoringConfig(mode="cloze"), batch_size=64, device="cpu")

    label_questions(store, open_backend, world["dataset_ids"], key)
    first = run_gate(cfg, store, world["dataset_ids"], key)
    assert first.success and not first.reused
    assert run_gate(cfg, store, world["dataset_ids"], key).reused, "the same labels reuse the verdict"

    with store.connect() as con:  # 20% of the labels now sum to 1.5
        con.execute("UPDATE soft_labels SET probs = list_transform(probs, lambda p: p * 1.5) "
                    "WHERE hash(question_id) % 5 = 0")
    again = run_gate(cfg, store, world["dataset_ids"], key)
    assert not again.reused and not again.success and again.validation_id != first.validation_id
    assert "sum" in again.message
    with store.connect() as con:  # a gold answer changed in place is also new content
        con.execute("UPDATE questions SET answer = (answer + 1) % len(options) WHERE hash(question_id) % 7 = 0")
    assert not run_gate(cfg, store, world["dataset_ids"], key).reused
    # Students are keyed on the verdict, so none trained on the old values is reused.
    from kdflow.train.students_run import student_id
    from kdflow.label.teacher import TeacherRef

    ref = TeacherRef(model_ref="t", model_dir=None, key=key, spec={})
    assert student_id(cfg, "student", ref, first.validation_id, seed=0) != \
        student_id(cfg, "student", ref, again.validation_id, seed=0)


def test_the_teacher_key_follows_the_weights_not_the_path(tmp_path):
    world = labeling_world(tmp_path, 100)
    teacher, scoring = TeacherConfig(model=str(world["teacher"])), ScoringConfig(mode="cloze")
    before = teacher_spec(teacher, scoring, str(world["teacher"]))
    assert teacher_spec(teacher, scoring, str(world["teacher"])) == before, "unchanged weights, same key"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(world["teacher"]))
    torch.manual_seed(1)  # other weights of the same shapes, copied into the same directory
    other = build_model(ArchitectureConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=512), tokenizer)
    save_pretrained(other, tokenizer, world["teacher"])
    after = teacher_spec(teacher, scoring, str(world["teacher"]))
    assert after["model"] == before["model"] and after["weights"] != before["weights"]


# End to end: `kdflow run` processes on one home, each with its temporary Prefect server.

STABLE_METRICS = ("accuracy", "retention", "agreement", "kl", "nll", "ece", "brier", "n")


def _serverless_env(home: Path) -> dict[str, str]:
    """A `kdflow` process without a Prefect server: it starts its own temporary one."""
    env = {k: v for k, v in worker_env().items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    return {**env, "KDFLOW_HOME": str(home)}


# The baseline students add training and evaluation time and nothing to what these tests check (resuming,
# queueing), which the distilled and untrained students show as well.
WITHOUT_BASELINES = ("training.hard_label_baseline=false", "training.pseudo_label_baseline=false")


def _kdflow_run(home: Path, *overrides: str) -> subprocess.Popen:
    sets = [a for o in (*WITHOUT_BASELINES, *overrides) for a in ("--set", o)]
    # A session of its own: a SIGKILL of the group takes the temporary Prefect server down with the run.
    return subprocess.Popen([*KDFLOW, "run", "-c", str(ROOT / "configs" / "tiny.yaml"), *sets],
                            env=_serverless_env(home), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(proc: subprocess.Popen) -> str:
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0 and "Traceback" not in output, output[-4000:]
    return output


def _outcome(home: Path) -> dict:
    """What a home's runs produced, by training.alpha: labels, student weights and the stable metrics."""
    from safetensors.torch import load_file

    store = Store(home, read_only=True)
    with store.connect() as con:
        labels = con.execute("SELECT question_id, probs FROM soft_labels ORDER BY question_id").fetchall()
        assert con.execute("SELECT count(*) FROM questions").fetchone() == (600,), "nothing ingested twice"
        runs = con.execute("SELECT run_id, config_json::JSON->'training'->>'alpha' FROM runs "
                           "WHERE status = 'completed' ORDER BY started_at").fetchall()
        by_alpha = {}
        for run_id, alpha in runs:
            metrics = con.execute(
                "SELECT m.model_role, m.category, m.name, m.value FROM metrics m JOIN evaluations e USING (eval_id) "
                "WHERE e.run_id = ? AND list_contains(?, m.name) ORDER BY ALL", [run_id, list(STABLE_METRICS)],
            ).fetchall()
            [spec] = con.execute("SELECT spec FROM evaluations WHERE run_id = ?", [run_id]).fetchone()
            models = json.loads(spec)["models"]
            by_alpha[alpha] = {"metrics": metrics, "students": {
                (role, seed): load_file(str(Path(path) / "model.safetensors"))
                for role, by_seed in sorted(models.items()) for seed, path in sorted(by_seed.items())}}
    return {"labels": labels, "runs": by_alpha}


def _assert_same(outcome: dict, reference: dict) -> None:
    assert [q for q, _ in outcome["labels"]] == [q for q, _ in reference["labels"]], "same labels, none twice"
    for (_, probs), (_, expected) in zip(outcome["labels"], reference["labels"]):
        assert probs == pytest.approx(expected, abs=1e-6)
    assert outcome["runs"].keys() == reference["runs"].keys()
    for alpha, run in outcome["runs"].items():
        expected = reference["runs"][alpha]
        assert [m[:3] for m in run["metrics"]] == [m[:3] for m in expected["metrics"]]
        assert [m[3] for m in run["metrics"]] == pytest.approx([m[3] for m in expected["metrics"]], abs=1e-6), alpha
        assert run["students"].keys() == expected["students"].keys()
        for role, weights in run["students"].items():
            for name, tensor in expected["students"][role].items():
                assert torch.allclose(weights[name], tensor, atol=1e-6), (alpha, role, name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Two uninterrupted runs started at once on two new homes, `a` (alpha 0.5) and `b` (alpha 0.7): the
    outcome the tests below compare with, and itself the case of two homes used at the same moment."""
    root = tmp_path_factory.mktemp("uninterrupted")
    started = {"a": _kdflow_run(root / "a"), "b": _kdflow_run(root / "b", "training.alpha=0.7")}
    outputs = {name: _finished(proc) for name, proc in started.items()}
    return {"root": root, "outputs": outputs, "a": _outcome(root / "a"), "b": _outcome(root / "b")}


@pytest.mark.slow  # two tiny runs at once, each starting a temporary Prefect server
def test_runs_on_two_homes_at_once_use_separate_prefect_databases(uninterrupted):
    for output in uninterrupted["outputs"].values():
        assert "database is locked" not in output
        assert "Failed to create the Prefect home" not in output  # the homes did not exist before the runs
    for name in ("a", "b"):
        home = uninterrupted["root"] / name
        assert (home / "prefect" / "prefect.db").is_file()
        assert [r[2] for r in Store(home, read_only=True).fetch("list_runs", limit=5)] == ["completed"]


@pytest.mark.slow  # two tiny runs on one home, each with its own temporary Prefect server
def test_two_runs_started_together_on_one_home_both_complete_like_separate_runs(tmp_path, uninterrupted):
    together = tmp_path / "together"
    first = _kdflow_run(together)
    time.sleep(1.0)
    second = _kdflow_run(together, "training.alpha=0.7")
    seen_running = False
    while not seen_running and (first.poll() is None or second.poll() is None):
        listed = subprocess.run([*KDFLOW, "runs"], env=_serverless_env(together),
                                capture_output=True, text=True, timeout=300)
        assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
        seen_running = "running" in listed.stdout
        time.sleep(0.5)  # each look is a process of its own: leave the cores to the runs
    outputs = _finished(first) + _finished(second)
    assert seen_running, "`kdflow runs` showed a run in progress"
    assert "is queued: home" in outputs, "one run said it waits for the other"

    outcome = _outcome(together)
    assert len(outcome["runs"]) == 2, outcome["runs"].keys()
    a, b = uninterrupted["a"], uninterrupted["b"]
    _assert_same(outcome, {"labels": a["labels"], "runs": {**a["runs"], **b["runs"]}})


# The stages whose killed run leaves work to resume: teacher checkpoints, some labels, student checkpoints,
# some evaluations. Kills as ingest and validate start (dropped for the suite's time) leave nothing to resume:
# ingest writes a dataset version in one transaction, and validate makes a stored verdict's missing
# calibration and suspect-gold scan again; test_a_killed_run_is_marked_crashed_and_its_stage_closed checks
# that such a run is marked crashed and its stage closed.
STAGES = ["prepare_teacher", "label", "train", "evaluate"]


def _stage_records(home: Path, stage: str) -> int | None:
    """How many runs have started `stage` so far; None while a run holds the file (one look, no waiting)."""
    if not (home / "kdflow.duckdb").exists():
        return 0
    try:
        with duckdb.connect(str(home / "kdflow.duckdb"), read_only=True) as con:
            return con.execute("SELECT count(*) FROM stage_runs WHERE stage = ?", [stage]).fetchone()[0]
    except duckdb.Error:
        return None


@pytest.mark.slow  # one run killed in each stage in turn, then one that finishes
def test_a_run_killed_in_each_stage_in_turn_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    """One home, a SIGKILL as each stage of STAGES starts (each re-run resumes what the killed one left), then a run
    that finishes: the same labels, student weights and metrics as an uninterrupted run, nothing twice."""
    home = tmp_path / "killed"
    for stage in STAGES:
        before = _stage_records(home, stage) or 0
        killed = _kdflow_run(home)
        while (_stage_records(home, stage) or before) <= before:
            assert killed.poll() is None, f"the run ended before {stage}: {killed.communicate()[0][-3000:]}"
            time.sleep(0.05)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=60)

    output = _finished(_kdflow_run(home))
    statuses = [r[2] for r in Store(home, read_only=True).fetch("list_runs", limit=10)]
    assert statuses == ["completed"] + ["crashed"] * len(STAGES), (statuses, output[-2000:])
    _assert_same(_outcome(home), uninterrupted["a"])
