rule synth_data:
    output:
        directory("results/{study}/data"),
    params:
        cfg=stage_config("synth-data"),
        code=code_hash("synth-data"),
    log:
        "results/{study}/logs/synth_data.log",
    benchmark:
        "results/{study}/benchmarks/synth_data.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "eigpipe synth-data --config-json {params.cfg:q} --out {output} > {log} 2>&1"


# COCO only: validate a split before hours of training (stdout is the summary).
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
    threads: 1
    resources:
        mem_mb=16000,
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "eigpipe check-data --annotations {input.annotations} --images {input.images} {params.strict}"
        " > {output} 2> {log}"
