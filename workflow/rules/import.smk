# Published checkpoints imported instead of trained (the study's `imports`), and Detectron's GroupNorm ImageNet
# classifier when pretrain.source is detectron2: `eigpipe import` folds each file's preprocessing into an ordinary
# eigpipe checkpoint, which every later rule reads like a trained one (README, "Published checkpoints").
import json
import shlex


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
    if entry.get("init"):
        args += ["--init", entry["init"]]
    if entry.get("category_ids"):
        args += ["--category-ids", *map(str, entry["category_ids"])]
    if entry.get("model"):
        args += ["--model-json", shlex.quote(json.dumps(entry["model"], sort_keys=True))]
    return " ".join(args)


rule import_checkpoint:
    input:
        weights=lambda wildcards: IMPORTS[wildcards.imported]["weights"],
    output:
        "results/{study}/import/{imported}.pt",
    params:
        args=import_args,
        code=code_hash("import"),
    wildcard_constraints:
        imported=_alternatives(IMPORTS),
    log:
        "results/{study}/logs/import/{imported}.log",
    benchmark:
        "results/{study}/benchmarks/import/{imported}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "eigpipe import {params.args} --weights {input.weights} --out {output} > {log} 2>&1"
