"""The package's layout: imports point one way, and the README's layout map names every module.

The import graph is read from the source with ast (every `import` / `from ... import`, at the top
of a module and inside functions alike; relative imports resolved), so an import moved into a
function to dodge a cycle is still an edge here.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vtprune")

# Layers, lowest first: a module may import its own layer and the layers below it, never above.
# (STYLE.md: cli/batch -> quality/training -> pruning -> engine -> kernels.) The front ends are the
# entry points: the CLI, `python -m vtprune`, and lmms-eval's model plugin.
LAYERS = [
    ("base", ["vtprune.errors", "vtprune.files", "vtprune.validate", "vtprune.model_configs"]),
    ("kernels", ["vtprune.kernels"]),
    ("engine", ["vtprune.engine", "vtprune"]),  # vtprune/__init__.py re-exports the engine's API
    ("pruning", ["vtprune.pruning"]),
    ("training", ["vtprune.training"]),
    ("quality", ["vtprune.quality"]),
    ("checkpoints and demo", ["vtprune.tiny_model", "vtprune.demo"]),
    ("batch jobs", ["vtprune.batch"]),
    ("front ends", ["vtprune.cli", "vtprune.__main__", "vtprune.quality.lmms_eval_plugin", "vtprune.quality.lmms"]),
]

# Edges that still point up, each to be removed by the change named (emptying this list is the goal).
ALLOWED_UPWARD = {
    # LlavaEngine.set_pruning builds a PruningPlan from a config (the import is local and says why:
    # importing pruning loads the compiled ops). The fix: the engine takes a plan built outside it.
    ("vtprune.engine.engine", "vtprune.pruning"),
}


def _modules() -> dict[str, tuple[str, bool]]:
    """module name -> (file path, is a package __init__)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(PACKAGE):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                pkg = rel[-1] == "__init__"
                out[".".join(rel[:-1] if pkg else rel)] = (os.path.join(dirpath, f), pkg)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported vtprune module: line}. `from P import name` is an edge to P.name when
    that is a module, else to P; `import a.b.c` to the longest prefix that is a module."""
    mods = _modules()

    def module_of(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, (path, is_pkg) in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                if t.split(".")[0] != "vtprune":
                    continue
                target = module_of(t)
                if target is not None and target != mod:
                    graph[mod].setdefault(target, node.lineno)
    return graph


def _cycle(graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, {})):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _layer(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{mod}: not in any layer of tests/test_layout.py LAYERS"
    return rank


def test_graph_reader_sees_every_kind_of_import():
    """The reader itself: relative, absolute, function-level and package-attribute imports."""
    g = import_graph()
    assert g["vtprune.engine.engine"]["vtprune.engine.model"]        # from .model import LlavaModel
    assert "vtprune.kernels._checks" in g["vtprune.kernels.compaction"]  # from . import _checks as check
    assert "vtprune.pruning" in g["vtprune.engine.engine"]           # inside set_pruning
    assert "vtprune.errors" in g["vtprune"]                          # from .errors import ...
    assert _cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) is None


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    up = sorted((m, t, line) for m, targets in import_graph().items() for t, line in targets.items()
                if _layer(t) > _layer(m) and (m, t) not in ALLOWED_UPWARD)
    assert not up, "imports pointing up the layers: " + "; ".join(
        f"{m} (line {line}) -> {t} ({LAYERS[_layer(t)][0]} is above {LAYERS[_layer(m)][0]})" for m, t, line in up)


@pytest.mark.parametrize("edge", sorted(ALLOWED_UPWARD))
def test_allowed_upward_edges_still_exist(edge):
    """An allow-listed edge that is gone must leave the list (so the list only shrinks)."""
    m, t = edge
    assert t in import_graph()[m], f"{m} -> {t} no longer exists: remove it from ALLOWED_UPWARD"


def test_config_accepts_exactly_the_activations_the_model_implements():
    from vtprune.engine import config, model

    assert sorted(model._ACTIVATIONS) == sorted(config.ACTIVATIONS)


# --------------------------------------------------------------------------- the README's map
def readme_map() -> str:
    """The code block under the README's '## Architecture' heading."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("```\n", text.index("\n## Architecture\n")) + 4
    return text[start:text.index("```\n", start)]


def mapped_files(tree: str) -> set[str]:
    """Paths (relative to the repository) of the .py files the map names. A line that starts at
    column 0 with `DIR/` opens a top-level directory; under vtprune/, a line whose first word is
    `SUB/` (two spaces in) opens a subpackage, a first word that is a file names a top-level module;
    every `NAME.py` on a line belongs to the directory opened last (NAME may carry subdirectories,
    `lmms/ models/vtprune.py` style entries too)."""
    named, top, sub = set(), "", ""
    for line in tree.splitlines():
        if not line.strip():
            continue
        words = line.split()
        opener = not line.startswith(" ") or not line.startswith("   ")  # column 0 or 2
        if not line.startswith(" "):
            top, sub = (words[0] if words[0].endswith("/") else ""), ""
        elif opener:
            sub = words[0] if words[0].endswith("/") else ""
        prefix = ""  # a `DIR/` word inside a section (e.g. `lmms/`) prefixes the names after it
        for i, w in enumerate(words):
            w = w.strip("`,;:()")
            if w.endswith("/") and not (i == 0 and opener):
                prefix = w
            elif w.endswith(".py"):
                base = top + (sub if top == "vtprune/" else "")
                named.add(os.path.normpath(base + prefix + w))
    return named


def test_map_reader():
    tree = ("vtprune/\n  cli.py   the CLI\n  engine/  a.py  b.py, c.py\n           d.py\n"
            "  quality/ e.py\n           lmms/  models/f.py\nbench/   g.py\n")
    assert mapped_files(tree) == {"vtprune/cli.py", "vtprune/engine/a.py", "vtprune/engine/b.py",
                                  "vtprune/engine/c.py", "vtprune/engine/d.py", "vtprune/quality/e.py",
                                  "vtprune/quality/lmms/models/f.py", "bench/g.py"}


def _py_files(top: str) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out |= {os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames
                if f.endswith(".py") and f != "__init__.py"}
    return out


def test_readme_map_names_every_module():
    """Every .py file under vtprune/ (and recipes/, benchmarks/), except __init__.py, has its line in
    the README's layout map, in its directory; and the map names no file that does not exist."""
    named = mapped_files(readme_map())
    files = _py_files("vtprune") | _py_files("recipes") | _py_files("benchmarks")
    assert not files - named, f"README's Architecture map lacks: {sorted(files - named)}"
    gone = sorted(p for p in named if not os.path.isfile(os.path.join(ROOT, p)))
    assert not gone, f"README's Architecture map names files that do not exist: {gone}"
