rule synth_data:
    output:
        directory("results/{study}/data"),
    params:
        cfg=synthetic_data_config,
        code=code_hash("synth-data"),
    log:
        "results/{study}/logs/synth_data.log",
    # Eligible for the between-workflow output cache (`--cache`, SNAKEMAKE_OUTPUT_CACHE); Snakemake refuses a
    # benchmark directive on a cached rule (a cache hit has no time to record).
    cache: "omit-software"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "eigpipe synth-data --config-json {params.cfg:q} --out {output} > {log} 2>&1"


# COCO only: check a split before hours of training, every image decoded on the job's threads (stdout is
# the summary).
rule check_data:
    input:
        unpack(coco_split),
    output:
        "results/{study}/checks/{split}.txt",
    params:
        strict="--strict" if config["data"]["strict"] else "",
        code=code_hash("check-data"),
    log:
        "results/{study}/logs/check_data/{split}.log",
    benchmark:
        "results/{study}/benchmarks/check_data/{split}.tsv"
    threads: THREADS
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "eigpipe check-data --annotations {input.annotations} --images {input.images} {params.strict}"
        " --jobs {threads}"
        " > {output} 2> {log}"
