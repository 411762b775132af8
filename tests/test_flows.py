"""The Prefect flows on the tiny config: end to end, reuse, retries, the gate, relabeling, deployments."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdflow.config import load_config
from kdflow.errors import GateFailed
from kdflow.store import Store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("prefect_harness")


def tiny(home: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [f"home={home}", *overrides])


def stages(store: Store, run_id: str) -> dict[str, str]:
    return {stage: status for stage, status, _s, _d in store.fetch("stage_timings", run_id=run_id)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One full run of the main flow, shared by the tests that build on its teacher and labels."""
    from kdflow.flows.distill import distill

    home = tmp_path_factory.mktemp("home")
    run_id = distill(tiny(home))
    return home, run_id


@pytest.mark.slow
def test_main_flow_runs_end_to_end_and_records_everything(first_run):
    home, run_id = first_run
    store = Store(home, read_only=True)
    run = store.fetch_one("get_run", run_id=run_id)
    assert run[3] == "completed" and run[6], "run completed and linked to its Prefect flow run"
    assert stages(store, run_id) == {
        "ingest": "completed", "prepare_teacher": "completed", "label_sample": "completed", "label": "completed",
        "validate": "completed", "train": "completed", "evaluate": "completed", "report": "completed",
    }
    assert (home / "reports" / run_id / "report.html").exists()


@pytest.mark.slow
def test_second_run_reuses_teacher_labels_validation_and_students(first_run):
    from kdflow.flows.distill import distill

    home, _ = first_run
    run_id = distill(tiny(home))
    seen = stages(Store(home, read_only=True), run_id)
    for stage in ("ingest", "prepare_teacher", "label", "validate", "train"):
        assert seen[stage] == "reused", (stage, seen)


@pytest.mark.slow
def test_transient_labeling_failure_is_retried(first_run, monkeypatch):
    """A backend that fails once (a lost server) is retried by Prefect and the labels complete."""
    import kdflow.label.teacher as teacher_module
    from kdflow.flows.stage_flows import label_flow

    home, _ = first_run
    real_open = teacher_module.open_backend
    calls = []

    def flaky_open(cfg, ref):
        calls.append(ref.key)
        if len(calls) == 1:
            raise ConnectionError("teacher server went away")
        return real_open(cfg, ref)

    monkeypatch.setattr(teacher_module, "open_backend", flaky_open)
    cfg = tiny(home, "scoring.cloze_template=Q {question} A:")
    key = label_flow(cfg)
    # The fail-fast sample's task fails and is retried with a fresh backend, which the task labeling the
    # rest reuses (the label stage holds the teacher open): two loads, not three.
    assert len(calls) == 2
    with Store(home).connect() as con:
        labeled = con.execute("SELECT count(*) FROM soft_labels WHERE teacher_key = ?", [key]).fetchone()[0]
    assert labeled == 600


@pytest.mark.slow
def test_changed_prompt_relabels_and_unchanged_does_not(first_run):
    from kdflow.flows.stage_flows import label_flow

    home, _ = first_run
    store = Store(home)
    with store.connect() as con:
        total_before = con.execute("SELECT count(*) FROM soft_labels").fetchone()[0]
    unchanged = label_flow(tiny(home))
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM soft_labels").fetchone()[0] == total_before
    changed = label_flow(tiny(home, "scoring.cloze_template=Which answer to {question} Answer:"))
    assert changed != unchanged
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM soft_labels").fetchone()[0] == total_before + 600


@pytest.mark.slow
def test_failed_gate_stops_the_flow_before_training(first_run):
    from kdflow.flows.distill import distill

    home, _ = first_run
    with pytest.raises(GateFailed, match="teacher_accuracy"):
        distill(tiny(home, "validation.min_teacher_accuracy=0.999", "name=gated"))
    store = Store(home, read_only=True)
    run_id, status, stage = next(
        (r[0], r[2], r[3]) for r in store.fetch("list_runs", limit=50) if r[1] == "gated"
    )
    assert (status, stage) == ("failed", "validate")
    assert "train" not in stages(store, run_id)


