"""The package's shape: every import between kdflow's own modules (the core, flows and tasks) points one
way, so no module imports one that imports it back, at the top or inside a function; and no module or
function in kdflow/ is too long to read in one sitting."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's source lies in the repository (pyproject's package-dir): the top-level
# folders of code and of data files (SQL, configs, the deployment template) all install inside kdflow.
PACKAGES = {"kdflow": ROOT / "kdflow", "kdflow.flows": ROOT / "flows", "kdflow.tasks": ROOT / "tasks",
            "kdflow.sql": ROOT / "sql", "kdflow.configs": ROOT / "configs", "kdflow.deployments": ROOT / "deployments"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # from the `def` line to the last line of the body (decorators not counted)


def _modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _packages() -> set[str]:
    """Every folder with an __init__.py, as the package name it installs under."""
    return {name for name, path in _modules().items() if path.name == "__init__.py"}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (a package import counts for the package's
    __init__, `from package import module` for the module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out & known


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_core_flows_or_tasks():
    graph = import_graph()
    assert "kdflow.train.recipe" in graph and "kdflow.label.teacher" in graph  # the walk found the package
    assert "kdflow.config.loading" in graph["kdflow.config"]  # ... and the imports of a package's __init__
    assert cycles(graph) == []


def test_every_package_installs_inside_the_kdflow_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    # Folders of data files only (templates) are listed too, with their files in package-data.
    data_only = {name for name in setuptools["packages"] if name not in PACKAGES
                 and not (ROOT / name.replace(".", "/") / "__init__.py").exists()}
    assert data_only <= set(setuptools["package-data"]) and all(name.startswith("kdflow.") for name in data_only)
    assert set(setuptools["packages"]) - data_only == _packages()
    assert all(name == "kdflow" or name.startswith("kdflow.") for name in setuptools["packages"])
    assert setuptools["package-dir"] == {name: str(path.relative_to(ROOT)) for name, path in PACKAGES.items()
                                         if name != "kdflow"}


def _folder(package: str) -> Path:
    """The repository folder an installed package comes from, through the nearest mapped parent."""
    parent = max((name for name in PACKAGES if package == name or package.startswith(name + ".")), key=len)
    return PACKAGES[parent].joinpath(*package.removeprefix(parent).split(".")[1:])


def test_every_package_data_pattern_ships_files():
    """A package-data glob that matches nothing (a moved file, a typo) would leave the wheel without it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert _folder("kdflow.configs.data") == ROOT / "configs" / "data"
    empty = [f"{package}: {pattern}" for package, patterns in setuptools["package-data"].items()
             for pattern in patterns if not any(path.is_file() for path in _folder(package).glob(pattern))]
    assert empty == [], f"package-data patterns that match no file: {empty}"
    for name in ("sql", "configs", "deployments"):
        kinds = {path.suffix for path in (ROOT / name).iterdir() if path.is_file() and path.name != "__init__.py"}
        assert {f"*{kind}" for kind in kinds} <= set(setuptools["package-data"][f"kdflow.{name}"]), name


def too_long(source: str, name: str) -> list[str]:
    """`name: N lines` when the source is over MAX_MODULE_LINES, and `name:LINE function: N lines` for every
    function or method over MAX_FUNCTION_LINES (nested ones included)."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_the_length_check_counts_modules_and_functions_from_def_to_end():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    fits = f"@decorator\ndef f():\n{body}"  # def + 79 lines: 80
    assert too_long(fits, "m.py") == []
    method = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert too_long(f"class C:\n    def g(self):\n{method}", "m.py") == ["m.py:2 g: 81 lines"]  # def + 80 lines
    assert too_long("x = 1\n" * (MAX_MODULE_LINES + 1), "m.py") == [f"m.py: {MAX_MODULE_LINES + 1} lines"]


def test_no_module_in_kdflow_over_400_lines_nor_function_over_80():
    found = []
    for path in sorted((ROOT / "kdflow").rglob("*.py")):
        found += too_long(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    assert found == [], "split these by responsibility:\n" + "\n".join(found)
