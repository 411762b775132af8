"""Several processes on one home: a held database, queued runs, dead runs, and cache keys that see content."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import labeling_world, worker_env
from kdflow.config import ArchitectureConfig, ScoringConfig, TeacherConfig, load_config
from kdflow.homelock import home_lock
from kdflow.labeling import teacher_spec
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
        import threading

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
    runner.stdin.close(), runner.stdout.close(), runner.stderr.close()

    done = subprocess.run([*KDFLOW, "runs"], env={**worker_env(), "KDFLOW_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "crashed" in done.stdout, done.stdout + done.stderr
    _, _, _, status, _, error, *_ = (run_id, *store.fetch_one("get_run", run_id=run_id)[1:])
    assert status == "crashed" and f"process {runner.pid}" in error
    assert store.fetch("stage_timings", run_id=run_id)[0][:2] == ("train", "crashed")


def test_labels_rewritten_in_place_are_validated_again(tmp_path):
    """The gate's verdict is keyed on the label values: corrupted values get a new (failing) verdict."""
    from kdflow.backends.hf import HFBackend
    from kdflow.gate import run_gate
    from kdflow.labeling import label_questions
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
