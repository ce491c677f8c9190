"""Code hashes: a short hash of the package source a stage runs, so that editing it reruns that stage.

Snakemake's rerun triggers do not follow Python imports, so each rule carries, as a param, the hash of its
stage's entry module and everything that module imports from eigpipe (found statically, function-level
imports included), with the command line that runs it: editing report.py reruns only the report, editing
cli.py every stage. Upgrading torch, torchvision, NumPy or pycocotools reruns every stage too (other bits).
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from pathlib import Path

from eigpipe.stages import STAGES

PACKAGE_ROOT = Path(__file__).resolve().parent
SOFTWARE = ("torch", "torchvision", "numpy", "pycocotools")  # another version gives other bits, so a rerun


def _module_file(root: Path, modname: str) -> Path | None:
    """eigpipe.a.b -> ROOT/a/b.py or ROOT/a/b/__init__.py; None for a name that is no module file."""
    parts = modname.split(".")[1:]
    candidates = [root.joinpath(*parts[:-1], f"{parts[-1]}.py")] if parts else []
    candidates.append(root.joinpath(*parts, "__init__.py"))
    return next((path for path in candidates if path.is_file()), None)


def _imported_modules(path: Path, modname: str) -> Iterator[str]:
    """Names a module imports (absolute form), including imports inside functions."""
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError:
        return
    package = modname if path.name == "__init__.py" else modname.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def source_files(root: Path, entry: str) -> list[Path]:
    """The package files a stage's entry module runs: its transitive eigpipe imports and their packages."""
    files, seen, todo = set(), set(), [entry]
    while todo:
        modname = todo.pop()
        if modname in seen or modname.split(".")[0] != "eigpipe":
            continue
        seen.add(modname)
        parts = modname.split(".")
        todo.extend(".".join(parts[:n]) for n in range(1, len(parts)))
        path = _module_file(root, modname)
        if path is not None:
            files.add(path)
            todo.extend(_imported_modules(path, modname))
    return sorted(files)


def software() -> dict[str, str | None]:
    """Installed versions of the libraries whose arithmetic gives a stage's numbers."""
    found = {}
    for name in SOFTWARE:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@cache
def code_hash(stage: str, root: Path = PACKAGE_ROOT) -> str:
    """Params value: a short hash of the package files a stage runs (its entry module's and the command line's,
    which parses its arguments) and of the installed SOFTWARE versions."""
    digest = hashlib.sha256(json.dumps(software(), sort_keys=True).encode())
    for path in sorted({*source_files(root, STAGES[stage].module), *source_files(root, "eigpipe.cli")}):
        content = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}:{len(content)}:".encode())
        digest.update(content)
    return digest.hexdigest()[:12]
