"""No import cycle in lightning_synfer/ and datamodules/.

(a) Every module imports when it is the first of the two packages to be imported, in a fresh interpreter: an
    import cycle shows up there as "cannot import name ... from partially initialized module".
(b) The static graph of in-package imports, imports inside functions included (they hide a cycle rather than
    remove it), has no cycle; every cycle found is listed with its edges.
"""
from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_synfer", "datamodules")


def _module_files() -> dict[str, Path]:
    """Dotted name -> file of every module and package of PACKAGES (walk_packages without importing them)."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        out[package] = ROOT / package / "__init__.py"
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            path = ROOT / Path(*info.name.split("."))
            out[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return out


# Runs in the child: for each module, drop every module of PACKAGES from sys.modules and import it first.
# Third-party packages (torch, lightning) stay loaded, so ~100 first imports take seconds, not minutes.
_CHILD = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("lightning_synfer", "datamodules")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ImportError:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


@pytest.mark.slow  # ~100 first imports, each re-running the package modules: 1-2.5 minutes on 2 busy cores
def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(_module_files())
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(names)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**_env(), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {name} first:\n{tb}" for name, tb in failures.items())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNFER_")} | {"OMP_NUM_THREADS": "1"}


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement in `module` refers to (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the in-package modules it imports, anywhere in its file.

    `from a.b import c` is an edge to a.b.c when that is a module, else to a.b. Importing a.b.c also runs the
    __init__ of a.b: that is an edge to package a.b unless a.b contains the importer (then it already ran)."""
    files = _module_files()
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _imported(node, name, name in packages)
            if isinstance(node, ast.ImportFrom):  # `from pkg import submodule` -> the submodule, else pkg itself
                base, members = targets[0], targets[1:]
                targets = [m for m in members if m in files] or [base]
                if any(m not in files for m in members):
                    targets.append(base)
            for target in targets:
                if target not in files:
                    continue
                edges.add(target)
                parts = target.split(".")
                for i in range(1, len(parts)):
                    ancestor = ".".join(parts[:i])
                    if ancestor in files and not (name == ancestor or name.startswith(ancestor + ".")):
                        edges.add(ancestor)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_static_import_graph_has_no_cycle():
    graph = import_graph()
    cycles = find_cycles(graph)
    report = []
    for component in cycles:
        members = set(component)
        edges = sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in members)
        report.append(f"cycle of {len(component)} modules:\n  " + "\n  ".join(edges))
    assert not cycles, "\n".join(report)


def test_the_cycle_finder_sees_function_level_imports(tmp_path, monkeypatch):
    """The checker itself: a cycle closed only by an import inside a function is found."""
    pkg = tmp_path / "lightning_synfer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lightning_synfer import b\n")
    (pkg / "b.py").write_text("def f():\n    from lightning_synfer.a import x\n")
    (tmp_path / "datamodules").mkdir()
    (tmp_path / "datamodules" / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert find_cycles(import_graph()) == [["lightning_synfer.a", "lightning_synfer.b"]]
