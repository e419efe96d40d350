# Quantized experts (config quantize.bits 8 or 4): each validated layer file into results/experts_q{bits}/,
# one job per layer, and the depth runs again on them (generate.smk: generate_depth_quantized).


rule quantize_layer:
    input:
        manifest="results/model/manifest.json",
        experts="results/experts/layer_{layer}.safetensors",
        checksum="results/checksums/layer_{layer}.json",
    output:
        experts="results/experts_q{bits}/layer_{layer}.safetensors",
        record="results/experts_q{bits}/layer_{layer}.json",
    log:
        "logs/quantize/q{bits}/layer_{layer}.log",
    benchmark:
        "results/benchmarks/quantize_layer/q{bits}_layer_{layer}.tsv"
    wildcard_constraints:
        layer=r"\d+",
        bits="8|4",
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


# `snakemake quantize_layer_17`: one named target per expert layer, quantized at quantize.bits.
for layer in EXPERT_LAYERS if QUANT_BITS else []:

    rule:
        name:
            f"quantize_layer_{layer}"
        input:
            f"results/experts_q{QUANT_BITS}/layer_{layer}.json",
        localrule: True