@pytest.mark.slow
def test_deployments_register_with_schedules_and_run_through_a_process_worker(first_run, tmp_path):
    """`prefect deploy --all` registers every deployment; a process worker runs one to completion."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    home, _ = first_run
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "KDFLOW_PROJECT_DIR": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "KDFLOW_HOME": str(home)}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "kdflow-process", "--type", "process"],
                   env=env, cwd=ROOT, check=False, capture_output=True, timeout=120)
    deploy = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "deployments" / "prefect.yaml")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    async def registered():
        async with get_client() as client:
            return await client.read_deployments()

    import asyncio

    deployments = {d.name: d for d in asyncio.run(registered())}
    assert {"demo-nightly", "demo-ingest", "demo-label", "demo-validate", "demo-train", "demo-evaluate"} <= set(
        deployments
    )
    nightly = deployments["demo-nightly"]
    assert nightly.schedules and nightly.schedules[0].schedule.cron == "0 2 * * *"
    assert not deployments["demo-train"].schedules

    from prefect.deployments import run_deployment

    tiny_params = {"cfg": tiny(home).model_dump(mode="json")}
    flow_run = run_deployment("ingest/demo-ingest", parameters=tiny_params, timeout=0)
    worker = subprocess.run(
        [*prefect, "worker", "start", "--pool", "kdflow-process", "--run-once"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )

    async def final_state():
        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state

    state = asyncio.run(final_state())
    assert state.is_completed(), worker.stdout[-3000:] + worker.stderr[-3000:]
    shutil.rmtree(tmp_path, ignore_errors=True)


class _Records(logging.Handler):
    """Collects Prefect's flow and task run log records as the UI receives them (after the loggers' filters)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _Records:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).removeHandler(self)


@pytest.mark.slow
def test_cli_run_logs_each_stage_and_ends_with_run_id_report_and_ui_link(first_run):
    from typer.testing import CliRunner

    from kdflow.cli import app

    home, _ = first_run
    with _Records() as logs:
        result = CliRunner().invoke(app, ["run", "-c", str(ROOT / "configs" / "tiny.yaml"), "--set", f"home={home}"])
    assert result.exit_code == 0, result.output
    # stdout alone: a Prefect handler of an earlier in-process invocation may write errors to stderr.
    tail = result.stdout.strip().splitlines()
    run_id = tail[-3].removeprefix("run id: ")
    assert tail[-2] == f"report: {home / 'reports' / run_id / 'report.html'}"
    assert (home / "reports" / run_id / "report.html").exists()
    flow_run_id = Store(home, read_only=True).fetch("get_run", run_id=run_id)[0][6]
    assert tail[-1].startswith("Prefect UI: http") and tail[-1].endswith(f"/runs/flow-run/{flow_run_id}")
    said = "\n".join(r.getMessage() for r in logs.records)
    for line in ("ingested demo@", "(unchanged, reused)", "0 new labels", "nothing left to label",
                 "data-quality gate passed", "students: ", " reused at ", "evaluated teacher, ",
                 f"report: {home / 'reports' / run_id / 'report.html'}"):
        assert line in said, (line, said)


