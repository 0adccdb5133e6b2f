"""The package's structure, laid out as installed (pipeline/ -> kdpipe, stages/ -> kdpipe.stages, from
pyproject.toml's package-dir): no import circle, no import from a lower layer to a higher one, no module
over 400 lines, and the packages pyproject.toml lists are the folders with an __init__.py.

Every import counts, at module level and inside functions (a function-local import hides a circle from
Python, not from a reader); imports under ``if TYPE_CHECKING:`` do not, since they never run (they only
name types for annotations). Source is parsed with `ast`, nothing is imported, so this takes well under
a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (the CI's); 3.10 skips this structural check

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
MAX_LINES = 400

# Layers, low to high: a module may import its own layer's modules only within its own package (the root
# modules count as one package), and any module of a lower layer. Where this differs from the first sketch
# (issue 27: root < cache, losses, data < teacher, generation, vocab, train < evaluation, plan < stages < cli),
# the dependency is legitimate:
# - run_folder writes its records with kdpipe.cache.storage.write_atomic and stamps them with the cache's
#   clock, so it sits above the cache (with data) instead of among the root basics;
# - data.generated writes and reads generated files through kdpipe.cache.storage (local or object storage),
#   so data sits above cache and losses;
# - generation's vLLM backend starts its engine as the teacher's does (teacher.vllm.prepare_engine) and
#   the cross-tokenizer routes train with train's trainer and collator, so teacher and train sit below
#   generation and vocab.
LAYERS = [
    {"kdpipe", "errors", "config", "precision", "faults", "batching", "models", "tiny", "students",
     "filemode"},
    {"cache", "losses"},
    {"data", "run_folder"},
    {"teacher", "train", "fetch"},  # fetch: writes its model folder through run_folder
    {"generation", "vocab"},
    {"evaluation", "plan"},
    {"stages"},
    {"cli"},
]
ROOT_UNITS = LAYERS[0]  # kdpipe/__init__.py and the root modules: one package for the layering


def _folders() -> dict[str, Path]:
    """Each package's folder, as setuptools maps it (a subpackage without its own entry lies under its
    parent's folder)."""
    dirs = {name: ROOT / path for name, path in PYPROJECT["package-dir"].items()}
    for name in PYPROJECT["packages"]:
        if name not in dirs:
            parent, _, leaf = name.rpartition(".")
            dirs[name] = dirs[parent] / leaf
    return dirs


def _modules() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> source file."""
    modules = {}
    for package, folder in _folders().items():
        for file in folder.glob("*.py"):
            modules[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return modules


MODULES = _modules()


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _module_of(name: str) -> str | None:
    """The module an imported name lives in (``kdpipe.cache.Manifest`` -> ``kdpipe.cache``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The kdpipe modules `module` imports, wherever in it (a name from a package counts as the package's
    ``__init__``, a submodule as itself)."""
    file = MODULES[module]
    tree = ast.parse(file.read_text(), str(file))
    skipped = _type_checking_only(tree)
    package = module if file.stem == "__init__" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {_module_of(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _module_of(base))
    return {m for m in found if m and m != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _unit(module: str) -> str:
    """The package a module belongs to for layering: kdpipe.train.setup -> train, kdpipe.models -> models."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(module: str) -> int:
    unit = _unit(module)
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def _circles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return circles


def test_the_parser_sees_the_package():
    """The walk finds the modules and the imports, function-local ones included (else the checks below
    would pass on nothing)."""
    assert {"kdpipe", "kdpipe.cli", "kdpipe.cache.checks", "kdpipe.stages.registry", "kdpipe.train.setup"} <= set(MODULES)
    assert len(MODULES) > 60
    assert "kdpipe.stages.registry" in GRAPH["kdpipe.cli"]
    # kdpipe.cache.verified imports checks at module level; kdpipe.cli imports the stages inside functions
    assert "kdpipe.cache.checks" in GRAPH["kdpipe.cache.verified"]
    assert "kdpipe.plan.estimate" in GRAPH["kdpipe.cli"]
    assert {_unit(m) for m in MODULES} == set().union(*LAYERS), "LAYERS names exactly the packages and root modules"


def test_no_import_circle():
    assert _circles() == []


def test_no_import_runs_up_the_layers():
    upward = [
        f"{a} -> {b}"
        for a, targets in sorted(GRAPH.items())
        for b in sorted(targets)
        if _layer(b) > _layer(a)
        or (_layer(b) == _layer(a) and _unit(a) != _unit(b) and not {_unit(a), _unit(b)} <= ROOT_UNITS)
    ]
    assert upward == []


def test_no_module_over_400_lines():
    long = {m: n for m, f in MODULES.items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_pyproject_lists_every_package():
    """setuptools' `find` cannot map pipeline/ to kdpipe, so the list in pyproject.toml is explicit: it must
    name exactly the folders holding an __init__.py (a new subpackage left off it is missing when
    installed from a wheel), and the data-only folders declared in package-data (plan/archs)."""
    found = set(PYPROJECT.get("package-data", {}))
    for top, folder in PYPROJECT["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([top, *init.parent.relative_to(ROOT / folder).parts]))
    assert sorted(PYPROJECT["packages"]) == sorted(found)
