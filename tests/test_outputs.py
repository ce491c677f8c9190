"""No user data is ever lost: every stage refuses, before any work, an output path that holds something it did not
make (a folder of the user's files, a file of another kind) or that is one of its inputs; it replaces only its own
earlier output, recognised by kind (issue 18, item 1)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from eigpipe import cli, outputs, provenance
from eigpipe.data.synthetic import DATASET
from eigpipe.errors import EigpipeError
from eigpipe.evaluate import EVALUATION
from eigpipe.models import save_checkpoint
from eigpipe.report import MARKER, REPORT_FOLDER, REPORT_KIND
from eigpipe.spectral import store
from eigpipe.spectral.dimensions import DIMENSIONS_TABLE
from eigpipe.spectral.spectrum import SPECTRUM_TABLE, TABLE_COLUMNS, eigenvalue_path
from eigpipe.spectral.widths import WIDTHS_SPEC
from eigpipe.stages import STAGES, path_argument
from eigpipe.train.state import RUN_FOLDER, RunFolder
from tests.helpers import one_line_error

SMOKE = Path(__file__).resolve().parents[1] / "config" / "smoke.yaml"


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file under ``path`` (or the file itself) by its sha256: what must come through byte-identical."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


# ---- every stage, with every output it writes, against foreign things and its own inputs ----------------------

OUTPUT_ARGS = [(name, arg) for name, stage in STAGES.items() for arg in stage.args if arg.output]


def test_every_stage_that_writes_declares_its_outputs() -> None:
    writers = {name for name, _ in OUTPUT_ARGS}
    assert writers == set(STAGES) - {"check-data", "check-config", "complexity"}  # these only read and print


def stage_argv(stage_name: str, root: Path, output_flag: str, output: Path) -> tuple[list[str], list[Path]]:
    """Arguments of a stage whose inputs are small files under root/in (never read: the claim comes first) and
    whose output ``output_flag`` is ``output``; returns (argv, the input paths given, the study file included)."""
    stage = STAGES[stage_name]
    argv, given = [stage_name], []
    if stage.sections:
        given.append(root / "in" / "study.yaml")
        argv += ["--config", str(given[-1])]
    for arg in stage.args:
        if arg.options.get("type") is not path_argument:
            if arg.options.get("required"):  # a required non-path value: any will do (the claim comes first)
                argv += [arg.flags[0], "x"]
            continue
        flag = arg.flags[0]
        if flag == output_flag:
            value = output
        elif arg.output:
            value = root / "elsewhere" / f"{flag.lstrip('-')}.out"
        else:
            value = root / "in" / f"{flag.lstrip('-')}.input"
            given.append(value)
        argv += [flag, str(value)] if flag.startswith("-") else [str(value)]
    return argv, given


@pytest.fixture
def inputs_root(tmp_path: Path) -> Path:
    """root/in: the smoke study file and one small file per input argument of any stage."""
    (tmp_path / "in").mkdir()
    shutil.copy(SMOKE, tmp_path / "in" / "study.yaml")
    for _, stage in STAGES.items():
        for arg in stage.args:
            if arg.options.get("type") is path_argument and not arg.output:
                (tmp_path / "in" / f"{arg.flags[0].lstrip('-')}.input").write_text("the user's data\n")
    return tmp_path


def foreign_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article} my thesis\n")
    (path / "figures").mkdir()
    (path / "figures" / "plot.png").write_bytes(b"\x89PNG not eigpipe's")
    return path


def foreign_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("run,layer\nmy,own notes\n")
    return path


FOREIGN: dict[str, Callable[[Path], Path]] = {
    "a folder of the user's files": lambda root: foreign_folder(root / "mine"),
    "a file of another kind": lambda root: foreign_file(root / "notes.csv"),
    "an empty file": lambda root: (root / "empty.parquet").touch() or root / "empty.parquet",
}


@pytest.mark.parametrize("what", FOREIGN)
@pytest.mark.parametrize(("stage", "flag"), [(s, a.flags[0]) for s, a in OUTPUT_ARGS])
def test_foreign_output_is_refused_and_kept_byte_identical(inputs_root, capsys, stage, flag, what) -> None:
    target = FOREIGN[what](inputs_root)
    before = snapshot(target)
    argv, _ = stage_argv(stage, inputs_root, flag, target)
    assert cli.main(argv) == 1
    one_line_error(capsys, str(target), "exists and is not")
    assert snapshot(target) == before
    assert not [p for p in target.parent.iterdir() if outputs.is_temp(p.name)]


@pytest.mark.parametrize(("stage", "flag"), [(s, a.flags[0]) for s, a in OUTPUT_ARGS])
def test_an_input_is_never_an_output(inputs_root, capsys, stage, flag) -> None:
    _, given = stage_argv(stage, inputs_root, flag, inputs_root / "unused")
    assert given, stage
    for source in [*given, inputs_root / "in"]:  # each input, and the folder holding them
        before = snapshot(inputs_root / "in")
        argv, _ = stage_argv(stage, inputs_root, flag, source)
        assert cli.main(argv) == 1, (stage, source)
        one_line_error(capsys, str(source), "the input")
        assert snapshot(inputs_root / "in") == before


@pytest.mark.parametrize("under", [False, True], ids=["the-link", "under-it"])
@pytest.mark.parametrize(("stage", "flag"), [(s, a.flags[0]) for s, a in OUTPUT_ARGS])
def test_an_output_at_a_symbolic_link_that_loops_is_one_line(inputs_root, capsys, stage, flag, under) -> None:
    loop = inputs_root / "loop"
    loop.symlink_to("loop")
    target = loop / "out" if under else loop
    argv, _ = stage_argv(stage, inputs_root, flag, target)
    assert cli.main(argv) == 1
    one_line_error(capsys, f"{target}: a symbolic link that loops")
    assert loop.is_symlink()


@pytest.mark.parametrize(("stage", "flag"), [(s, a.flags[0]) for s, a in OUTPUT_ARGS])
def test_an_output_at_a_symbolic_link_to_nothing_is_one_line(inputs_root, capsys, stage, flag) -> None:
    link = inputs_root / "dangling"
    link.symlink_to("nowhere")
    argv, _ = stage_argv(stage, inputs_root, flag, link)
    assert cli.main(argv) == 1
    one_line_error(capsys, f"{link}: a symbolic link to nowhere, which does not exist")
    assert link.is_symlink()


def test_an_output_inside_an_input_folder_is_refused(tmp_path, capsys) -> None:
    """Written into the images folder, the store would be among the next run's inputs."""
    images = tmp_path / "photos"
    images.mkdir()
    out = images / "x.zarr"
    argv = ["analyze", "--model", "torchvision:resnet18", "--images", str(images), "--layers", "avgpool"]
    assert cli.main([*argv, "--out", str(out)]) == 1
    one_line_error(capsys, f"{out}: is inside the input {images}")
    assert list(images.iterdir()) == []


