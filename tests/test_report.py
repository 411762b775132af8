"""The report is rebuilt from DuckDB alone: evaluation and report each run in their own process here."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from markupsafe import escape
from rich.console import Console

from kdflow.report.formatting import md_text
from kdflow.report.run_data import ReportError, load_summary
from kdflow.report.run_report import build_report, report_dir
from kdflow.report.run_summary import print_summary
from kdflow.report.seeds import verdict_sentence
from kdflow.runs import stage
from kdflow.store import Store
from test_evaluation import ODD_CATEGORY, RUN_NAME, seed_store

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")

EVALUATE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_evaluation import Seeded, run_evaluation
seeded = json.loads(sys.argv[1])
models = {role: {int(seed): Path(path) for seed, path in by_seed.items()} for role, by_seed in seeded["models"].items()}
run_evaluation(Seeded(Path(seeded["home"]), seeded["run_id"], models, Path(seeded["teacher_dir"])))
"""
REPORT = """
import sys
from kdflow.report.run_report import build_report
from kdflow.store import Store
sys.stdout.write(str(build_report(Store(sys.argv[1], read_only=True), sys.argv[2]).html))
"""


def _python(code: str, *args: str) -> str:
    # One thread: the tiny models are quickest that way, and a busy machine does not stall the test.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions):
    """(home, run_id, html path): evaluated by one process, reported by another, both exited."""
    home = tmp_path_factory.mktemp("home")
    seeded = seed_store(home, tiny_model, tiny_tokenizer, tiny_arch, tiny_questions)
    arguments = json.dumps({"home": str(home), "run_id": seeded.run_id,
                            "models": {role: {seed: str(path) for seed, path in by_seed.items()}
                                       for role, by_seed in seeded.models.items()},
                            "teacher_dir": str(seeded.teacher_dir)})
    with stage(Store(home), seeded.run_id, "evaluate"):
        _python(EVALUATE, arguments, str(ROOT / "tests"))
    html_path = Path(_python(REPORT, str(home), seeded.run_id))
    return home, seeded.run_id, html_path


def test_report_is_built_in_a_new_process_from_the_database(built):
    home, run_id, html_path = built
    assert html_path == report_dir(Store(home), run_id) / "report.html"
    assert html_path.parent.parent == home / "reports"
    page = html_path.read_text(encoding="utf-8")
    # trade-off, all models, students over seeds (accuracies, per-seed tests), against the untrained student,
    # paired tests, categories, cascade, validation accuracy (two points: a table, not a plot), stages
    assert page.count("<table>") == 10
    for heading in ("Teacher vs distilled student", "Students over seeds", "Against the untrained student",
                    "Accuracy per category",
                    "Calibration", "Cascade", "Training", "Validation accuracy during training"):
        assert heading in page
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', page)
    assert [alt for alt, _ in images] == ["accuracy per category", "reliability diagrams",
                                         "cascade accuracy on test against latency", "training loss"]
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)
    assert "student (hard labels only)" in page and "<td>evaluate</td><td>completed</td>" in page
    assert '<tr class="chosen">' in page
    # An evaluation that names no gate verdict: a Data section that says so, and no clean accuracy column.
    assert '<h2 id="data">Data</h2>' in page and "does not record the gate verdict" in page
    assert "without suspect gold" not in page
    assert json.loads((html_path.parent / "summary.json").read_text(encoding="utf-8"))["run_id"] == run_id


def test_user_text_is_escaped_everywhere(built):
    _, _, html_path = built
    page = html_path.read_text(encoding="utf-8")
    assert ODD_CATEGORY not in page and RUN_NAME not in page
    assert "&lt;b&gt;Tom &amp; &#34;Jerry&#34;&lt;/b&gt; | $x$" in page  # jinja2's entity for a double quote
    assert "kdflow report: T&amp;C &lt;run&gt;" in page
    markdown = (html_path.parent / "summary.md").read_text(encoding="utf-8")
    assert "| &lt;b&gt;Tom &amp; &quot;Jerry&quot;&lt;/b&gt; \\| $x$ |" in markdown


