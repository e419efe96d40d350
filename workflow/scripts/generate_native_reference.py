from moe_offload import steps

steps.run_step(snakemake, steps.generate_native_reference)  # noqa: F821 (Snakemake injects `snakemake`)
