rule plots:
    input:
        native=native_json(),
        depths=expand("results/generate/depth_{depth}.json", depth=DEPTHS),
        profile_csv="results/cache/profile.csv",
        profile_json="results/cache/profile.json",
    output:
        fidelity=report(
            "results/plots/fidelity.png",
            caption="../report/fidelity.rst",
            category="Comparison",
        ),
        hit_rate=report(
            "results/plots/hit_rate.png",
            caption="../report/hit_rate.rst",
            category="Expert cache",
        ),
        memory_speed=report(
            "results/plots/memory_speed.png",
            caption="../report/memory_speed.rst",
            category="Comparison",
        ),
    log:
        "logs/plots.log",
    benchmark:
        "results/benchmarks/plots/plots.tsv"
    conda:
        "../envs/moe-offload.yaml"
    params:
        code=code_version("plots"),
    script:
        "../scripts/plots.py"


rule compare:
    input:
        manifest="results/model/manifest.json",
        checksums="results/checksums/all.json",
        native=native_json(),
        depths=expand("results/generate/depth_{depth}.json", depth=DEPTHS),
        profile="results/cache/profile.json",
        plots=rules.plots.output,
        benchmarks=stage_benchmarks,
        schema="workflow/schemas/compare.schema.yaml",
    output:
        json=report(
            "results/compare.json",
            caption="../report/compare.rst",
            category="Comparison",
        ),
        html=report(
            "results/compare.html",
            caption="../report/compare_table.rst",
            category="Comparison",
        ),
    log:
        "logs/compare.log",
    benchmark:
        "results/benchmarks/compare/compare.tsv"
    conda:
        "../envs/moe-offload.yaml"
    params:
        code=code_version("compare"),
    script:
        "../scripts/compare.py"
