rule report:
    input:
        dimensions=expand("results/{{study}}/dimensions/{run}.parquet", run=[*DETECTOR_RUNS, "classifier"]),
        eigenvalues=expand("results/{{study}}/spectrum/{run}/final.zarr", run=[*DETECTOR_RUNS, "classifier"]),
        evaluations=expand("results/{{study}}/eval/{run}.json", run=DETECTOR_RUNS),
    output:
        eigenvalues=report(
            "results/{study}/report/eigenvalues.png", caption="../report/eigenvalues.rst", category="eigenspectrum"
        ),
        dimensions=report(
            "results/{study}/report/dimensions.png", caption="../report/dimensions.rst", category="eigenspectrum"
        ),
        dynamics=report(
            "results/{study}/report/dynamics.png", caption="../report/dynamics.rst", category="eigenspectrum"
        ),
        summary=report("results/{study}/report/summary.csv", caption="../report/summary.rst", category="eigenspectrum"),
        evaluation=report(
            "results/{study}/report/evaluation.csv", caption="../report/evaluation.rst", category="evaluation"
        ),
    params:
        cfg=stage_config("report"),
        code=code_hash("report"),
        out=parent_of("summary"),
    log:
        "results/{study}/logs/report.log",
    benchmark:
        "results/{study}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "eigpipe report --config-json {params.cfg:q} --dimensions {input.dimensions}"
        " --eigenvalues {input.eigenvalues} --evaluations {input.evaluations} --out-dir {params.out} > {log} 2>&1"
