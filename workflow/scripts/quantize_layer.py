from moe_offload import steps

steps.run_step(snakemake, steps.quantize_layer)  # noqa: F821 (Snakemake injects `snakemake`)