def test_an_input_at_a_symbolic_link_that_loops_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "loop").symlink_to("loop")
    argv = ["spectrum", "--config-json", json.dumps({"spectrum": {}}), str(tmp_path / "loop")]
    assert cli.main([*argv, "--out", str(tmp_path / "t.parquet")]) == 1
    one_line_error(capsys, f"{tmp_path / 'loop'}: a symbolic link that loops")


def covariance_store(path: Path) -> Path:
    a = np.random.default_rng(0).normal(size=(3, 7))
    layers = {"body.conv1": {"second_moment": a @ a.T / 7, "mean": a.mean(axis=1)}}
    return store.write_store(path, store.COVARIANCE_KIND, layers, {"run": "r", "iteration": 0}, {})


@pytest.mark.parametrize(
    "args",
    [
        ["--out", "T/t.parquet", "--eigenvalues", "S/final.zarr"],
        ["--out", "S/final.zarr"],
        ["--out", "S/../S/final.zarr/.."],  # the folder holding it, spelled another way
        ["--out", "T/same.parquet", "--eigenvalues", "T/same.parquet"],  # two outputs, one path
        ["--out", "S/final.zarr/t.parquet"],  # inside it
        ["--out", "T/t.parquet", "--eigenvalues", "S/final.zarr/e.zarr"],
    ],
)
def test_spectrum_never_writes_over_its_covariance_store(tmp_path, monkeypatch, capsys, args) -> None:
    monkeypatch.chdir(tmp_path)
    covariance_store(Path("S/final.zarr"))
    before = snapshot(Path("S"))
    assert cli.main(["spectrum", "--config-json", json.dumps({"spectrum": {}}), "S/final.zarr", *args]) == 1
    one_line_error(capsys)
    assert snapshot(Path("S")) == before
    assert not Path("T").exists() or not any(Path("T").iterdir())  # nothing written before the refusal


