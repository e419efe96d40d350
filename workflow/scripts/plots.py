from moe_offload import steps

steps.run_step(snakemake, steps.plots)  # noqa: F821 (Snakemake injects `snakemake`)
