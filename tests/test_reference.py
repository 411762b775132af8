"""The reference pages in docs/ are what the code generates: every setting of the config models and every
command and option of the command line, with the help text the code holds."""

from __future__ import annotations

import difflib
from pathlib import Path

import typer

from kdflow.cli import app
from kdflow.cli.reference import PAGES, cli_page, configuration_page, main
from kdflow.config import RunConfig, section_model

DOCS = Path(__file__).resolve().parents[1] / "docs"
REGENERATE = "regenerate them with `make docs` (python -m kdflow.cli.reference docs) and commit them"


def _settings(model: type, prefix: str = "") -> list[str]:
    """Every setting's dotted name, through nested sections (a list of sections as `key[]`)."""
    names = []
    for key, field in model.model_fields.items():
        name = f"{prefix}{key}"
        names.append(name)
        inner = section_model(field.annotation)
        if inner is not None:
            listed = "list[" in str(field.annotation)
            names += _settings(inner, f"{name}{'[]' if listed else ''}.")
    return names


def test_the_committed_pages_are_what_the_code_generates():
    stale = []
    for name, page in PAGES.items():
        committed = (DOCS / name).read_text(encoding="utf-8") if (DOCS / name).exists() else ""
        generated = page()
        if committed != generated:
            diff = difflib.unified_diff(committed.splitlines(), generated.splitlines(), f"docs/{name}",
                                        "generated", n=0, lineterm="")
            stale.append("\n".join(list(diff)[:20]))
    assert not stale, f"docs/ is out of date: {REGENERATE}\n" + "\n".join(stale)


def test_the_configuration_page_has_every_setting_with_its_description():
    page = configuration_page()
    settings = _settings(RunConfig)
    assert {"teacher.openai.base_url", "data.sources[].mapping.answer_type", "sweep.ensemble.method"} <= set(settings)
    missing = [name for name in settings if f"| `{name}` |" not in page]
    assert missing == []
    field = RunConfig.model_fields["training"].annotation.model_fields["alpha"]
    assert f"| `training.alpha` | number (>= 0, <= 1) | `0.5` | {field.description} |" in page
    assert "| `data.sources[].sample.size` | integer (>= 1) | required |" in page


def test_the_cli_page_has_every_command_and_option():
    page = cli_page()
    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="kdflow")
    for name in group.list_commands(root):
        assert f"## kdflow {name}\n" in page, name
        for param in group.get_command(root, name).params:
            assert all(f"`{opt}`" in page for opt in param.opts if opt.startswith("-")), (name, param.opts)
            assert " ".join(param.help.split()) in page, (name, param.opts)
    assert "kdflow init [OPTIONS] [DIR]" in page and "| `--resume`, `--restart` |  | `--resume` |" in page


def test_the_generator_writes_the_pages_it_checks(tmp_path, capsys):
    main([str(tmp_path)])
    assert {p.name: p.read_text(encoding="utf-8") for p in tmp_path.iterdir()} == {n: f() for n, f in PAGES.items()}
    main([str(tmp_path)])
    assert capsys.readouterr().out.count("unchanged") == len(PAGES)
