"""Dependencies point one way: service/export/training -> model, service -> export, and only the ``ponder``
composition root imports everything. Every .py under the four packages is parsed with ``ast``; imports at module
level and inside functions both count (a lazy import is still a dependency), and so does
``importlib.import_module("...")`` with a literal name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level packages it must never import
FORBIDDEN = {
    "model": {"export", "service", "training", "ponder"},
    "export": {"service", "training", "ponder"},
    "training": {"service", "ponder"},
    "service": {"training", "ponder"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"):
            found.append((node.lineno, node.args[0].value))
    return found


def _violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if ".venv" in path.parts or "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, name in _imported(tree, _module_name(path), path.name == "__init__.py"):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    bad = _violations(package)
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_relative_and_string_imports():
    source = ("import os\n"
              "def f():\n    from ..service import app\n    import export.backends\n"
              "    importlib.import_module('training.engine')\n")
    names = {name for _, name in _imported(ast.parse(source), "model.sub.mod", is_package=False)}
    assert names == {"os", "model.service", "export.backends", "training.engine"}
    names = {name for _, name in _imported(ast.parse("from .. import x\nfrom . import y\n"), "model.a.b", False)}
    assert names == {"model", "model.a"}
