"""A whole study, checked at DAG start: the schema and every section's own rules (eigpipe.config), the rules
that span sections, and the files the config names, so that a value a stage would refuse fails before any job
is planned, in one line naming the file and the key."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from eigpipe import config as cfg
from eigpipe.errors import ConfigError, EigpipeError
from eigpipe.outputs import resolved

RUNAWAY = re.compile(r"(.+)\1{19}$")  # Snakemake's PeriodicityDetector (snakemake/io): 20 repeats at the end


def _violations(study: dict) -> Iterator[tuple[str, str]]:
    """Rules that span sections: the derived widths need their source run, and a source snapshot that exists."""
    from eigpipe.runs import base_runs, imported_runs

    widths, inits = study["widths"], study["train"]["inits"]
    if not widths["enabled"]:
        return
    source = widths["source_run"]
    if source is None and widths["source_init"] not in inits:
        hint = "add it, name a run in widths.source_run, or set widths.enabled: false"
        yield "widths.source_init", f"{widths['source_init']} is not in train.inits {inits}, so no widths ({hint})"
    runs = base_runs(study)
    if source is not None and source not in runs:
        yield "widths.source_run", f"{source} is no trained or imported run of the study ({', '.join(sorted(runs))})"
    snapshots, iteration = sorted(study["train"]["schedule"]["snapshots"]), widths["source_iteration"]
    imported = source is not None and source in imported_runs(study)
    if iteration is not None and (imported or iteration not in snapshots):
        hint = "null takes the final model"
        yield "widths.source_iteration", f"{iteration} is not one of train.schedule.snapshots {snapshots} ({hint})"


def _budget_violations(study: dict) -> Iterator[tuple[str, str]]:
    """widths.macs_budget against the narrowest body the derivation can give the source run (every width at its
    floor), which the model section alone fixes: else only the derivation, after training, finds it unreachable."""
    from eigpipe.models.cost import body_cost
    from eigpipe.models.widths import from_model_config, width_floor
    from eigpipe.runs import imported_runs

    widths = study["widths"]
    if not widths["enabled"] or widths["source_run"] in imported_runs(study):  # an import's widths are its file's
        return
    original = from_model_config(study["model"])
    narrowest = original.each_width(
        lambda width: width_floor(width, widths["multiple"], widths["min_width"], widths["min_ratio"])
    )
    side = widths["input_size"] or [study["model"]["min_size"]] * 2
    least, budget = body_cost(narrowest, *side)[1], widths["macs_budget"] * body_cost(original, *side)[1]
    if least > budget:
        yield (
            "widths.macs_budget",
            f"{widths['macs_budget']} x the body's MACs ({budget:,.0f}) is below the {least:,} of its narrowest "
            f"derivable body (every width at widths.min_width {widths['min_width']}, widths.min_ratio "
            f"{widths['min_ratio']}, rounded up to widths.multiple {widths['multiple']}): lower those or raise it",
        )


def _seed_violations(study: dict) -> Iterator[tuple[str, str]]:
    """The study seed's runs are the analysed ones (spectra, derived widths); replicates only add accuracy."""
    seeds = study["train"]["seeds"]
    if seeds and study["seed"] not in seeds:
        hint = "its runs are the ones whose spectra are measured; add it or change seed"
        yield "train.seeds", f"{seeds} lacks the study seed {study['seed']} ({hint})"


def _model_violations(study: dict) -> Iterator[tuple[str, str]]:
    """What the model section must be for the weights it starts from and the batches it trains on."""
    model, pretrain = study["model"], study["pretrain"]
    if pretrain["source"] == "torchvision":
        if model["depths"] != [3, 4, 6, 3] or model["width_multiplier"] != 1 or model["widths"]:
            yield (
                "pretrain.source",
                (
                    "torchvision's ResNet-50 weights fit model.depths [3, 4, 6, 3] at width_multiplier 1 without "
                    "model.widths"
                ),
            )
        if model["norm"] == "gn" and not study["train"]["init_gn_from_bn"]:
            yield (
                "train.init_gn_from_bn",
                (
                    "false, but torchvision's BatchNorm-trained weights initialise the GroupNorm body (model.norm: gn) "
                    "only when it is true"
                ),
            )
    if model["norm"] == "bn":  # a 1 x 1 last stage of one image leaves BatchNorm one value per channel
        sides = {
            "train.schedule.batch_size": (study["train"]["schedule"]["batch_size"], model["min_size"]),
            "pretrain.schedule.batch_size": (
                (pretrain.get("schedule") or {}).get("batch_size"),
                study["data"]["synthetic"]["classification"]["image_size"],
            ),
        }
        for where, (batch, side) in sides.items():
            if batch == 1 and side <= 32:
                yield where, f"1 image of {side} px leaves BatchNorm (model.norm: bn) one value per channel"