def test_spectrum_default_eigenvalue_store_is_never_its_input(tmp_path, monkeypatch) -> None:
    """`spectrum S/final.zarr --out S/final.parquet`: the eigenvalues go beside the table, not over S/final.zarr."""
    monkeypatch.chdir(tmp_path)
    covariance_store(Path("S/final.zarr"))
    before = snapshot(Path("S/final.zarr"))
    assert (
        cli.main(
            ["spectrum", "--config-json", json.dumps({"spectrum": {}}), "S/final.zarr", "--out", "S/final.parquet"]
        )
        == 0
    )
    assert snapshot(Path("S/final.zarr")) == before
    assert (
        eigenvalue_path("S/final.parquet") == Path("S/final.eigenvalues.zarr")
        and Path("S/final.eigenvalues.zarr").is_dir()
    )


def test_a_stage_replaces_its_own_earlier_output(tmp_path, capsys) -> None:
    cov = covariance_store(tmp_path / "cov.zarr")
    cfg = json.dumps({"spectrum": {}})
    out = tmp_path / "t.csv"
    for _ in range(2):
        assert cli.main(["spectrum", "--config-json", cfg, str(cov), "--out", str(out)]) == 0
    assert cli.main(["dimensions", "--spectra", str(out), "--out", str(tmp_path / "d.parquet")]) == 0
    assert cli.main(["dimensions", "--spectra", str(out), "--out", str(tmp_path / "d.parquet")]) == 0
    # a spectrum table is not a dimensions table, nor the other way round
    assert cli.main(["dimensions", "--spectra", str(out), "--out", str(tmp_path / "t.eigenvalues.zarr")]) == 1
    one_line_error(capsys, "t.eigenvalues.zarr", "is not an eigpipe dimensions table")


# ---- each kind recognises its own artifacts and nothing else ----------------------------------------------------


def _table(path: Path, source: bool) -> Path:
    row = dict.fromkeys(TABLE_COLUMNS, 1) | ({"source": "x"} if source else {})
    frame = pd.DataFrame([row])
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
    return path


def _run_folder(path: Path) -> Path:
    save_checkpoint(path / "final.pt", torch.nn.Linear(1, 1), {"run": "r"})
    save_checkpoint(path / "snapshots" / "0.pt", torch.nn.Linear(1, 1), {"run": "r"})
    RunFolder(path, "f").save_state({"iteration": 0})
    (path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 0.5}\n')
    return path


def _link_to_users_folder(inside: Path) -> None:
    """Replace a folder of the run by a symbolic link to a copy of it elsewhere (the user's, with a file of theirs)."""
    mine = inside.parent.parent / f"mine-{inside.name}"
    shutil.move(inside, mine)
    (mine / "notes.txt").write_text("mine")
    inside.symlink_to(mine, target_is_directory=True)


def _report(path: Path) -> Path:
    path.mkdir()
    (path / MARKER).write_text(json.dumps({"kind": REPORT_KIND}))
    (path / "spectra.csv").write_text("run\n")
    return path


def _dataset(path: Path) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps(dict.fromkeys(("counts", "classes", "seed", "provenance"), 0)))
    return path


ARTIFACTS: dict[str, Callable[[Path], Path]] = {
    "covariance store": lambda d: covariance_store(d / "c.zarr"),
    "eigenvalue store": lambda d: store.write_store(d / "e.zarr", store.EIGENVALUE_KIND, {}, {}, {}),
    "spectrum table (parquet)": lambda d: _table(d / "t.parquet", source=False),
    "spectrum table (csv)": lambda d: _table(d / "t.csv", source=False),
    "dimensions table": lambda d: _table(d / "d.parquet", source=True),
    "evaluation": lambda d: (d / "e.json").write_text(json.dumps(dict.fromkeys(EVAL_KEYS, 1))) and d / "e.json",
    "widths spec": lambda d: (d / "w.yaml").write_text(yaml.safe_dump({"derivation": {"source": {}}})) and d / "w.yaml",
    "run folder": lambda d: _run_folder(d / "run"),
    "report folder": lambda d: _report(d / "report"),
    "dataset": lambda d: _dataset(d / "data"),
}
EVAL_KEYS = ("bbox", "complexity", "checkpoint_sha256")
KINDS = {
    "covariance store": store.COVARIANCE_STORE,
    "eigenvalue store": store.EIGENVALUE_STORE,
    "spectrum table (parquet)": SPECTRUM_TABLE,
    "spectrum table (csv)": SPECTRUM_TABLE,
    "dimensions table": DIMENSIONS_TABLE,
    "evaluation": EVALUATION,
    "widths spec": WIDTHS_SPEC,
    "run folder": RUN_FOLDER,
    "report folder": REPORT_FOLDER,
    "dataset": DATASET,
}


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_each_kind_recognises_only_its_own_artifacts(tmp_path, artifact) -> None:
    path = ARTIFACTS[artifact](tmp_path)
    recognised = {name for name, kind in KINDS.items() if kind.is_own(path)}
    mine = {name for name, kind in KINDS.items() if kind is KINDS[artifact]}
    assert recognised == mine


