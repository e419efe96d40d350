from moe_offload import steps

steps.run_step(snakemake, steps.hub_metadata)  # noqa: F821 (Snakemake injects `snakemake`)