@pytest.mark.slow
def test_a_failed_gate_is_logged_once_without_traceback(first_run):
    from typer.testing import CliRunner

    from kdflow.cli import app

    home, _ = first_run
    with _Records() as logs:
        result = CliRunner().invoke(app, ["validate", "-c", str(ROOT / "configs" / "tiny.yaml"), "--set", f"home={home}",
                                          "--set", "validation.min_teacher_accuracy=0.999"])
    assert result.exit_code == 3 and "the data-quality gate failed" in result.output
    failed = [r for r in logs.records if "the data-quality gate failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is None, [r.getMessage() for r in failed]
    assert failed[0].getMessage().startswith("GateFailed: the data-quality gate failed")
    states = [r.getMessage() for r in logs.records if r.getMessage().startswith("Finished in state Failed")]
    assert states and all(s.endswith("(GateFailed, logged above)") for s in states), states


@pytest.mark.slow
def test_a_deployment_run_and_a_manual_run_at_once_on_one_home_both_complete(first_run, tmp_path):
    """The nightly deployment on a process worker and a manual `kdflow run`, started together on one home:
    they queue on the home's global concurrency limit and both complete."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from kdflow.flows.runlock import home_limit_name

    home, _ = first_run
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "KDFLOW_PROJECT_DIR": str(ROOT),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "KDFLOW_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "kdflow-process", "--type", "process"],
                   env=env, cwd=ROOT, check=False, capture_output=True, timeout=120)
    deploy = subprocess.run(
        [*prefect, "--no-prompt", "deploy", "--name", "demo-nightly", "--prefect-file",
         str(ROOT / "deployments" / "prefect.yaml")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    cfg = tiny(home, "training.alpha=0.6")  # new students: both runs have real work to do
    nightly = run_deployment("distill/demo-nightly", parameters={"cfg": cfg.model_dump(mode="json")}, timeout=0)
    worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "kdflow-process", "--run-once"],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manual = subprocess.run(
        [sys.executable, "-c", "from kdflow.cli import app; app(prog_name='kdflow')", "run", "-c",
         str(ROOT / "configs" / "tiny.yaml"), "--set", "training.alpha=0.6"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    worker_log = worker.communicate(timeout=900)[0]
    assert manual.returncode == 0, manual.stdout[-3000:] + manual.stderr[-3000:]

    async def server_side():
        async with get_client() as client:
            state = (await client.read_flow_run(nightly.id)).state
            limit = await client.read_global_concurrency_limit_by_name(home_limit_name(home))
            return state, limit

    state, limit = asyncio.run(server_side())
    assert state.is_completed(), worker_log[-4000:]
    assert limit.limit == 1 and limit.active_slots == 0, "the home's limit was used and released"
    store = Store(home, read_only=True)
    flow_runs = {r[8]: r[2] for r in store.fetch("list_runs", limit=50)}
    assert flow_runs.get(str(nightly.id)) == "completed"
    assert sum(1 for r in store.fetch("list_runs", limit=50) if r[2] == "completed") >= 3
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_bad_input_in_a_deployment_run_is_logged_once_without_traceback(tmp_path):
    """A flow run started from a deployment runs in a `python -m prefect.engine` process (what a process
    worker, `kdflow serve` and the UI's "Run" start): an expected failure is logged there once too, as its
    message, in the process's output and in the logs the UI shows."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from kdflow.config import SourceConfig
    from kdflow.flows.stage_flows import ingest_flow

    cfg = tiny(tmp_path / "home")
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "missing.jsonl"))]
    ingest_flow.to_deployment(name="bad-input").apply()
    flow_run = run_deployment("ingest/bad-input", parameters={"cfg": cfg.model_dump(mode="json")}, timeout=0)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT__FLOW_RUN_ID": str(flow_run.id),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    engine = subprocess.run([sys.executable, "-m", "prefect.engine"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    output = engine.stdout + engine.stderr

    async def state_and_logs():
        async with get_client() as client:
            state = (await client.read_flow_run(flow_run.id)).state
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            return state, [log.message for log in logs]

    state, logs = asyncio.run(state_and_logs())
    assert state.is_failed(), output[-3000:]
    said = "missing.jsonl does not exist"
    assert sum(said in m for m in logs) == 1, "\n".join(logs)
    assert [m for m in logs if said in m][0].startswith("IngestError: source file ")
    assert not [m for m in logs if "Traceback" in m], logs
    assert output.count(said) == 1 and "Traceback" not in output, output[-5000:]


def _artifacts(flow_run_id: str) -> dict[str, str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a.data for a in asyncio.run(read()) if a.key}


