from moe_offload import steps

steps.run_step(snakemake, steps.profile_cache)  # noqa: F821 (Snakemake injects `snakemake`)
