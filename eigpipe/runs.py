"""The runs of a study: every detector to train (model x init x seed, and each derived widths spec), by name.

A run is named ``<model>-<init>`` (``pretrained`` or ``scratch``) or, for a model trained from scratch with
widths derived from the eigenspectrum, ``<model>-derived`` (``<model>-derived-<measure>`` when several
measures are derived). A replicate trained with a seed other than the study's ``seed`` gets the suffix
``-s<seed>``, so the study seed's runs keep their names whether or not replicates are asked for. Runs imported
from published checkpoints (the config's ``imports``) keep the names the config gives them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from eigpipe.config import detector_schedule
from eigpipe.errors import ConfigError

SEED_SUFFIX = re.compile(r"-s(\d+)$")


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    init: str  # how the weights start: pretrained | scratch
    seed: int
    widths: str | None = None  # name of the derived widths spec, None for the configured widths
    measure: str | None = None
    imported: bool = False  # from a published checkpoint (eigpipe import), not trained

    @property
    def group(self) -> str:
        """The name without the seed suffix: the row of the comparison table."""
        return group_of(self.name)


def group_of(name: str) -> str:
    return SEED_SUFFIX.sub("", name)


def seeds(config: dict) -> list[int]:
    return list(config["train"]["seeds"] or [config["seed"]])


def imported_runs(config: dict) -> dict[str, Run]:
    """Runs imported from published checkpoints, by name. Their model is a label read off the preset's name
    (the presets live beside the importers, which need torch; the Snakefile does not)."""
    found = {}
    for name, entry in config.get("imports", {}).items():
        preset = entry.get("preset") or ""
        model = "mask_rcnn" if "mask" in preset else "faster_rcnn" if preset else "imported"
        found[name] = Run(name, model, entry["init"], config["seed"], imported=True)
    return found


def derived_specs(config: dict) -> dict[str, tuple[str, str]]:
    """{widths spec name: (model, measure)}: one derived spec per model and measure (none if disabled)."""
    widths = config["widths"]
    if not widths["enabled"]:
        return {}
    if widths["source_run"] is None and widths["source_init"] not in config["train"]["inits"]:
        return {}
    if widths["source_run"] is not None and widths["source_run"] not in base_runs(config):
        raise ConfigError(f"widths.source_run: {widths['source_run']} is no trained or imported run of the study")
    measures = widths["measures"] or [widths["measure"]]
    several = len(measures) > 1
    return {
        f"{model}-derived-{measure}" if several else f"{model}-derived": (model, measure)
        for model in config["train"]["models"]
        for measure in measures
    }


def detector_runs(config: dict) -> dict[str, Run]:
    """Every detector run of the study, by name, in a stable order."""
    runs: dict[str, Run] = {}
    for seed in seeds(config):
        suffix = "" if seed == config["seed"] else f"-s{seed}"
        for model in config["train"]["models"]:
            for init in config["train"]["inits"]:
                runs[f"{model}-{init}{suffix}"] = Run(f"{model}-{init}{suffix}", model, init, seed)
        for name, (model, measure) in derived_specs(config).items():
            runs[f"{name}{suffix}"] = Run(f"{name}{suffix}", model, "scratch", seed, widths=name, measure=measure)
    clash = sorted(set(runs) & set(imported_runs(config)))
    if clash:
        raise ConfigError(f"imports: {clash[0]} is also the name of a trained run; give the import another name")
    return {**runs, **imported_runs(config)}


def analysed_runs(config: dict) -> list[str]:
    """Runs whose spectra are measured: the study seed's runs (replicates only for accuracy)."""
    return [name for name, run in detector_runs(config).items() if run.seed == config["seed"]]


def replicate_runs(config: dict) -> list[str]:
    """Replicates (seeds other than the study's) of the configured-width runs: their final spectra give the
    pre-trained vs scratch comparison of the spectra its spread over seeds."""
    return [name for name, run in detector_runs(config).items() if run.seed != config["seed"] and not run.widths]


def snapshots(config: dict) -> list[int]:
    """Snapshot iterations every base run has (each init's steps may differ: train.steps_by_init)."""
    if not config["train"]["inits"]:
        return []
    shortest = min(detector_schedule(config["train"], init)["steps"] for init in config["train"]["inits"])
    return sorted(i for i in set(config["train"]["schedule"]["snapshots"]) if i < shortest)


def source_run(config: dict, model: str) -> str:
    """The run whose eigenspectrum sets a derived spec's widths: ``widths.source_run`` (a trained or imported
    run), else the study seed's ``<model>-<widths.source_init>``."""
    return config["widths"]["source_run"] or f"{model}-{config['widths']['source_init']}"


def base_runs(config: dict) -> list[str]:
    """Names of the base runs (trained at the study seed, or imported) that may be the source of widths."""
    runs = [f"{model}-{init}" for model in config["train"]["models"] for init in config["train"]["inits"]]
    return runs + list(imported_runs(config))
