"""kdflow as a user installs it: the wheel, in a fresh virtual environment, run from an empty folder far
from the repository, with the shipped tiny config found by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _build_wheel(out: Path) -> Path:
    """The wheel of a copy of the packaged folders (pyproject's package-dir), so the build writes nothing
    into the repository; setuptools from this environment (no build isolation, no index)."""
    source = out / "source"
    for folder in {"kdflow", *PYPROJECT["tool"]["setuptools"]["package-dir"].values()}:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--wheel-dir", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, (
        f"{built.stdout[-2000:]}{built.stderr[-2000:]}\nthe build needs the dev extra's setuptools>=70.1 here: "
        "make install (or pip install -e '.[dev]')"
    )
    (wheel,) = out.glob("kdflow-*.whl")
    return wheel


def _fresh_venv(where: Path) -> Path:
    """A virtual environment of its own, without kdflow, whose dependencies are this environment's: a .pth
    names this interpreter's site-packages folders (after the venv's own, so the installed kdflow wins)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))}
    deps = [p for p in sys.path if p in ours and Path(p).is_dir() and not Path(p).is_relative_to(ROOT / "kdflow")]
    Path(purelib, "zz-test-dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    return python


@pytest.mark.slow
def test_the_wheel_runs_the_tiny_pipeline_from_an_empty_folder(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    python = _fresh_venv(tmp_path / "venv")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PREFECT_API_URL", "PREFECT_HOME"}}
    env.update(KDFLOW_HOME=str(work / "home"), HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    kdflow = tmp_path / "venv" / "bin" / "kdflow"

    def run(*command: str | Path, timeout: float = 120) -> str:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    where = run(python, "-c", "import kdflow, kdflow.flows; from kdflow.config import load_config; "
                "print(kdflow.__file__); print(load_config('smollm2-gguf').data.sources[0].path)").splitlines()
    assert Path(where[0]).is_relative_to(tmp_path / "venv"), where  # the wheel's copy, not the repository's
    assert Path(where[1]).is_file() and Path(where[1]).is_relative_to(tmp_path / "venv")  # a config's own data
    help_screen = run(kdflow, "--help")
    assert "Usage: kdflow" in help_screen and "init" in help_screen
    assert run(kdflow, "--version").strip() == f"kdflow {PYPROJECT['project']['version']}"
    # Training in two processes: the launcher's workers import the installed kdflow too.
    # Only the distilled student: the baselines would start the same launcher twice more.
    out = run(kdflow, "run", "-c", "tiny", "--set", "training.num_processes=2", "--set", "training.hard_label_baseline=false",
              "--set", "training.pseudo_label_baseline=false", timeout=600)
    report = Path(next(line for line in out.splitlines() if line.startswith("report: ")).removeprefix("report: "))
    assert report.is_file() and report.is_relative_to(work / "home")
    assert sorted(p.name for p in work.iterdir()) == ["home"]  # nothing written beside it
