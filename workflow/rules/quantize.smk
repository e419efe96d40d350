# Quantized experts (config quantize.bits 8 or 4): each validated layer file into results/experts_q{scheme}/,
# one job per layer, and the depth runs again on them (generate.smk: generate_depth_quantized). The scheme
# is "8", "4", or "4h8" with precision by popularity (quantize.hot: int8 for the experts the full-depth
# run's router used most, chosen once into hot.json).


rule hot_experts:
    input:
        manifest="results/model/manifest.json",
        trace=f"results/traces/depth_{FULL_DEPTH}.parquet",
    output:
        "results/experts_q{scheme}/hot.json",
    log:
        "logs/quantize/q{scheme}/hot.log",
    benchmark:
        "results/benchmarks/hot_experts/q{scheme}.tsv"
    wildcard_constraints:
        scheme=r"\d+h\d+",
    conda:
        "../envs/moe-offload.yaml"
    params:
        fraction=config["quantize"]["hot"]["fraction"],
        code=code_version("hot_experts"),
    script:
        "../scripts/hot_experts.py"


rule quantize_layer:
    input:
        manifest="results/model/manifest.json",
        experts="results/experts/layer_{layer}.safetensors",
        checksum="results/checksums/layer_{layer}.json",
        hot=hot_choice,
    output:
        experts="results/experts_q{scheme}/layer_{layer}.safetensors",
        record="results/experts_q{scheme}/layer_{layer}.json",
    log:
        "logs/quantize/q{scheme}/layer_{layer}.log",
    benchmark:
        "results/benchmarks/quantize_layer/q{scheme}_layer_{layer}.tsv"
    wildcard_constraints:
        layer=r"\d+",
        scheme=SCHEME_PATTERN,
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=needs("quantize_layer", "mem_mb"),
    params:
        group_size=config["quantize"]["group_size"],
        scales=config["quantize"]["scales"],
        code=code_version("quantize_layer"),
    script:
        "../scripts/quantize_layer.py"


# `snakemake quantize_layer_17`: one named target per expert layer, quantized as config quantize says.
for layer in EXPERT_LAYERS if QUANT_SCHEME else []:

    rule:
        name:
            f"quantize_layer_{layer}"
        input:
            f"results/experts_q{QUANT_SCHEME}/layer_{layer}.json",
        localrule: True
