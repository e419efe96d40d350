rule profile_cache:
    input:
        unpack(modality_inputs),
        manifest="results/model/manifest.json",
        trace=f"results/traces/depth_{FULL_DEPTH}.parquet",
    output:
        csv=report(
            "results/cache/profile.csv",
            caption="../report/profile.rst",
            category="Expert cache",
        ),
        json="results/cache/profile.json",
    log:
        "logs/profile_cache.log",
    benchmark:
        "results/benchmarks/profile_cache/profile.tsv"
    conda:
        "../envs/moe-offload.yaml"
    params:
        code=code_version("profile_cache"),
        profile=canonical(config["profile"]),
        dtype=config["generate"]["dtype"],
    script:
        "../scripts/profile_cache.py"
