rule evaluate:
    input:
        checkpoint=lambda wildcards: final_checkpoint(wildcards.study, wildcards.detector),
        data=dataset_input("val"),
    output:
        metrics="results/{study}/eval/{detector}.json",
        # pycocotools' per-image matching: the report's bootstrap over images re-accumulates it
        matches="results/{study}/eval/{detector}.matches.npz",
    params:
        cfg=stage_config("evaluate"),
        code=code_hash("evaluate"),
        annotations=split_paths("val")[0],
        images=split_paths("val")[1],
    log:
        "results/{study}/logs/evaluate/{detector}.log",
    benchmark:
        "results/{study}/benchmarks/evaluate/{detector}.tsv"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "eigpipe evaluate --config-json {params.cfg:q} --checkpoint {input.checkpoint}"
        " --data {params.annotations} --image-dir {params.images} --out {output.metrics} --matches {output.matches}"
        " --threads {threads} > {log} 2>&1"
