"""The train stage stays readable: no module over 400 lines, no function over 80, and the recipe module
holds the loop it describes while its helpers live in sibling modules."""

from __future__ import annotations

import ast
from pathlib import Path

import kdflow.train

TRAIN = Path(kdflow.train.__file__).parent
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_train_module_or_function_is_too_long():
    modules = sorted(TRAIN.glob("*.py"))
    assert len(modules) > 5
    long_files = [f"{p.name} ({n} lines)" for p in modules if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]
    assert long_files == []
    assert [f for p in modules for f in _long_functions(p)] == []


def test_the_length_check_sees_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "    return x\n", encoding="utf-8")
    assert _long_functions(source) == [f"long.py:1 f ({MAX_FUNCTION_LINES + 2} lines)"]


def test_the_recipe_module_holds_the_loop_and_train():
    tree = ast.parse((TRAIN / "recipe.py").read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assert {"train", "_loop", "_optimizer_step", "_loss_step", "_export"} <= defined
