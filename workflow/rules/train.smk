# Classification pre-training on synthetic crops (pretrain.source synthetic); with torchvision weights
# the classifier checkpoint is the weights file and this rule does not run.
rule pretrain:
    input:
        data="results/{study}/data",
        widths=configured_widths,
    output:
        final="results/{study}/pretrain/final.pt",
        metrics="results/{study}/pretrain/metrics.jsonl",
    params:
        cfg=stage_config("pretrain"),
        code=code_hash("pretrain"),
        launch=launch,
    log:
        "results/{study}/logs/pretrain.log",
    # Eligible for the between-workflow output cache (`--cache`, SNAKEMAKE_OUTPUT_CACHE); Snakemake refuses a
    # benchmark directive on a cached rule (a cache hit has no time to record).
    cache: "omit-software"
    threads: THREADS
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "{params.launch} eigpipe pretrain --config-json {params.cfg:q}"
        " --data {input.data}/classification --out results/{wildcards.study}/pretrain --threads {threads}"
        " > {log} 2>&1"


# The stage keeps resume state in train/<run>/resume/ (not an output, so Snakemake never deletes it):
# rerunning an incomplete job continues from there; a finished run keeps none, so a rerun trains afresh.
# Runs are named in eigpipe.runs: <model>-<init>, <model>-derived (widths derived from the eigenspectrum,
# trained from scratch), -s<seed> for replicates.
rule train_detector:
    input:
        unpack(detector_inputs),
        data=dataset_input("train"),
    output:
        final="results/{study}/train/{detector}/final.pt",
        # each snapshot a named output: a cached rule's outputs must all be named (or one multiext)
        **{f"snapshot_{i}": f"results/{{study}}/train/{{detector}}/snapshots/{i}.pt" for i in SNAPSHOTS},
        metrics="results/{study}/train/{detector}/metrics.jsonl",
    params:
        cfg=detector_config,
        code=code_hash("train"),
        launch=launch,
        model=model_arg,
        init=init_kind,
        annotations=study_free_split("train")[0],
        images=study_free_split("train")[1],
    log:
        "results/{study}/logs/train_detector/{detector}.log",
    # Eligible for the between-workflow output cache (`--cache`, SNAKEMAKE_OUTPUT_CACHE); Snakemake refuses a
    # benchmark directive on a cached rule (a cache hit has no time to record).
    cache: "omit-software"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "{params.launch} eigpipe train --model {params.model} --init {params.init}{input.init}"
        f" --config-json {{params.cfg:q}} {TRAIN_DATA_ARGS}"
        " --out results/{wildcards.study}/train/{wildcards.detector} --threads {threads} > {log} 2>&1"


# Widths from the eigenspectrum of the source run (widths.source_init, final snapshot by default).
rule derive_widths:
    input:
        unpack(derivation_inputs),
    output:
        "results/{study}/widths/{spec}.yaml",
    params:
        cfg=derivation_config,
        code=code_hash("widths"),
    log:
        "results/{study}/logs/derive_widths/{spec}.log",
    benchmark:
        "results/{study}/benchmarks/derive_widths/{spec}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "eigpipe widths --config-json {params.cfg:q} --dimensions {input.dimensions}"
        " --checkpoint {input.checkpoint} --out {output} > {log} 2>&1"
