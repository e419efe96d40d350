rule validate_layer:
    input:
        manifest="results/model/manifest.json",
        experts="results/experts/layer_{layer}.safetensors",
    output:
        "results/checksums/layer_{layer}.json",
    log:
        "logs/validate/layer_{layer}.log",
    benchmark:
        "results/benchmarks/validate_layer/layer_{layer}.tsv"
    wildcard_constraints:
        layer=r"\d+",
    conda:
        "../envs/moe-offload.yaml"
    params:
        code=code_version("validate_layer"),
    script:
        "../scripts/validate_layer.py"


rule validate_dense:
    input:
        manifest="results/model/manifest.json",
        dense="results/experts/dense.safetensors",
    output:
        "results/checksums/dense.json",
    log:
        "logs/validate/dense.log",
    benchmark:
        "results/benchmarks/validate_dense/dense.tsv"
    conda:
        "../envs/moe-offload.yaml"
    params:
        code=code_version("validate_dense"),
    script:
        "../scripts/validate_dense.py"


rule validate_towers:
    input:
        manifest="results/model/manifest.json",
        towers="results/experts/towers.safetensors",
    output:
        "results/checksums/towers.json",
    log:
        "logs/validate/towers.log",
    benchmark:
        "results/benchmarks/validate_towers/towers.tsv"
    conda:
        "../envs/moe-offload.yaml"
    params:
        code=code_version("validate_towers"),
    script:
        "../scripts/validate_towers.py"


rule validate_all:
    input:
        manifest="results/model/manifest.json",
        dense="results/checksums/dense.json",
        layers=layer_checksums,
    output:
        report(
            "results/checksums/all.json",
            caption="../report/checksums.rst",
            category="Validation",
        ),
    log:
        "logs/validate/all.log",
    benchmark:
        "results/benchmarks/validate_all/all.tsv"
    conda:
        "../envs/moe-offload.yaml"
    params:
        code=code_version("validate_all"),
    script:
        "../scripts/validate_all.py"
