"""The package's shape: every import between kdflow's own modules (the core, flows and tasks) points one
way (no module imports one that imports it back, at the top or inside a function), and down the layers of
kdflow.layers: the shared core imports no stage, a stage imports only the stages before it, and only the
sweep, the CLI, the flows and the tasks import from everywhere. No module imports another's private
(underscore) names. Modules or functions too long to read in one sitting are reported as warnings."""

from __future__ import annotations

import ast
import tomllib
import warnings
from pathlib import Path

from kdflow.layers import ABOVE, STAGES

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's source lies in the repository (pyproject's package-dir): the top-level
# folders of code and of data files (SQL, configs, the deployment template) all install inside kdflow.
PACKAGES = {"kdflow": ROOT / "kdflow", "kdflow.flows": ROOT / "flows", "kdflow.tasks": ROOT / "tasks",
            "kdflow.sql": ROOT / "sql", "kdflow.configs": ROOT / "configs", "kdflow.deployments": ROOT / "deployments"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # from the `def` line to the last line of the body (decorators not counted)


def _modules(packages: dict[str, Path] = PACKAGES) -> dict[str, Path]:
    """Every module of `packages` (installed name -> folder), as {dotted name: source file}."""
    found = {}
    for name, folder in packages.items():
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


def import_graph(packages: dict[str, Path] = PACKAGES) -> dict[str, set[str]]:
    """{module: the project modules it imports}, over every module of `packages`."""
    modules = _modules(packages)
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
    assert "kdflow.fitting.recipe" in graph and "kdflow.label.teacher" in graph  # the walk found the package
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


def test_long_modules_and_functions_in_kdflow_are_reported_as_warnings():
    found = []
    for path in sorted((ROOT / "kdflow").rglob("*.py")):
        found += too_long(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    if found:
        warnings.warn("worth splitting by responsibility:\n" + "\n".join(found), stacklevel=1)


# --------------------------------------------------------------------------------------------------
# Layers: the core, the stages in pipeline order, and what sits above them


def layer(module: str) -> tuple[int, str]:
    """(rank, name) of the layer `module` belongs to: 0 for the shared core, 1.. for the stages in
    kdflow.layers.STAGES order, len(STAGES) + 1 for the packages above them (sweep, cli, flows, tasks)."""
    parts = module.split(".")
    package = parts[1] if parts[0] == "kdflow" and len(parts) > 1 else ""
    if package in STAGES:
        return STAGES.index(package) + 1, package
    if package in ABOVE:
        return len(STAGES) + 1, package
    return 0, "core"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a -> b (a's layer imports b's)` for every import of a layer above the importer's: the core importing
    a stage or anything above the stages, a stage importing a later stage or anything above the stages."""
    found = []
    for importer in sorted(graph):
        rank, name = layer(importer)
        for imported in sorted(graph[importer]):
            their_rank, their_name = layer(imported)
            if their_rank > rank and name not in ABOVE:
                found.append(f"{importer} -> {imported} ({name} imports {their_name})")
    return found


def private_imports(path: Path, known: set[str], module: str) -> list[str]:
    """`module:LINE imports NAME from OTHER` for every underscore name (not a dunder) that `module` (source
    at `path`) imports from another project module, by `from OTHER import _name` or `OTHER._name` after
    `import OTHER`."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = {}  # local name -> project module, from `import kdflow.x as y` / `import kdflow.x`
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in known and node.level == 0:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:  # `from package import module`
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif alias.name.startswith("_") and not alias.name.startswith("__") and node.module != module:
                    found.append(f"{module}:{node.lineno} imports {alias.name} from {node.module}")
        elif isinstance(node, ast.Import):
            aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in known}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{module}:{node.lineno} imports {node.attr} from {aliases[node.value.id]}")
    return found


def _all_private_imports(packages: dict[str, Path] = PACKAGES) -> list[str]:
    modules = _modules(packages)
    return [line for name, path in sorted(modules.items()) for line in private_imports(path, set(modules), name)]


def test_the_stage_order_is_the_pipeline_the_docs_draw():
    """kdflow.layers.STAGES is every stage package, in the order README and docs/README.md draw the pipeline."""
    packages = {p.name for p in (ROOT / "kdflow").iterdir() if (p / "__init__.py").exists()}
    assert set(STAGES) | {"sweep", "cli"} <= packages
    for page in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        drawn = next(line for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("ingest ->"))
        assert tuple(word for word in drawn.split() if word in STAGES) == STAGES, page
    assert layer("kdflow.scoring.forward") == (0, "core") and layer("kdflow.store") == (0, "core")
    assert layer("kdflow.label.teacher") == (2, "label") and layer("kdflow.flows.distill")[1] == "flows"


def test_the_order_check_sees_an_import_up_the_pipeline_or_into_the_layers_above():
    graph = {
        "kdflow.store": {"kdflow.config"},                      # core -> core: fine
        "kdflow.config": {"kdflow.sweep.grid"},                 # core -> above
        "kdflow.modeling": {"kdflow.train.losses"},             # core -> stage
        "kdflow.label.teacher": {"kdflow.ingest.load", "kdflow.store", "kdflow.label.sharding"},  # fine
        "kdflow.validate.calibration": {"kdflow.evaluate.rows"},  # stage -> later stage
        "kdflow.report.sweep_report": {"kdflow.cli.console"},  # stage -> above
        "kdflow.flows.distill": {"kdflow.report.run_summary", "kdflow.tasks.label"},  # above -> anything: fine
        "kdflow.tasks.label": {"kdflow.sweep.grid"},
    }
    assert upward_imports(graph) == [
        "kdflow.config -> kdflow.sweep.grid (core imports sweep)",
        "kdflow.modeling -> kdflow.train.losses (core imports train)",
        "kdflow.report.sweep_report -> kdflow.cli.console (report imports cli)",
        "kdflow.validate.calibration -> kdflow.evaluate.rows (validate imports evaluate)",
    ]


def test_the_checks_find_planted_violations_in_a_package_tree(tmp_path):
    """A real (tiny) package tree walked as the project's is: a cycle, an upward import inside a function,
    and private names taken both ways are all caught."""
    files = {
        "__init__.py": "",
        "store.py": "def helper():\n    from kdflow.label.teacher import labels\n",  # core -> stage, lazily
        "label/__init__.py": "",
        "label/teacher.py": "from kdflow.store import helper\nfrom kdflow.label.cache import _hidden\n",
        "label/cache.py": "import kdflow.label.teacher as teacher\n_hidden = teacher._secret\n",
        "train/__init__.py": "",
        "train/loop.py": "from kdflow.label import teacher\nx = teacher._secret\nfrom kdflow.store import __doc__\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    packages = {"kdflow": tmp_path}
    graph = import_graph(packages)
    assert cycles(graph) == [["kdflow.label.cache", "kdflow.label.teacher", "kdflow.store"]]
    assert upward_imports(graph) == ["kdflow.store -> kdflow.label.teacher (core imports label)"]
    assert _all_private_imports(packages) == [
        "kdflow.label.cache:2 imports _secret from kdflow.label.teacher",
        "kdflow.label.teacher:2 imports _hidden from kdflow.label.cache",
        "kdflow.train.loop:2 imports _secret from kdflow.label.teacher",
    ]


def test_stages_import_only_down_the_pipeline():
    assert upward_imports(import_graph()) == []


def test_no_module_imports_another_modules_private_names():
    assert _all_private_imports() == []


def test_every_stage_package_names_an_entry_point_that_exists():
    """Each stage's docstring says where to start reading it: `Entry point: kdflow.<stage>.<module>.<function>(`;
    the function must exist, so the line cannot go stale after a move."""
    import importlib
    import re

    for stage in STAGES:
        doc = importlib.import_module(f"kdflow.{stage}").__doc__ or ""
        found = re.search(r"Entry point: (kdflow\.[\w.]+)\.(\w+)\(", doc)
        assert found and found.group(1).startswith(f"kdflow.{stage}."), (stage, doc[:300])
        assert callable(getattr(importlib.import_module(found.group(1)), found.group(2), None)), found.group(0)
