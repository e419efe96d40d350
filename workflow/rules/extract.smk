rule extract_layer:
    input:
        manifest="results/model/manifest.json",
    output:
        "results/experts/layer_{layer}.safetensors",
    log:
        "logs/extract/layer_{layer}.log",
    benchmark:
        "results/benchmarks/extract_layer/layer_{layer}.tsv"
    wildcard_constraints:
        layer=r"\d+",
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=needs("extract_layer", "mem_mb"),
    params:
        code=code_version("extract_layer"),
    script:
        "../scripts/extract_layer.py"


rule extract_dense:
    input:
        manifest="results/model/manifest.json",
    output:
        "results/experts/dense.safetensors",
    log:
        "logs/extract/dense.log",
    benchmark:
        "results/benchmarks/extract_dense/dense.tsv"
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=needs("extract_dense", "mem_mb"),
    params:
        code=code_version("extract_dense"),
    script:
        "../scripts/extract_dense.py"


rule extract_towers:
    input:
        manifest="results/model/manifest.json",
    output:
        "results/experts/towers.safetensors",
    log:
        "logs/extract/towers.log",
    benchmark:
        "results/benchmarks/extract_towers/towers.tsv"
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=needs("extract_dense", "mem_mb"),
    params:
        code=code_version("extract_towers"),
    script:
        "../scripts/extract_towers.py"


# `snakemake extract_layer_17`: one named target per expert layer, extracted and validated.
for layer in EXPERT_LAYERS:

    rule:
        name:
            f"extract_layer_{layer}"
        input:
            f"results/checksums/layer_{layer}.json",
        localrule: True
