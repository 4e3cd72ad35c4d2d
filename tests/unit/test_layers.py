"""The package's layers, read from the source (every import statement, function-level ones too, and
every ``importlib.import_module("msmedcap...")`` / ``"msmedcap...:Name"`` string):

- the core (everything but msmedcap/demo and msmedcap/analysis) never imports the demo world or the
  analysis tools; they reach the core's command line and scoring through entry points;
- no import cycle between files: ``from package import name`` is an edge to ``package.name`` where
  that is a module (the file it names), else to the package's ``__init__``."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "msmedcap"
LAB = ("msmedcap.demo", "msmedcap.analysis")
MODULE_STRING = re.compile(r"^(msmedcap(?:\.\w+)+)(?::\w+)?$")


def module_files() -> dict:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, modules: dict, strings: bool) -> set:
    """The msmedcap modules ``name`` (at ``path``) imports anywhere in the file; with ``strings``, also
    those it names for a later import."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
        elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = MODULE_STRING.match(node.value)
            if m:
                found.add(m.group(1))
    return {m for m in found if m.startswith("msmedcap")}


@pytest.fixture(scope="module")
def graph() -> dict:
    """Import statements only: what runs when a file is imported."""
    modules = module_files()
    return {name: imports_of(name, path, modules, strings=False) for name, path in modules.items()}


@pytest.fixture(scope="module")
def dependencies() -> dict:
    """Import statements and names of modules to import later (a registry entry, import_module)."""
    modules = module_files()
    return {name: imports_of(name, path, modules, strings=True) for name, path in modules.items()}


def is_lab(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in LAB)


def test_the_core_never_imports_the_demo_or_the_analysis_tools(dependencies):
    edges = sorted(f"{m} -> {t}" for m, targets in dependencies.items() if not is_lab(m)
                   for t in targets if is_lab(t))
    assert not edges, "core modules import lab code:\n" + "\n".join(edges)
    assert any(is_lab(m) for m in dependencies) and any(is_lab(t) for ts in dependencies.values() for t in ts), \
        "the walk sees no lab module at all: the test would pass vacuously"


def test_the_walk_sees_function_level_imports_and_module_strings(graph, dependencies):
    # encoder_transforms imports the registry inside the function; the registry names its transforms
    # as "msmedcap.data.transforms:ClipTransform" strings, imported when first used
    assert "msmedcap.registry" in graph["msmedcap.data.transforms"]
    assert "msmedcap.data.transforms" not in graph["msmedcap.registry"]
    assert "msmedcap.data.transforms" in dependencies["msmedcap.registry"]


def strongly_connected(graph: dict) -> list:
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_files(graph):
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
