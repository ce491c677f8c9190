rule report:
    input:
        dimensions=expand("results/{{study}}/dimensions/{run}.parquet", run=[*ANALYSED, "classifier"]),
        eigenvalues=expand("results/{{study}}/spectrum/{run}/final.zarr", run=MEASURED),
        evaluations=expand("results/{{study}}/eval/{run}.json", run=RUNS),
        matches=expand("results/{{study}}/eval/{run}.matches.npz", run=RUNS),
        widths=expand("results/{{study}}/widths/{spec}.yaml", spec=DERIVED),
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
        spectra=report("results/{study}/report/spectra.csv", caption="../report/spectra.rst", category="eigenspectrum"),
        evaluation=report(
            "results/{study}/report/evaluation.csv", caption="../report/evaluation.rst", category="evaluation"
        ),
        summary=report("results/{study}/report/summary.csv", caption="../report/summary.rst", category="widths"),
        summary_md=report("results/{study}/report/summary.md", caption="../report/summary.rst", category="widths"),
        widths=report("results/{study}/report/widths.png", caption="../report/widths.rst", category="widths"),
        comparisons=report(
            "results/{study}/report/comparisons.csv", caption="../report/comparisons.rst", category="evaluation"
        ),
        dimension_differences=report(
            "results/{study}/report/dimension_differences.csv",
            caption="../report/dimension_differences.rst",
            category="eigenspectrum",
        ),
    params:
        cfg=stage_config("report"),
        code=code_hash("report"),
        out=parent_of("summary"),
        widths=lambda wildcards, input: f"--widths {' '.join(input.widths)}" if input.widths else "",
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
        " --eigenvalues {input.eigenvalues} --evaluations {input.evaluations} --matches {input.matches} {params.widths}"
        " --out-dir {params.out} > {log} 2>&1"
