"""The one table of stages: CLI name, the config sections each reads, its entry function and its path arguments.

The CLI builds its subcommands from this table, and the workflow takes each rule's params (the sections)
and code hash (the entry module and what it imports) from it. Every entry function is called as
``function(cfg, **paths)``: ``cfg`` holds exactly the validated sections named here (``seed`` included
where it is read), and the keyword arguments are the stage's paths and flags.
"""

from __future__ import annotations

import importlib
import re
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
    output: bool = False  # a path the stage writes (claimed before any work; see eigpipe.outputs)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    sections: tuple[str, ...]
    entry: str  # "module:function"
    args: tuple[Arg, ...] = ()
    config_required: bool = True  # False: without --config / --config-json, the schema's defaults

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    def function(self) -> Callable[..., Any]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


def _path(*flags: str, help: str, required: bool = True, output: bool = False, **options: Any) -> Arg:
    return Arg(flags, {"type": path_argument, "required": required, "help": help, **options}, output=output)


def path_argument(text: str) -> Path:
    """An argparse type: a path (an empty one would be the current folder) that, where it exists, is a file or a
    folder (config.is_special_file)."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    from eigpipe.config import SPECIAL_FILE, is_special_file

    path = Path(text)
    if is_special_file(path):
        raise argparse.ArgumentTypeError(f"{text}: {SPECIAL_FILE}")
    return path


def _out(*flags: str, help: str, **options: Any) -> Arg:
    """An output path: never a foreign file or folder, never an input (see eigpipe.outputs)."""
    return _path(*flags, help=help, output=True, **options)


INTEGER = re.compile(r"\s*-?[0-9]+\s*")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses


def _whole(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _integer(text, 0, f"{text!r} is not a whole number >= 0")


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _integer(text, 1, f"{text!r} is not a whole number >= 1")


def _per_layer(text: str) -> tuple[str, int]:
    """An argparse type: ``[GLOB=]N``, a whole number for the layers GLOB matches (all without one)."""
    glob, _, number = text.rpartition("=")
    return glob or "*", _integer(number, None, f"{text!r} is not [GLOB=]N with N a whole number")


def _integer(text: str, least: int | None, message: str) -> int:
    import argparse

    if not INTEGER.fullmatch(text) or (least is not None and int(text) < least):
        raise argparse.ArgumentTypeError(message)
    return int(text)


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
            (_out("--out", help="dataset folder to create"),),
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
            "check-config",
            "check a study file (then any overlays, merged) as the workflow does at DAG start",
            (),
            "eigpipe.study:check_files",
            (
                Arg(
                    ("files",),
                    {"type": path_argument, "nargs": "+", "metavar": "STUDY", "help": "study YAML, then overlays"},
                ),
            ),
        ),
        Stage(
            "import",
            "a published checkpoint (torchvision, detectron2, mmdetection) as an eigpipe checkpoint",
            (),
            "eigpipe.models.published.stage:import_checkpoint",
            (
                Arg(("--preset",), {"metavar": "NAME", "help": "<family>/<upstream config name> (README)"}),
                Arg(
                    ("--from",),
                    {
                        "choices": ["torchvision", "detectron2", "mmdet"],
                        "dest": "family",
                        "help": "another file of this family (architecture read off the file)",
                    },
                ),
                _path("--weights", help="the published weights file (.pth / .pkl), read in place"),
                _out("--out", help="eigpipe checkpoint to write"),
                Arg(("--run",), {"help": "run name (default: the preset's config name or the file's stem)"}),
                Arg(
                    ("--init",),
                    {
                        "choices": ["pretrained", "scratch"],
                        "help": "how the upstream training started (default: the preset's)",
                    },
                ),
                Arg(("--schedule",), {"help": "label: the upstream schedule (default: the preset's)"}),
                Arg(("--source",), {"dest": "source_label", "help": "label: where the file comes from"}),
                Arg(("--pixel-mean",), {"type": float, "nargs": 3, "metavar": "V", "help": "with --from"}),
                Arg(("--pixel-std",), {"type": float, "nargs": 3, "metavar": "V", "help": "with --from"}),
                Arg(("--channel-order",), {"choices": ["RGB", "BGR"], "help": "with --from: what the stem conv reads"}),
                Arg(("--category-ids",), {"type": int, "nargs": "+", "help": "dataset category id of each class"}),
                Arg(
                    ("--model-json",),
                    {"metavar": "JSON", "help": "test-time model keys, e.g. '{\"min_size\": 600}' (README)"},
                ),
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
                _out("--out", help="run folder (final.pt, metrics.jsonl, resume/)"),
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
                _out("--out", help="run folder (final.pt, snapshots/, metrics.jsonl, resume/)"),
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
                _out("--out", help="metrics JSON"),
                _out(
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
                _out("--out", help="STORE.zarr"),
                THREADS,
            ),
        ),
        Stage(
            "analyze",
            "covariance store of a torchvision (or timm) classifier's layers on a folder of images",
            (),
            "eigpipe.spectral.analyze:analyze",
            (
                Arg(
                    ("--model",),
                    {"required": True, "dest": "model_spec", "help": "torchvision:NAME (e.g. resnet50) or timm:NAME"},
                ),
                _path("--weights", help="state dict file (default: random weights)", required=False),
                _path("--images", help="folder of images (searched recursively)"),
                Arg(("--layers",), {"nargs": "+", "required": True, "help": "selectors: GLOB or Type:GLOB"}),
                _out("--out", help="STORE.zarr"),
                Arg(("--batch-size",), {"type": _positive, "default": 16, "help": "images per forward pass"}),
                Arg(("--max-images",), {"type": _positive, "help": "at most this many images (sorted by path)"}),
                Arg(("--precision",), {"choices": ["float64", "float32"], "default": "float64"}),
                Arg(
                    ("--channel-axis",),
                    {
                        "type": _per_layer,
                        "nargs": "+",
                        "metavar": "[GLOB=]AXIS",
                        "help": "where the channels are (default by rank: [N,C], [N,T,C] tokens, [N,C,H,W]), e.g. -1 "
                        "for channels-last maps; GLOB=AXIS for the layers it matches (the first match applies)",
                    },
                ),
                Arg(
                    ("--output-index",),
                    {
                        "type": _per_layer,
                        "nargs": "+",
                        "metavar": "[GLOB=]INDEX",
                        "help": "the element of a layer's tuple output to take",
                    },
                ),
                Arg(
                    ("--prefix-tokens",),
                    {"type": _whole, "default": 0, "help": "leading CLS/register tokens of [N,T,C] outputs"},
                ),
                Arg(
                    ("--prefix",),
                    {
                        "choices": ["drop", "keep", "only"],
                        "default": "drop",
                        "help": "the prefix tokens: dropped, kept as ordinary tokens, or taken alone",
                    },
                ),
                Arg(("--device",), {"choices": ["auto", "cpu", "cuda"], "default": "auto"}),
                Arg(("--threads",), {"type": _positive, "help": "torch CPU threads"}),
            ),
            config_required=False,
        ),
        Stage(
            "spectrum",
            "eigenvalues and dimension measures of a covariance store",
            ("spectrum",),
            "eigpipe.spectral.spectrum:decompose",
            (
                Arg(("store_path",), {"type": path_argument, "metavar": "STORE"}),
                _out("--out", help="table (.parquet or .csv)"),
                _out(
                    "--eigenvalues",
                    help="eigenvalue zarr (default: beside --out)",
                    required=False,
                    dest="eigenvalues_out",
                ),
            ),
            config_required=False,
        ),
        Stage(
            "dimensions",
            "one table of all snapshots of a run",
            (),
            "eigpipe.spectral.dimensions:dimensions",
            (
                _path("--spectra", help="spectrum tables of one run", nargs="+"),
                _out("--out", help="dimensions table"),
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
                _out("--out", help="widths spec YAML with its derivation record"),
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
                _out("--out-dir", help="report folder"),
            ),
            config_required=False,
        ),
    )
}
