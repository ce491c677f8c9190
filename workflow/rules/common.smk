# Helpers for the rules in this folder: config sections as params, code hashes, paths, input functions.
# Which sections a stage reads and which code it runs come from the package's stage table
# (eigpipe.stages.STAGES); nothing here repeats it.
import json
import re
import shlex
from pathlib import Path

from eigpipe import runs
from eigpipe.codehash import code_hash
from eigpipe.config import detector_schedule, dumps
from eigpipe.stages import STAGES


# The software of every job (relative to the rule files). Snakemake records the file with each output;
# on a cluster, run Snakemake inside the env made from it. (--sdm conda cannot build it: Snakemake
# copies the file under .snakemake/conda/, where its editable install of this repository breaks.)
CONDA_ENV = "../../environment.yml"

# Every detector run by name (model x init x seed, and the retrains of derived widths): eigpipe.runs.
RUNS = runs.detector_runs(config)
DERIVED = runs.derived_specs(config)
ANALYSED = runs.analysed_runs(config)  # runs whose spectra are measured (the study seed's)
REPLICATES = runs.replicate_runs(config)  # other seeds' configured-width runs: final spectra only
MEASURED = [*ANALYSED, "classifier", *REPLICATES]  # every run with covariance stores and spectra
SNAPSHOTS = runs.snapshots(config)
THREADS = config["runtime"]["threads"]


def _alternatives(names):
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    study=re.escape(config["study"]),
    detector=_alternatives(RUNS),
    run=_alternatives(MEASURED),
    spec=_alternatives(DERIVED),
    split="train|val",
    iteration=r"\d+|final",


# ---- config sections as params (what makes reruns incremental, with code_hash(stage)) ----


def stage_config(stage):
    """Params value: the JSON of only the config sections the stage reads (`--config-json`).

    A callable, so that Snakemake does not take braces in the JSON for wildcards.
    """
    text = dumps({name: config[name] for name in STAGES[stage].sections})
    return lambda wildcards: text


# Snakemake records in a job's metadata, and compares on the next run (the "params" rerun trigger), only the
# params it can compute when the DAG is built: a param function taking `input`, `output`, `threads` or
# `resources` is "derived" and left out (snakemake/rules.py, Rule._is_deriving_function and expand_params;
# snakemake/persistence/__init__.py, Persistence._params and params_changed). So every config param here is a
# function of the wildcards alone.


def training_data():
    """The keys of `data` training reads: the source, strictness and COCO paths (the synthetic generator's keys
    reach it through the dataset it makes, so editing them in a COCO study retrains nothing)."""
    data = config["data"]
    keys = ("source", "strict", "coco") if data["source"] == "coco" else ("source", "strict")
    return {key: data[key] for key in keys}


def synthetic_data_config(wildcards):
    """synth_data's sections: the generator's keys alone (it makes synthetic data whatever `data.source` says)."""
    return dumps({"data": {"source": "synthetic", "synthetic": config["data"]["synthetic"]}, "seed": config["seed"]})


def detector_config(wildcards):
    """train_detector's sections, narrowed to the job's own run: its model, init, schedule and seed, and
    for a derived run the widths file. Adding a model, an init or a seed to a study, or changing another
    init's steps, must not rerun the runs that exist."""
    run = RUNS[wildcards.detector]
    schedule = detector_schedule(config["train"], run.init)
    train = {"models": [run.model], "inits": [run.init], "schedule": schedule}
    if run.init == "pretrained":
        train["init_gn_from_bn"] = config["train"]["init_gn_from_bn"]
    sections = {name: config[name] for name in STAGES["train"].sections}
    sections["data"] = training_data()
    model = {**config["model"], "widths": widths_file(wildcards.study, run.widths)} if run.widths else config["model"]
    return dumps({**sections, "model": model, "train": train, "seed": run.seed})


def widths_file(study, spec):
    """The widths spec YAML of a derived spec (derive_widths' output)."""
    return f"results/{study}/widths/{spec}.yaml"


def derivation_config(wildcards):
    """The widths section of one derived spec: its own measure."""
    measure = DERIVED[wildcards.spec][1]
    return dumps({"widths": {**config["widths"], "measures": None, "measure": measure}})


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


def dataset_input(split):
    """What a stage of one split waits for: the generated synthetic dataset, or that COCO split checked (so that
    editing the val split reruns no training)."""
    if config["data"]["source"] == "synthetic":
        return "results/{study}/data"
    return f"results/{{study}}/checks/{split}.txt"


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
    if config["pretrain"]["source"] == "detectron2":  # imported (rules/import.smk)
        return f"results/{wildcards.study}/import/classifier.pt"
    return f"results/{wildcards.study}/pretrain/final.pt"


def configured_widths(wildcards):
    """The widths spec file `model.widths` names (none when unset): an input, so editing it reruns its readers."""
    return [config["model"]["widths"]] if config["model"]["widths"] else []


def final_checkpoint(study, run):
    """A detector run's final checkpoint: trained (train/<run>/final.pt) or imported (import/<run>.pt)."""
    if RUNS[run].imported:
        return f"results/{study}/import/{run}.pt"
    return f"results/{study}/train/{run}/final.pt"


def detector_inputs(wildcards):
    """What a detector run reads besides the data: the classifier (pretrained init), its widths spec (derived, or
    the configured one)."""
    run = RUNS[wildcards.detector]
    found = {"init": [], "widths": configured_widths(wildcards)}  # `{input.init}` formats to nothing for scratch
    if run.init == "pretrained":
        found["init"] = classifier_checkpoint(wildcards)
    if run.widths:
        found["widths"] = widths_file(wildcards.study, run.widths)
    return found


