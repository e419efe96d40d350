rule generate_native_reference:
    input:
        manifest="results/model/manifest.json",
        media=MEDIA_FILES,
    output:
        json="results/generate/native_reference.json",
        logits="results/generate/native_logits.safetensors",
    log:
        "logs/generate/native_reference.log",
    benchmark:
        "results/benchmarks/generate_native_reference/native_reference.tsv"
    conda:
        "../envs/moe-offload.yaml"
    threads: TIMED_THREADS
    resources:
        mem_mb=needs("generate_native_reference", "mem_mb"),
        gpu_mem_mb=needs("generate_native_reference", "gpu_mem_mb"),
        gpu=gpu_count(),
    params:
        prompts=config["generate"]["prompts"],
        run=generate_params(),
        chat_template=config["generate"]["chat_template"],
        budget=native_budget(),
        offload_dir=lambda wc, output: os.path.dirname(output.json),
        code=code_version("generate_native_reference"),
    script:
        "../scripts/generate_native_reference.py"


rule generate_native_timing:
    input:
        manifest="results/model/manifest.json",
        media=MEDIA_FILES,
    output:
        json="results/generate/native_timing.json",
    log:
        "logs/generate/native_timing.log",
    benchmark:
        "results/benchmarks/generate_native_timing/native_timing.tsv"
    conda:
        "../envs/moe-offload.yaml"
    threads: TIMED_THREADS
    resources:
        mem_mb=needs("generate_native_timing", "mem_mb"),
        gpu_mem_mb=needs("generate_native_timing", "gpu_mem_mb"),
        gpu=gpu_count(),
    params:
        prompts=config["generate"]["prompts"],
        run=generate_params(),
        experts_implementation=config["native"]["experts_implementation"],
        chat_template=config["generate"]["chat_template"],
        code=code_version("generate_native_timing"),
    script:
        "../scripts/generate_native_timing.py"


rule generate_depth:
    input:
        unpack(depth_layers),
        unpack(tower_files),
        manifest="results/model/manifest.json",
        dense="results/experts/dense.safetensors",
        dense_checksum="results/checksums/dense.json",
        native="results/generate/native_reference.json",
        native_logits="results/generate/native_logits.safetensors",
        heldout=heldout_input(),
    output:
        json="results/generate/depth_{depth}.json",
        trace="results/traces/depth_{depth}.parquet",
    log:
        "logs/generate/depth_{depth}.log",
    benchmark:
        "results/benchmarks/generate_depth/depth_{depth}.tsv"
    wildcard_constraints:
        depth=r"\d+",
    conda:
        "../envs/moe-offload.yaml"
    threads: TIMED_THREADS
    resources:
        mem_mb=needs("generate_depth", "mem_mb"),
        gpu_mem_mb=needs("generate_depth", "gpu_mem_mb"),
        gpu=gpu_count(),
    params:
        run=generate_params(),
        cache=canonical(config["cache"]),
        heldout=heldout_params(),
        code=code_version("generate_depth"),
    script:
        "../scripts/generate_depth.py"


# The same run on quantized experts (quantize.smk): its layer files and their records instead.
use rule generate_depth as generate_depth_quantized with:
    input:
        unpack(quantized_depth_layers),
        unpack(tower_files),
        manifest="results/model/manifest.json",
        dense="results/experts/dense.safetensors",
        dense_checksum="results/checksums/dense.json",
        native="results/generate/native_reference.json",
        native_logits="results/generate/native_logits.safetensors",
        heldout=heldout_input(),
    output:
        json="results/generate/q{scheme}/depth_{depth}.json",
        trace="results/traces/q{scheme}/depth_{depth}.parquet",
    log:
        "logs/generate/q{scheme}/depth_{depth}.log",
    benchmark:
        "results/benchmarks/generate_depth_quantized/q{scheme}_depth_{depth}.tsv"
    wildcard_constraints:
        depth=r"\d+",
        scheme=SCHEME_PATTERN,
    resources:
        mem_mb=needs("generate_depth_quantized", "mem_mb"),
        gpu_mem_mb=needs("generate_depth_quantized", "gpu_mem_mb"),
        gpu=gpu_count(),