def test_script_in_a_category_name_is_escaped_in_the_page(built):
    from kdflow.report.run_data import load_report_data, summarize
    from kdflow.report.run_report import render_html

    home, run_id, _ = built
    data = load_report_data(Store(home, read_only=True), run_id)
    script = "<script>alert(1)</script>"
    data = dataclasses.replace(data, categories=[dict(row, category=script) for row in data.categories])
    page = render_html(data, summarize(data))
    assert script not in page and "<script" not in page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page


def test_markdown_summary_has_the_headline_tables_and_threshold(built):
    _, _, html_path = built
    markdown = (html_path.parent / "summary.md").read_text(encoding="utf-8")
    assert "- teacher accuracy: **80.0%**" in markdown
    assert re.search(r"\| teacher \| \d+(\.\d+)?K / \d+(\.\d+)?K \| [\d.]+ ms \(IQR [\d.]+ ms–[\d.]+ ms\) \| 1\.00x "
                     r"\| 80\.0% \| – \|", markdown)
    assert re.search(r"\| student \(distilled\) \| .* \| [\d.]+x \([\d.]+–[\d.]+\) \|", markdown)
    assert "## Per category" in markdown
    assert "| science | 1 | 0.0% (0/1; 0.0–79.3%) | 0.0% (0/1; 0.0–79.3%) | +0.0 pts | fewer than 10" in markdown
    assert "## Calibration" in markdown and "not calibrated" in markdown  # no temperature was passed
    assert re.search(r"Threshold tau = 0\.\d{4}, chosen on 5 validation questions", markdown)
    assert "interleaved rounds" in markdown


def test_summary_numbers_and_terminal_screen(built):
    home, run_id, _ = built
    store = Store(home, read_only=True)
    summary = load_summary(store, run_id)
    assert summary.teacher_accuracy == pytest.approx(0.8) and summary.n_questions == 5
    assert summary.retention == pytest.approx(summary.student_accuracy / 0.8)
    assert summary.cascade_tau is not None and summary.cascade_val_questions == 5
    # Same statistic everywhere: the cascade never looks faster than the student it always runs.
    assert summary.cascade_latency_ms >= summary.student_latency_ms
    assert summary.cascade_latency_ms == pytest.approx(
        summary.student_latency_ms + summary.cascade_share_to_teacher * summary.teacher_latency_ms)
    assert 0 < summary.speedup_lo <= summary.speedup_hi
    console = Console(record=True, width=100)
    print_summary(console, dataclasses.replace(summary, run_name="[bold]odd[/bold] run"))
    screen = console.export_text()
    assert "[bold]odd[/bold] run" in screen and "80.0%" in screen and f"{summary.cascade_tau:.4f}" in screen
    assert "chosen on 5 validation questions" in screen
    paths = build_report(store, run_id, out_dir=home / "elsewhere")
    assert paths.html.parent == home / "elsewhere" and set(paths.tables) == {"distillation-tradeoff",
                                                                           "distillation-categories"}


def test_a_run_without_evaluation_says_what_to_run(tmp_path):
    with pytest.raises(ReportError, match="kdflow evaluate") as info:
        build_report(Store(tmp_path), "no-such-run")
    assert isinstance(info.value, LookupError)  # the CLI reports LookupErrors without a traceback


def test_report_dir_is_one_safe_component(tmp_path):
    store = Store(tmp_path)
    assert report_dir(store, "../../etc/x y").parent == tmp_path / "reports"
    assert report_dir(store, "..") == tmp_path / "reports" / "_"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(built, tmp_path):
    _, _, html_path = built
    screenshot = tmp_path / "report.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_report_browser.py"), str(html_path),
         "--screenshot", str(screenshot), "--min-tables", "8", "--min-images", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert screenshot.stat().st_size > 10_000


def test_noisy_timings_are_flagged_in_the_latency_note(built):
    from kdflow.report.run_data import load_report_data
    from kdflow.report.sections import latency_note

    home, run_id, _ = built
    data = load_report_data(Store(home, read_only=True), run_id)

    def timed(models, role, p25, median, p75):
        return [dict(m, latency_ms_p25=p25, latency_ms_median=median, latency_ms_p75=p75)
                if m["model_role"] == role else m for m in models]

    quiet = timed(timed(data.models, "teacher", 2.0, 2.1, 2.2), "student", 1.0, 1.05, 1.1)
    assert "Warning" not in latency_note(data.spec, quiet)
    # A busy machine: preempted calls make a second, slow cluster in the teacher's timings.
    busy = timed(quiet, "teacher", 2.0, 9.0, 14.0)
    assert "timings were noisy (teacher IQR 2.00 ms–14.0 ms" in latency_note(data.spec, busy)


