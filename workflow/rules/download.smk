rule download:
    input:
        model_files(),
        hub_metadata=(
            rules.hub_metadata.output if config["model"]["source"] == "hf" else []
        ),
    output:
        "results/model/manifest.json",
    log:
        "logs/download.log",
    benchmark:
        "results/benchmarks/download/download.tsv"
    # the only job that may need the internet: it runs where Snakemake runs, never on a compute node
    localrule: True
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=config["resources"]["base_mem_mb"] * 2,
    params:
        model=model_source(),
        synthetic_dir="results/model/checkpoint",
        metadata_dir=(
            str(HUB_METADATA_DIR) if config["model"]["source"] == "hf" else None
        ),
        code=code_version("download"),
    script:
        "../scripts/download.py"
