from moe_offload import steps

steps.run_step(snakemake, steps.hot_experts)  # noqa: F821 (Snakemake injects `snakemake`)
