# code_hash(stage): a params value that changes when the package source a stage runs changes.
# Snakemake's rerun triggers do not follow Python imports, so each rule carries the hash of its
# stage's entry module and everything it imports from eigpipe (found statically, function-level
# imports included); editing report.py reruns only the report. Plain Python, so tests can load it.
import ast
import hashlib
import importlib.util
from functools import cache
from pathlib import Path

STAGE_MODULES = {
    "synth_data": "eigpipe.data.synthetic",
    "check_data": "eigpipe.data.coco",
    "train": "eigpipe.train.loop",
    "evaluate": "eigpipe.evaluate",
    "covariance": "eigpipe.covariance",
    "spectrum": "eigpipe.spectrum",
    "report": "eigpipe.report",
}


def package_root():
    """The eigpipe sources that the `eigpipe` command will run (installed or editable)."""
    spec = importlib.util.find_spec("eigpipe")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    return Path(workflow.basedir).parent / "eigpipe"


def _module_file(root, modname):
    """eigpipe.a.b -> ROOT/a/b.py or ROOT/a/b/__init__.py; None for a name that is no module file."""
    parts = modname.split(".")[1:]
    candidates = [root.joinpath(*parts[:-1], f"{parts[-1]}.py")] if parts else []
    candidates.append(root.joinpath(*parts, "__init__.py"))
    return next((path for path in candidates if path.is_file()), None)


def _imported_modules(path, modname):
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


def source_files(root, entry):
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


@cache
def code_hash(stage, root=None):
    """Params value: a short hash of the package source a stage runs, so editing it reruns that stage."""
    root = Path(root) if root is not None else package_root()
    digest = hashlib.sha256()
    for path in source_files(root, STAGE_MODULES[stage]):
        content = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}:{len(content)}:".encode())
        digest.update(content)
    return digest.hexdigest()[:12]
