from moe_offload import steps

steps.run_step(snakemake, steps.extract_towers)  # noqa: F821 (Snakemake injects `snakemake`)
