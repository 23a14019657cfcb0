"""No `except ImportError` around an import of our own packages: they ship together, so such a fallback never runs
(and hides a real import error of ours behind a silently different behaviour)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OWN_PACKAGES = ("lightning_synfer", "datamodules")


def _imports_own_module(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and sub.module and sub.module.split(".")[0] in OWN_PACKAGES:
            return True
        if isinstance(sub, ast.Import) and any(a.name.split(".")[0] in OWN_PACKAGES for a in sub.names):
            return True
    return False


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def test_no_import_error_fallback_around_our_own_modules():
    found = []
    for package in OWN_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers) \
                        and any(_imports_own_module(stmt) for stmt in node.body):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