# ---- the output cache: the rules it serves (synth_data, pretrain, train_detector) keep paths out of params ----
# Snakemake keys a cached job on its shell template (unformatted), its params, the checksums of its source inputs
# and the keys of the jobs it depends on, never on output names or wildcards. A path in params would put the
# study name in the key, so two studies could not share a trained model: these rules take paths from the shell
# template ({input}, {wildcards}) instead.


def init_kind(wildcards):
    """`--init` up to its checkpoint, which the shell appends from `{input.init}`."""
    return "pretrained:" if RUNS[wildcards.detector].init == "pretrained" else "scratch"


def study_free_split(split):
    """Params: COCO's configured (annotations, images) of a split; synthetic: empty (the shell reads {input.data})."""
    return split_paths(split) if config["data"]["source"] == "coco" else ("", "")


# train_detector's data arguments (a shell fragment)
TRAIN_DATA_ARGS = (
    "--data {params.annotations} --image-dir {params.images}"
    if config["data"]["source"] == "coco"
    else "--data {input.data}/detection/instances_train.json --image-dir {input.data}/detection/train"
)


def model_arg(wildcards):
    return RUNS[wildcards.detector].model


def iterations(run):
    # derived runs: is each layer's width used (final model); replicates: the spread over seeds (final model);
    # imported runs: one published model
    if run == "classifier" or RUNS[run].widths or RUNS[run].imported or run in REPLICATES:
        return ["final"]
    return [*map(str, SNAPSHOTS), "final"]


def derivation_inputs(wildcards):
    """The source run's dimension measures at the source snapshot (its spectrum table: the rows of the run's
    dimensions table at that iteration, ready without waiting for the other snapshots) and its final checkpoint."""
    source = runs.source_run(config, DERIVED[wildcards.spec][0])
    iteration = config["widths"]["source_iteration"]
    snapshot = str(iteration) if iteration in SNAPSHOTS else "final"
    return {
        "dimensions": f"results/{wildcards.study}/spectrum/{source}/{snapshot}.parquet",
        "checkpoint": final_checkpoint(wildcards.study, source),
    }


def covariance_checkpoint(wildcards):
    if wildcards.run == "classifier":
        return classifier_checkpoint(wildcards)
    if wildcards.iteration == "final":
        return final_checkpoint(wildcards.study, wildcards.run)
    return f"results/{wildcards.study}/train/{wildcards.run}/snapshots/{wildcards.iteration}.pt"


def run_spectra(wildcards):
    return expand(
        "results/{study}/spectrum/{run}/{iteration}.parquet",
        study=wildcards.study,
        run=wildcards.run,
        iteration=iterations(wildcards.run),
    )


REPORT_FILES = ["eigenvalues.png", "dimensions.png", "dynamics.png", "spectra.csv", "evaluation.csv", "summary.csv",
                "summary.md", "widths.png", "comparisons.csv", "dimension_differences.csv"]


def report_outputs():
    return expand("results/{study}/report/{name}", study=config["study"], name=REPORT_FILES)


def unread_outputs():
    """Outputs no later job reads: training logs, the snapshots of runs analysed at their final model only, the
    eigenvalues of snapshots, the spectrum tables of replicates. Targets too, so that every job's outputs all
    exist: Snakemake compares a job's params, input and code only when each of its outputs has metadata
    (snakemake/dag.py, update_needrun: no_metadata), so one unread output gone missing would silence every rerun
    trigger of its job."""
    study = config["study"]
    trained = [run for run in RUNS if not RUNS[run].imported]
    found = [f"results/{study}/pretrain/metrics.jsonl"] if config["pretrain"]["source"] == "synthetic" else []
    found += expand("results/{study}/train/{run}/metrics.jsonl", study=study, run=trained)
    found += expand("results/{study}/train/{run}/snapshots/{i}.pt", study=study, run=trained, i=SNAPSHOTS)
    for run in MEASURED:
        found += expand(
            "results/{study}/spectrum/{run}/{i}.{ext}", study=study, run=run, i=iterations(run), ext=["parquet", "zarr"]
        )
    return found


# ---- imported checkpoints (rules/import.smk) ----


def import_entries():
    """{run: import entry} of the study, the classifier (pretrain.source detectron2) included."""
    entries = dict(config["imports"])
    if config["pretrain"]["source"] == "detectron2":  # it sees images at the study's detector sizes
        sizes = {key: config["model"][key] for key in ("min_size", "max_size")}
        entries["classifier"] = {"preset": "detectron2/R-50-GN", "weights": config["pretrain"]["weights"], "model": sizes}
    return entries


IMPORTS = import_entries()


def import_args(wildcards):
    """The command-line arguments of one import: its preset (or family and preprocessing), run name and init."""
    entry = IMPORTS[wildcards.imported]
    if entry.get("preset"):
        args = ["--preset", entry["preset"]]
    else:
        args = ["--from", entry["from"], "--channel-order", entry["channel_order"]]
        args += ["--pixel-mean", *map(str, entry["pixel_mean"]), "--pixel-std", *map(str, entry["pixel_std"])]
    args += ["--run", wildcards.imported]
    for key in ("init", "schedule", "source"):
        if entry.get(key):
            args += [f"--{key}", shlex.quote(entry[key])]
    if entry.get("category_ids"):
        args += ["--category-ids", *map(str, entry["category_ids"])]
    if entry.get("model"):
        args += ["--model-json", shlex.quote(json.dumps(entry["model"], sort_keys=True))]
    return " ".join(args)
