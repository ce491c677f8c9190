# Classification pre-training on synthetic crops (pretrain.source synthetic); with torchvision weights
# the classifier checkpoint is the weights file and this rule does not run.
rule pretrain:
    input:
        data="results/{study}/data",
    output:
        final="results/{study}/pretrain/final.pt",
        metrics="results/{study}/pretrain/metrics.jsonl",
    params:
        cfg=stage_config("pretrain"),
        code=code_hash("pretrain"),
        launch=launch,
        out=parent_of("final"),
    log:
        "results/{study}/logs/pretrain.log",
    benchmark:
        "results/{study}/benchmarks/pretrain.tsv"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "{params.launch} eigpipe pretrain --config-json {params.cfg:q}"
        " --data {input.data}/classification --out {params.out} > {log} 2>&1"


# The stage keeps resume state in train/<run>/resume/ (not an output, so Snakemake never deletes it):
# rerunning an incomplete job continues from there.
rule train_detector:
    input:
        unpack(init_input),
        data=dataset_input,
    output:
        final="results/{study}/train/{model}-{init}/final.pt",
        snapshots=expand(
            "results/{study}/train/{model}-{init}/snapshots/{iteration}.pt", iteration=SNAPSHOTS, allow_missing=True
        ),
        metrics="results/{study}/train/{model}-{init}/metrics.jsonl",
    params:
        cfg=detector_config,
        code=code_hash("train"),
        launch=launch,
        init=init_arg,
        annotations=split_paths("train")[0],
        images=split_paths("train")[1],
        out=parent_of("final"),
    log:
        "results/{study}/logs/train_detector/{model}-{init}.log",
    benchmark:
        "results/{study}/benchmarks/train_detector/{model}-{init}.tsv"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "{params.launch} eigpipe train --model {wildcards.model} --init {params.init}"
        " --config-json {params.cfg:q} --data {params.annotations} --image-dir {params.images}"
        " --out {params.out} > {log} 2>&1"
