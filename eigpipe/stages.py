"""The one table of stages: CLI name, the config sections each reads, its entry function and its path arguments.

The CLI builds its subcommands from this table, and the workflow takes each rule's params (the sections)
and code hash (the entry module and what it imports) from it. Every entry function is called as
``function(cfg, **paths)``: ``cfg`` holds exactly the validated sections named here (``seed`` included
where it is read), and the keyword arguments are the stage's paths and flags.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Arg:
    """One command-line argument: argparse flags and options; ``override`` names the config key
    ("section.key") that the value replaces, so the schema validates it like the config's own."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    override: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    sections: tuple[str, ...]
    entry: str  # "module:function"
    args: tuple[Arg, ...] = ()

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    def function(self) -> Callable[..., Any]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


def _path(*flags: str, help: str, required: bool = True, **options: Any) -> Arg:
    return Arg(flags, {"type": Path, "required": required, "help": help, **options})


CHECKPOINT = _path("--checkpoint", help="an eigpipe checkpoint (or a torchvision ResNet state dict)")
ANNOTATIONS = _path("--data", help="instances JSON of the split", dest="annotations")
IMAGE_DIR = _path("--image-dir", help="folder of the split's images", dest="images")
# Every stage that reads the runtime section: rules pass the job's `{threads}`, so --set-threads and --cores reach it.
THREADS = Arg(
    ("--threads",), {"type": int, "help": "torch CPU threads (overrides runtime.threads)"}, override="runtime.threads"
)

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "synth-data",
            "generate the synthetic detection + classification dataset",
            ("data", "seed"),
            "eigpipe.data.synthetic:generate",
            (_path("--out", help="dataset folder to create"),),
        ),
        Stage(
            "check-data",
            "check a COCO-format split: its records and every image file (decoded)",
            (),
            "eigpipe.data.checks:check_data",
            (
                _path("--annotations", "--data", help="COCO instances JSON", dest="annotations"),
                _path("--images", "--image-dir", help="folder of the images", dest="images"),
                Arg(("--strict",), {"action": "store_true", "help": "imperfect boxes are errors"}),
                Arg(("--jobs",), {"type": int, "default": 1, "help": "images decoded in parallel (>= 1)"}),
            ),
        ),
        Stage(
            "complexity",
            "params and MACs of backbone body, FPN and detector",
            ("model",),
            "eigpipe.complexity:report",
            (
                Arg(("--input-size",), {"type": int, "nargs": 2, "default": (224, 224), "metavar": ("H", "W")}),
                Arg(("--num-classes",), {"type": int, "default": 91, "help": "classes including background"}),
            ),
        ),
        Stage(
            "pretrain",
            "classification pre-training (the ImageNet stand-in)",
            ("model", "pretrain", "runtime", "seed"),
            "eigpipe.train.loop:train_classifier",
            (
                _path("--data", help="image-folder root with train/ (and val/)"),
                _path("--out", help="run folder (final.pt, metrics.jsonl, resume/)"),
                THREADS,
            ),
        ),
        Stage(
            "train",
            "detector training",
            ("model", "train", "data", "runtime", "seed"),
            "eigpipe.train.loop:train_detector",
            (
                Arg(
                    ("--model",),
                    {"choices": ["faster_rcnn", "mask_rcnn"], "default": "faster_rcnn", "dest": "model_name"},
                ),
                Arg(("--init",), {"default": "scratch", "help": "scratch | pretrained:<checkpoint or weights>"}),
                ANNOTATIONS,
                IMAGE_DIR,
                _path("--out", help="run folder (final.pt, snapshots/, metrics.jsonl, resume/)"),
                THREADS,
            ),
        ),
        Stage(
            "evaluate",
            "COCO bbox (and segm) AP of a checkpoint on a split",
            ("evaluate", "runtime"),
            "eigpipe.evaluate:evaluate_checkpoint",
            (
                CHECKPOINT,
                ANNOTATIONS,
                IMAGE_DIR,
                _path("--out", help="metrics JSON"),
                _path(
                    "--matches",
                    help="per-image matching for the report's bootstrap (default: beside --out, .matches.npz)",
                    required=False,
                    dest="matches_out",
                ),
                THREADS,
            ),
        ),
        Stage(
            "covariance",
            "feature covariance of every selected layer into a zarr store",
            ("covariance", "runtime", "seed"),
            "eigpipe.spectral.extract:extract",
            (
                CHECKPOINT,
                ANNOTATIONS,
                IMAGE_DIR,
                Arg(
                    ("--images",),
                    {"type": int, "dest": "num_images", "help": "number of images"},
                    override="covariance.images",
                ),
                Arg(
                    ("--layers",),
                    {"nargs": "+", "help": "selectors: preset 'default', GLOB or Type:GLOB"},
                    override="covariance.layers",
                ),
                Arg(
                    ("--precision",),
                    {"help": "Gram products in float64 (exact) or float32 (faster)"},
                    override="covariance.precision",
                ),
                _path("--out", help="STORE.zarr"),
                THREADS,
            ),
        ),
        Stage(
            "spectrum",
            "eigenvalues and dimension measures of a covariance store",
            ("spectrum",),
            "eigpipe.spectral.spectrum:decompose",
            (
                Arg(("store_path",), {"type": Path, "metavar": "STORE"}),
                _path("--out", help="table (.parquet or .csv)"),
                _path(
                    "--eigenvalues",
                    help="eigenvalue zarr (default: beside --out)",
                    required=False,
                    dest="eigenvalues_out",
                ),
            ),
        ),
        Stage(
            "dimensions",
            "one table of all snapshots of a run",
            (),
            "eigpipe.spectral.dimensions:dimensions",
            (
                _path("--spectra", help="spectrum tables of one run", nargs="+"),
                _path("--out", help="dimensions table"),
            ),
        ),
        Stage(
            "widths",
            "derive layer widths from a run's eigenspectrum",
            ("widths",),
            "eigpipe.spectral.widths:derive",
            (
                _path("--dimensions", help="dimensions table of the source run"),
                _path("--checkpoint", help="the source run's checkpoint (model, widths, classes)"),
                _path("--out", help="widths spec YAML with its derivation record"),
            ),
        ),
        Stage(
            "report",
            "plots and tables of a study",
            ("report",),
            "eigpipe.report:make_report",
            (
                _path("--dimensions", help="dimensions tables", nargs="+"),
                _path("--eigenvalues", help="eigenvalue zarrs (final models)", nargs="+", required=False, default=[]),
                _path("--evaluations", help="evaluation JSONs", nargs="*", required=False, default=[]),
                _path(
                    "--widths", help="derived widths YAMLs", nargs="*", required=False, default=[], dest="widths_files"
                ),
                _path(
                    "--matches",
                    help="per-image matching files of the evaluations (AP intervals over images)",
                    nargs="*",
                    required=False,
                    default=[],
                ),
                _path("--out-dir", help="report folder"),
            ),
        ),
    )
}