def _name_violations(study: dict) -> Iterator[tuple[str, str]]:
    """Names that become folders and run names: no name of dots only (results/.. is outside results/), and an
    import may not take the classifier's run name or look like a replicate's (-s<seed>)."""
    from eigpipe.runs import SEED_SUFFIX

    imports = study.get("imports") or {}
    for where, name in [("study", study["study"]), *((f"imports.{name}", name) for name in imports)]:
        if set(name) == {"."}:
            yield where, f"{name!r} is a name of dots only, which would put results outside results/"
        elif RUNAWAY.search(name):
            yield where, f"{name!r} ends in a part repeated 20 times, which Snakemake takes for a runaway wildcard"
    for name in imports:
        if name == "classifier" or SEED_SUFFIX.search(name):
            what = "the pre-trained classifier's run name" if name == "classifier" else "a replicate's name (-s<seed>)"
            yield f"imports.{name}", f"is {what}; give the import another name"


def user_files(study: dict) -> Iterator[tuple[str, str]]:
    """(key, path) of every file or folder of the user's that the study reads."""
    if study["data"]["source"] == "coco":
        yield from ((f"data.coco.{key}", path) for key, path in study["data"]["coco"].items())
    if study["pretrain"]["source"] != "synthetic":
        yield "pretrain.weights", study["pretrain"]["weights"]
    yield from ((f"imports.{name}.weights", entry["weights"]) for name, entry in (study.get("imports") or {}).items())
    if study["model"]["widths"]:
        yield "model.widths", study["model"]["widths"]


def _file_violations(study: dict) -> Iterator[tuple[str, str]]:
    """The user's files exist and lie outside results/<study>/, which the workflow writes and may delete (a rerun
    replaces an output folder whole; --delete-all-output removes every output)."""
    results = Path("results", study["study"])
    for where, value in user_files(study):
        path = Path(value)
        if not path.exists():  # a link that loops or points nowhere too
            yield where, f"{value}: not found"
        elif cfg.is_special_file(path):
            yield where, f"{value}: {cfg.SPECIAL_FILE}"
        elif message := _inside_results(value, results):
            yield where, message


def _inside_results(value: str, results: Path) -> str | None:
    """Why the user's file ``value`` (which exists) may not lie where it does, or None."""
    try:
        path = resolved(Path(value))
        inside = resolved(results) in (path, *path.parents)
    except EigpipeError as exc:  # results/<study> is a link that loops
        return str(exc)
    return (
        f"{value} is inside {results}/, which the workflow writes and may delete: keep it elsewhere" if inside else None
    )


def _layer_violations(study: dict) -> Iterator[tuple[str, str]]:
    """Layer selectors and report layers against the models the study builds (on torch's meta device: no
    memory). Only for a study that sets its own, since importing torch costs seconds at every DAG start."""
    selectors, wanted = study["covariance"]["layers"], study["report"]["layers"]
    if selectors == ["default"] and not wanted:
        return
    import torch

    from eigpipe.errors import EigpipeError
    from eigpipe.layer_paths import canonical
    from eigpipe.models import Classifier, build_body, build_detector
    from eigpipe.spectral.layers import select_layers

    with torch.device("meta"):
        models = {"the classifier": Classifier(build_body(study["model"]), 2)}
        models.update(
            {f"the {name} detectors": build_detector(name, study["model"], 2) for name in study["train"]["models"]}
        )
    names: set[str] = set()
    for what, model in models.items():
        try:
            names.update(canonical(layer.name) for layer in select_layers(model, selectors))
        except EigpipeError as exc:
            yield "covariance.layers", f"{str(exc).removeprefix('covariance.layers: ')} ({what})"
            return
    for name in wanted:
        if name not in names:
            yield (
                "report.layers",
                f"{name} is not a layer covariance.layers selects (e.g. {', '.join(sorted(names)[:4])})",
            )


def check(study: dict, files: Sequence[str | Path], command_line: bool = False) -> dict:
    """Validate the merged study config in place (defaults filled) and return it. ``files`` are the config files
    Snakemake merged (each is re-read to refuse what its loader lets through, such as a key given twice);
    ``command_line``: ``--config`` values were merged too. Raises ConfigError (one line)."""
    for path in files:
        cfg.read_yaml(path, "config file")
    source = " + ".join([*map(str, files), *(["--config"] if command_line else [])]) or "config"
    cfg.validate(study, source)
    for rules in (_name_violations, _seed_violations, _model_violations, _violations, _file_violations):
        for where, message in rules(study):
            raise ConfigError(f"{source}: {where}: {message}")
    if study["model"]["widths"]:
        try:
            cfg.widths_spec(study["model"]["widths"], study["model"]["depths"])
        except ConfigError as exc:
            raise ConfigError(f"{source}: model.widths: {exc}") from None
    for where, message in [*_budget_violations(study), *_layer_violations(study)]:
        raise ConfigError(f"{source}: {where}: {message}")
    return study


def _merge(into: dict, update: dict) -> None:
    """Nested mappings merged key by key, later files winning (how Snakemake merges several --configfile)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def check_files(_sections: dict[str, Any], files: Sequence[Path]) -> dict:
    """The `eigpipe check-config` command: the study files (a study, then overlays) merged and checked as at DAG
    start. Snakemake parses --configfile itself before the workflow starts, and its message for a file it cannot
    parse names no file; this names the file, line and column."""
    merged: dict = {}
    for path in files:
        data = cfg.read_yaml(path, "config file")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a study file is a mapping of sections")
        _merge(merged, data)
    check(merged, files)
    print(f"{' + '.join(map(str, files))}: a valid study", file=sys.stderr)
    return merged