@pytest.mark.slow
def test_artifacts_show_report_and_data_docs_paths_and_link_them_over_http_when_served(first_run):
    """No file:// link (a browser opens none from the http UI): the paths as text, and http links through
    the home's file server while it runs (`kdflow ui` starts it)."""
    import threading

    import httpx

    from kdflow.fileserver import make_server
    from kdflow.flows.stage_flows import validate_flow

    home, run_id = first_run
    store = Store(home, read_only=True)
    artifacts = _artifacts(store.fetch("get_run", run_id=run_id)[0][6])
    report = home / "reports" / run_id / "report.html"
    assert f"```\n{report}\n```" in artifacts["distillation-report"]
    docs = Path(re.search(r"```\n(.+)\n```", artifacts["data-docs"])[1])
    assert docs.is_file() and docs.name == "index.html" and docs.is_relative_to(home / "data_docs")
    assert not [key for key, text in artifacts.items() if "file://" in str(text)]

    server = make_server(home, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        validate_flow(tiny(home))  # the verdict is reused; its artifact is written again
        runs = Store(home, read_only=True).fetch("list_runs", limit=1)
        text = _artifacts(Store(home, read_only=True).fetch("get_run", run_id=runs[0][0])[0][6])["data-docs"]
        url = f"http://127.0.0.1:{server.server_address[1]}/data_docs/"
        assert url in text and "file://" not in text
        assert Path(re.search(r"```\n(.+)\n```", text)[1]).is_relative_to(home / "data_docs")
        link = text[text.index(url):].split(")", 1)[0]
        assert httpx.get(link, timeout=10).status_code == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_home_limit_created_by_another_run_at_the_same_moment_is_used(monkeypatch):
    """Two runs creating the home's limit at once: the server answers the second insert with a 500 (its
    UNIQUE constraint), not a 409; the run goes on with the limit the other one made. With no limit there,
    the server's error still surfaces."""
    import httpx
    from prefect.client.orchestration import SyncPrefectClient, get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    from kdflow.flows import runlock

    name = runlock.home_limit_name(Path("/tmp/kdflow-race-home"))
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))  # the other run

    def lost_the_race(self, concurrency_limit):
        request = httpx.Request("POST", "http://prefect/v2/concurrency_limits/")
        raise httpx.HTTPStatusError("500 Internal Server Error", request=request,
                                    response=httpx.Response(500, request=request))

    monkeypatch.setattr(SyncPrefectClient, "create_global_concurrency_limit", lost_the_race)
    runlock._ensure_limit(name)
    with pytest.raises(ObjectNotFound):
        runlock._ensure_limit(runlock.home_limit_name(Path("/tmp/kdflow-no-such-home")))


@pytest.mark.slow
def test_route_reads_questions_as_ingest_does_and_sums_up_skipped_rows(first_run, tmp_path):
    """`kdflow route FILE` reads any layout `kdflow ingest` reads, without an answer column: an MMLU file
    with `choices` is answered row by row, and unusable rows are one summary line, not a line per row."""
    import json

    from typer.testing import CliRunner

    from kdflow.cli import app

    home, _ = first_run
    rows = [{"question": f"What is the capital of Toshiland {i}?", "choices": ["Danen", "Thafar", "Brotum"],
             "subject": "geography"} for i in range(40)]
    rows += [{"question": "Too few options?", "choices": ["Danen"], "subject": "geography"}] * 30
    questions = tmp_path / "mmlu.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["route", str(questions), "-c", str(ROOT / "configs" / "tiny.yaml"),
                                      "--set", f"home={home}"])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stdout.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "30 of 70 rows" in skipped[0] and "too_few_options" in skipped[0], skipped
    answered = [line for line in result.stdout.splitlines() if re.match(r"^\W*\d+\W", line)]
    assert len(answered) == 40, result.stdout
    # A CSV of a question and option columns, no answer column: found without --format.
    csv_file = tmp_path / "pool.csv"
    csv_file.write_text("question,A,B,C\n" + "".join(f"What is the capital of Toshiland {i}?,Danen,Thafar,Brotum\n"
                                                     for i in range(5)))
    result = CliRunner().invoke(app, ["route", str(csv_file), "-c", str(ROOT / "configs" / "tiny.yaml"),
                                      "--set", f"home={home}"])
    assert result.exit_code == 0, result.output
    assert len([line for line in result.stdout.splitlines() if re.match(r"^\W*\d+\W", line)]) == 5, result.stdout

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "no question column", "opts": ["a", "b"]}\n')
    result = CliRunner().invoke(app, ["route", str(broken), "-c", str(ROOT / "configs" / "tiny.yaml"),
                                      "--set", f"home={home}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot detect the layout" in result.output and "--format" in result.output, result.output
