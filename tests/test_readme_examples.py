"""The README's library examples run as written: every code block marked ``<!-- example: NAME -->``, in order, in a
fresh folder (Python blocks in this process, shell blocks in bash with `eigpipe` on the PATH)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eigpipe.spectral import store

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- example: (\w+) -->\n```(python|bash)\n(.*?)```", re.S)


def examples() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    for name, language, code in BLOCK.findall((ROOT / "README.md").read_text()):
        found.setdefault(name, []).append((language, code))
    return found


def run_blocks(name: str, folder: Path) -> None:
    shims = folder / ".bin"
    shims.mkdir(exist_ok=True)
    (shims / "eigpipe").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m eigpipe.cli "$@"\n')
    (shims / "eigpipe").chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for language, code in examples()[name]:
        if language == "python":
            exec(compile(code, f"README example {name}", "exec"), {"__name__": "__main__"})
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=folder, env=env, capture_output=True)
            assert done.returncode == 0, done.stderr.decode()[-3000:]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with images/<class>/*.png, as the ResNet example reads them."""
    rng = np.random.default_rng(0)
    for index in range(4):
        path = tmp_path / "images" / ("dark" if index % 2 else "light") / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_marked_example_is_run_here() -> None:
    assert set(examples()) == {"resnet", "vit", "training"}


def test_resnet_on_a_folder_of_images(folder: Path, capsys: pytest.CaptureFixture) -> None:
    run_blocks("resnet", folder)
    attrs, layers = store.read_store(folder / "resnet18.zarr", store.COVARIANCE_KIND, ("second_moment", "mean"))
    assert attrs["n_images"] == 4 and len(layers) == 20 and "layer4.1.conv2" in layers and "avgpool" in layers
    assert "[20 rows x 6 columns]" in capsys.readouterr().out


def test_vision_transformer_tokens(folder: Path, capsys: pytest.CaptureFixture) -> None:
    run_blocks("vit", folder)
    printed = capsys.readouterr().out
    assert "encoder.layers.encoder_layer_3.mlp.0" in printed and "encoder.ln" in printed


def test_training_loop_dynamics_through_dimensions_and_report(folder: Path) -> None:
    run_blocks("training", folder)
    with pytest.warns(UserWarning, match="holds 4 covariance store"):
        run_blocks("training", folder)  # the recipe runs again as written, over its own outputs
    dims = pd.read_parquet(folder / "my-cnn.parquet")
    assert sorted(set(dims["iteration"])) == [8, 16, 24, 32] and set(dims["layer"]) == {"0", "2", "6"}
    assert (dims["n_images"] == 8 * 16).all() and set(dims["run"]) == {"my-cnn"}
    assert (folder / "report" / "dynamics.png").stat().st_size > 0
