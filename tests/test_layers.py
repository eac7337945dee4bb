"""The import graph of the engine's packages, parsed with `ast` (imports inside functions count).

Layers (../shared/DESIGN.md): the bottom of `distill/` imports nothing above it; `teachers/` only
the bottom; `students/` the bottom and `teachers/`' label-source contract; `synth/` may use both;
the jobs and the CLI in `distill/` sit on top. No cycle between modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("distill", "teachers", "students", "synth")
# the jobs layer of distill/ (with the package itself, whose __getattr__ serves the Python API):
# everything else there is the bottom layer
JOBS = {"distill", "distill.api", "distill.active_rounds", "distill.cli", "distill.demo", "distill.eval_model", "distill.generate_store", "distill.label_estimate",
        "distill.launch", "distill.recipe", "distill.runner", "distill.teacher_pool"}
STUDENTS_MAY_USE = {"teachers.source"}  # the label-source contract


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).glob("*.py"):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module → the engine modules it imports (`from pkg import name` counts as `pkg.name` when that
    is a module, else as the package `pkg`)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    if module.startswith("distill"):
        return 3 if module in JOBS else 0
    return {"teachers": 1, "students": 1, "synth": 2}[module.split(".")[0]]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_imports_inside_functions(graph):
    assert "distill.runner" in graph["distill.cli"]  # cmd_train imports it in its body


def test_no_import_cycle(graph):
    assert _cycles(graph) == []


def test_layers_import_downwards_only(graph):
    up = [(m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m)]
    assert up == []


def test_teachers_and_students_stay_apart_from_the_layers_above(graph):
    bad = [(m, t) for m, targets in graph.items() for t in targets
           if (m.startswith("teachers") and t.split(".")[0] in ("students", "synth"))
           or (m.startswith("students") and (t.startswith("synth") or t.startswith("teachers")
                                            and t not in STUDENTS_MAY_USE))]
    assert bad == []


def test_bottom_layer_imports_only_the_bottom(graph):
    bad = [(m, t) for m, targets in graph.items() if layer(m) == 0 for t in targets if layer(t) != 0]
    assert bad == []


def test_known_cycle_is_found():
    """The checker itself: a two-module loop is reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
