"""The teacher backend table (kdflow.config.backends): the config, the label stage and the docs follow it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kdflow.config import RunConfig, TeacherConfig
from kdflow.config.backends import BACKEND_NAMES, TEACHER_BACKENDS, backend_spec
from kdflow.label.backends.base import TeacherBackend

ROOT = Path(__file__).resolve().parent.parent


def test_the_config_allows_exactly_the_table_and_its_help_names_each():
    schema = TeacherConfig.model_json_schema()["properties"]["backend"]
    assert schema["enum"] == list(BACKEND_NAMES)
    for spec in TEACHER_BACKENDS:
        assert f"{spec.name}: {spec.description}" in schema["description"]
        assert spec.settings is None or spec.settings in TeacherConfig.model_fields, spec.name
    with pytest.raises(ValidationError, match="Input should be 'hf', 'vllm' or 'openai'"):
        TeacherConfig(backend="tgi")
    with pytest.raises(KeyError, match="no teacher backend 'tgi'"):
        backend_spec("tgi")


@pytest.mark.parametrize("spec", TEACHER_BACKENDS, ids=lambda spec: spec.name)
def test_a_backend_without_weights_of_its_own_needs_a_model(spec):
    if spec.local_weights:
        assert TeacherConfig(backend=spec.name).model is None  # built fresh from `architecture`
    else:
        with pytest.raises(ValidationError, match=f"teacher.backend={spec.name} needs teacher.model"):
            TeacherConfig(backend=spec.name)


def test_constructors_and_checks_resolve_without_importing_vllm():
    """The table holds import paths: resolving every constructor imports the backends' modules only."""
    code = (
        "import sys\n"
        "from kdflow.config.backends import TEACHER_BACKENDS\n"
        "for spec in TEACHER_BACKENDS:\n"
        "    assert callable(spec.constructor_function()), spec.name\n"
        "    assert spec.stage_check_function() is None or callable(spec.stage_check_function()), spec.name\n"
        "    assert spec.server_identity_function() is None or callable(spec.server_identity_function()), spec.name\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'openai')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_engine_host_backends_name_their_parallelism_settings():
    from kdflow.label.sharding import engine_groups, engine_settings

    for spec in TEACHER_BACKENDS:
        model = None if spec.local_weights else "m"
        teacher = TeacherConfig(backend=spec.name, model=model)
        if spec.engine_hosts:
            section = getattr(teacher, spec.settings)
            assert engine_settings(teacher) is section
            assert engine_groups(teacher.model_copy(update={spec.settings: section.model_copy(
                update={"data_parallel_size": 3})})) == 3
        else:
            assert engine_settings(teacher) is None and engine_groups(teacher) == 1


def test_open_backend_builds_the_configured_backend_on_the_teachers_weights(tiny_model, tiny_tokenizer,
                                                                          tiny_questions, tmp_path):
    """hf through the table's constructor, handed the teacher's weights: it scores like the model itself."""
    from kdflow.label.backends.hf import HFBackend
    from kdflow.label.teacher import TeacherRef, open_backend
    from kdflow.modeling import save_pretrained

    save_pretrained(tiny_model, tiny_tokenizer, tmp_path / "teacher")
    cfg = RunConfig(teacher={"backend": "hf", "model": str(tmp_path / "teacher"), "device": "cpu"})
    backend = open_backend(cfg, TeacherRef(model_ref=str(tmp_path / "teacher"), model_dir=None, key="k", spec={}))
    direct = HFBackend(tiny_model, tiny_tokenizer, cfg.scoring, batch_size=8, device="cpu")
    try:
        assert isinstance(backend, TeacherBackend) and isinstance(backend, HFBackend)
        got, want = backend.score(tiny_questions), direct.score(tiny_questions)
        flat = [[p for s in scored for p in s.label.probs] for scored in (got, want)]
        assert flat[0] == pytest.approx(flat[1], abs=1e-5)
    finally:
        backend.close()


def test_the_docs_list_every_backend():
    table = (ROOT / "docs" / "teachers.md").read_text(encoding="utf-8").split("## Backends", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE) == list(BACKEND_NAMES)