@pytest.mark.parametrize(
    "spoil",
    [
        lambda run: (run / "notes.txt").write_text("mine"),  # a file a run never writes
        lambda run: (run / "final.pt").write_bytes(b"my own weights"),  # a final.pt that is no eigpipe checkpoint
        lambda run: torch.save({"weights": torch.zeros(1)}, run / "snapshots" / "9.pt"),  # another tool's torch file
        lambda run: torch.save({"iteration": 3}, run / "resume" / "state.pt"),  # a state without its fingerprint
        lambda run: (run / "metrics.jsonl").write_text('{"my": "experiment log"}\n'),  # a log of the user's
        lambda run: _link_to_users_folder(run / "snapshots"),  # written through, it would replace the user's 0.pt
        lambda run: _link_to_users_folder(run / "resume"),
    ],
)
def test_a_run_folder_with_anything_foreign_is_not_a_run_folder(tmp_path, spoil) -> None:
    run = _run_folder(tmp_path / "run")
    assert RUN_FOLDER.is_own(run)
    spoil(run)
    assert not RUN_FOLDER.is_own(run)


@pytest.mark.parametrize(
    ("artifact", "inside"), [("dataset", "notes.txt"), ("covariance store", "body.conv1/mine.txt")]
)
def test_an_output_folder_holding_a_users_file_is_not_replaced(tmp_path, artifact, inside) -> None:
    """Replacing the folder would delete the file: it is refused as not the stage's own."""
    folder = ARTIFACTS[artifact](tmp_path)
    assert KINDS[artifact].is_own(folder)
    (folder / inside).write_text("mine")
    assert not KINDS[artifact].is_own(folder)


@pytest.mark.parametrize("artifact", ["covariance store", "dataset", "run folder"])
def test_only_eigpipes_own_temp_names_are_litter_a_users_hidden_file_is_kept(tmp_path, artifact) -> None:
    folder = ARTIFACTS[artifact](tmp_path)
    (folder / provenance.temp_sibling(folder / "chunk").name).write_text("litter of a killed publication")
    assert KINDS[artifact].is_own(folder)
    (folder / ".notes.tmp-keep").write_text("mine")
    assert not KINDS[artifact].is_own(folder)
    with pytest.raises(EigpipeError, match="exists and is not"):
        outputs.claim_outputs((folder, KINDS[artifact]))
    assert (folder / ".notes.tmp-keep").read_text() == "mine"


def test_a_folder_of_report_named_files_without_the_marker_is_no_report_folder(tmp_path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.md").write_text("my notes")
    assert not REPORT_FOLDER.is_own(tmp_path / "mine")


def test_empty_output_folders_are_claimable_files_are_not_folders(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert REPORT_FOLDER.is_own(tmp_path / "empty") and RUN_FOLDER.is_own(tmp_path / "empty")
    assert store.COVARIANCE_STORE.is_own(tmp_path / "empty")  # an empty folder: nothing in it can be lost
    assert not SPECTRUM_TABLE.is_own(tmp_path / "empty")  # a folder where a file goes


def test_a_failed_stage_leaves_no_folder_it_would_have_made(tmp_path, capsys) -> None:
    out = tmp_path / "new" / "sub" / "t.parquet"
    assert cli.main(["spectrum", str(tmp_path / "missing.zarr"), "--out", str(out)]) == 1
    assert "store not found" in capsys.readouterr().err and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    assert cli.main(["spectrum", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "file" / "t.parquet")]) == 1
    assert "cannot be written there" in capsys.readouterr().err
