# One covariance store per (run, iteration); iteration is a snapshot number or "final". The run
# "classifier" is the pre-trained classification model (its final checkpoint only).
rule covariance:
    input:
        checkpoint=covariance_checkpoint,
        data=dataset_input("val"),
    output:
        directory("results/{study}/covariance/{run}/{iteration}.zarr"),
    params:
        cfg=stage_config("covariance"),
        code=code_hash("covariance"),
        annotations=split_paths("val")[0],
        images=split_paths("val")[1],
    log:
        "results/{study}/logs/covariance/{run}/{iteration}.log",
    benchmark:
        "results/{study}/benchmarks/covariance/{run}/{iteration}.tsv"
    threads: THREADS
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    conda:
        CONDA_ENV
    shell:
        "eigpipe covariance --config-json {params.cfg:q} --checkpoint {input.checkpoint}"
        " --data {params.annotations} --image-dir {params.images} --out {output} --threads {threads}"
        " > {log} 2>&1"


rule spectrum:
    input:
        "results/{study}/covariance/{run}/{iteration}.zarr",
    output:
        table="results/{study}/spectrum/{run}/{iteration}.parquet",
        eigenvalues=directory("results/{study}/spectrum/{run}/{iteration}.zarr"),
    params:
        cfg=stage_config("spectrum"),
        code=code_hash("spectrum"),
    log:
        "results/{study}/logs/spectrum/{run}/{iteration}.log",
    benchmark:
        "results/{study}/benchmarks/spectrum/{run}/{iteration}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "eigpipe spectrum --config-json {params.cfg:q} {input}"
        " --out {output.table} --eigenvalues {output.eigenvalues} > {log} 2>&1"


rule dimensions:
    input:
        run_spectra,
    output:
        "results/{study}/dimensions/{run}.parquet",
    params:
        code=code_hash("dimensions"),
    log:
        "results/{study}/logs/dimensions/{run}.log",
    benchmark:
        "results/{study}/benchmarks/dimensions/{run}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "eigpipe dimensions --spectra {input} --out {output} > {log} 2>&1"
