from moe_offload import steps

steps.run_step(snakemake, steps.generate_native_timing)  # noqa: F821 (Snakemake injects `snakemake`)
