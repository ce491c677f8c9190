"""The test suite's own layout: shared helpers live in conftest.py and the helper modules, never in a test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, ``from tests import test_x`` counted as ``tests.test_x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found |= {node.module or "", *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def test_no_test_module_imports_another() -> None:
    offending = {
        path.name: sorted(name for name in _imported_modules(path) if name.split(".")[-1].startswith("test_"))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    assert not {name: found for name, found in offending.items() if found}
