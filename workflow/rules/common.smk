# Helpers for the rules in this folder: config sections as params, code hashes, paths, input functions.
# Which sections a stage reads and which code it runs come from the package's stage table
# (eigpipe.stages.STAGES); nothing here repeats it.
import re
from pathlib import Path

from eigpipe.codehash import code_hash
from eigpipe.config import detector_schedule, dumps
from eigpipe.stages import STAGES


# The software of every job (relative to the rule files). Snakemake records the file with each output;
# on a cluster, run Snakemake inside the env made from it. (--sdm conda cannot build it: Snakemake
# copies the file under .snakemake/conda/, where its editable install of this repository breaks.)
CONDA_ENV = "../../environment.yml"

MODELS = config["train"]["models"]
INITS = config["train"]["inits"]
DETECTOR_RUNS = [f"{model}-{init}" for model in MODELS for init in INITS]
# snapshots every detector run has (each run's steps may differ: train.steps_by_init)
SHORTEST_RUN = min(detector_schedule(config["train"], init)["steps"] for init in INITS)
SNAPSHOTS = sorted(i for i in set(config["train"]["schedule"]["snapshots"]) if i < SHORTEST_RUN)
THREADS = config["runtime"]["threads"]

wildcard_constraints:
    study=re.escape(config["study"]),
    model="|".join(MODELS),
    init="|".join(INITS),
    run="|".join([*DETECTOR_RUNS, "classifier"]),
    split="train|val",
    iteration=r"\d+|final",


# ---- config sections as params (what makes reruns incremental, with code_hash(stage)) ----


def stage_config(stage):
    """Params value: the JSON of only the config sections the stage reads (`--config-json`).

    A callable, so that Snakemake does not take braces in the JSON for wildcards.
    """
    text = dumps({name: config[name] for name in STAGES[stage].sections})
    return lambda wildcards: text


def detector_config(wildcards):
    """train_detector's sections, train narrowed to the job's own run and schedule: adding a model or an
    init to a study, or changing another init's steps, must not rerun the runs that exist."""
    schedule = detector_schedule(config["train"], wildcards.init)
    train = {"models": [wildcards.model], "inits": [wildcards.init], "schedule": schedule}
    sections = {name: config[name] for name in STAGES["train"].sections}
    return dumps({**sections, "train": train})


def launcher(gpus):
    """Shell prefix: torchrun over the job's GPUs when it has several, one plain process otherwise."""
    gpus = int(gpus or 0)
    return f"torchrun --standalone --nproc_per_node {gpus} --no-python" if gpus > 1 else ""


def launch(wildcards, resources):
    return launcher(resources.gpu)


def parent_of(name):
    """Params value: the folder of output `name` (stages that take an output folder)."""
    return lambda wildcards, output: str(Path(output[name]).parent)


# ---- datasets ----


def dataset_input(wildcards):
    """What a stage waits for: the generated synthetic dataset, or the checked COCO splits."""
    if config["data"]["source"] == "synthetic":
        return f"results/{wildcards.study}/data"
    return expand("results/{study}/checks/{split}.txt", study=wildcards.study, split=["train", "val"])


def split_paths(split):
    """(annotations JSON, image folder) of a split, as params patterns."""
    if config["data"]["source"] == "coco":
        coco = config["data"]["coco"]
        return coco[f"{split}_annotations"], coco[f"{split}_images"]
    return f"results/{{study}}/data/detection/instances_{split}.json", f"results/{{study}}/data/detection/{split}"


def coco_split(wildcards):
    annotations, images = split_paths(wildcards.split)
    return {"annotations": annotations, "images": images}


# ---- checkpoints and runs ----


def classifier_checkpoint(wildcards):
    if config["pretrain"]["source"] == "torchvision":
        return config["pretrain"]["weights"]
    return f"results/{wildcards.study}/pretrain/final.pt"


def init_input(wildcards):
    return {"init": classifier_checkpoint(wildcards)} if wildcards.init == "pretrained" else {}


def init_arg(wildcards, input):
    return f"pretrained:{input.init}" if wildcards.init == "pretrained" else "scratch"


def iterations(run):
    return ["final"] if run == "classifier" else [*map(str, SNAPSHOTS), "final"]


def covariance_checkpoint(wildcards):
    if wildcards.run == "classifier":
        return classifier_checkpoint(wildcards)
    if wildcards.iteration == "final":
        return f"results/{wildcards.study}/train/{wildcards.run}/final.pt"
    return f"results/{wildcards.study}/train/{wildcards.run}/snapshots/{wildcards.iteration}.pt"


def run_spectra(wildcards):
    return expand(
        "results/{study}/spectrum/{run}/{iteration}.parquet",
        study=wildcards.study,
        run=wildcards.run,
        iteration=iterations(wildcards.run),
    )


REPORT_FILES = ["eigenvalues.png", "dimensions.png", "dynamics.png", "summary.csv", "evaluation.csv"]


def report_outputs():
    return expand("results/{study}/report/{name}", study=config["study"], name=REPORT_FILES)
