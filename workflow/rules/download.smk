rule download:
    input:
        model_files(),
    output:
        "results/model/manifest.json",
    log:
        "logs/download.log",
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=config["resources"]["base_mem_mb"] * 2,
    params:
        model=model_source(),
        synthetic_dir="results/model/checkpoint",
    script:
        "../scripts/download.py"