def test_untrained_baseline_and_significance_in_page_markdown_and_terminal(built):
    home, run_id, html_path = built
    page = html_path.read_text(encoding="utf-8")
    markdown = (html_path.parent / "summary.md").read_text(encoding="utf-8")
    summary = load_summary(Store(home, read_only=True), run_id)
    assert summary.untrained_accuracy is not None
    assert summary.gain_recovered == pytest.approx((summary.student_accuracy - summary.untrained_accuracy)
                                                   / (summary.teacher_accuracy - summary.untrained_accuracy))
    assert [(c.first, c.second) for c in summary.comparisons] == [
        ("student", "student_hard"), ("student", "student_pseudo"), ("student", "student_init"),
        ("student", "teacher")]
    assert all(c.n == 5 and not c.significant for c in summary.comparisons)  # 5 questions tell nothing apart
    for text in (page, markdown):
        assert "Not significant at the 5% level" in text and "exact McNemar" in text.replace("Exact", "exact")
        assert "gain recovered" in text and "student (untrained: before training)" in text
    assert re.search(r"- untrained student accuracy: \d+\.\d%; gain recovered .*: \*\*-?\d+\.\d%\*\*", markdown)
    console = Console(record=True, width=140)
    print_summary(console, summary)
    screen = console.export_text()
    assert "untrained student" in screen and "gain recovered" in screen
    assert "student (distilled) vs teacher:" in screen and "not significant at the 5% level" in screen


def test_students_over_seeds_in_page_markdown_and_terminal(built):
    home, run_id, html_path = built
    store = Store(home, read_only=True)
    study = load_summary(store, run_id).seeds
    assert study.seeds == (0, 1)
    assert [(s.role, [seed for seed, _ in s.accuracies]) for s in study.students] == [
        ("student", [0, 1]), ("student_hard", [0, 1]), ("student_pseudo", [0, 1]), ("student_init", [0])]
    con = duckdb.connect(str(home / "kdflow.duckdb"), read_only=True)
    accuracy = dict(((role, seed), value) for role, seed, value in con.execute(
        "SELECT model_role, seed, value FROM metrics WHERE category = '*' AND name = 'accuracy' AND seed IS NOT NULL"
    ).fetchall())
    con.close()
    assert {(s.role, seed): a for s in study.students for seed, a in s.accuracies} == pytest.approx(accuracy)
    assert [(c.first, c.second, len(c.tests)) for c in study.comparisons] == [
        ("student", "student_hard", 2), ("student", "student_pseudo", 2), ("student", "teacher", 2)]
    assert not any(c.significant for c in study.comparisons)  # 5 questions tell nothing apart
    verdict = verdict_sentence(study)
    assert "over 2 seeds" in verdict and "significant" in verdict
    page = html_path.read_text(encoding="utf-8")
    markdown = (html_path.parent / "summary.md").read_text(encoding="utf-8")
    assert str(escape(verdict)) in page and md_text(verdict) in markdown
    assert "## Students over seeds" in markdown and "Holm-adjusted across the seeds (Holm 1979)" in markdown
    per_seed = re.findall(r"\| student \(distilled\) vs ([^|]+) \| ([01]) \|", markdown)
    assert per_seed == [(other, seed) for other in ("student (hard labels only)",
                                                     "student (pseudo-labels from the teacher)", "teacher")
                        for seed in "01"]
    console = Console(record=True, width=400)
    print_summary(console, load_summary(store, run_id))
    assert verdict in console.export_text()


def test_a_report_written_in_the_report_stage_does_not_list_it_as_running(built, tmp_path):
    import shutil

    home, run_id, _ = built
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    store = Store(copy)
    with stage(store, run_id, "report"):
        paths = build_report(store, run_id)
    page = paths.html.read_text(encoding="utf-8")
    assert "<td>report</td><td>writing this report</td>" in page and "<td>running</td>" not in page
