from moe_offload import steps

steps.run_step(snakemake, steps.extract_layer)  # noqa: F821 (Snakemake injects `snakemake`)
