"""The training recipe reads top to bottom in one module: it holds the loop it describes, while its helpers
live in sibling modules (tests/test_layout.py holds every module to its length limits)."""

from __future__ import annotations

import ast
from pathlib import Path

import kdflow.fitting

FITTING = Path(kdflow.fitting.__file__).parent


def test_the_recipe_module_holds_the_loop_and_train():
    tree = ast.parse((FITTING / "recipe.py").read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assert {"train", "_loop", "_optimizer_step", "_loss_step", "_export"} <= defined
