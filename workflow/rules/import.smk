# Published checkpoints imported instead of trained (the study's `imports`), and Detectron's GroupNorm ImageNet
# classifier when pretrain.source is detectron2: `eigpipe import` folds each file's preprocessing into an ordinary
# eigpipe checkpoint, which every later rule reads like a trained one (README, "Published checkpoints"). The
# entries and their command-line arguments: rules/common.smk (IMPORTS, import_args).

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
