rule generate_native:
    input:
        manifest="results/model/manifest.json",
    output:
        json="results/generate/native.json",
        logits="results/generate/native_logits.safetensors",
    log:
        "logs/generate/native.log",
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=NATIVE_MEM_MB,
        gpu=gpu_count(),
    params:
        prompts=config["generate"]["prompts"],
        run=generate_params(),
        experts_implementation=config["generate"]["native_experts_implementation"],
        chat_template=config["generate"]["chat_template"],
    script:
        "../scripts/generate_native.py"


rule generate_depth:
    input:
        unpack(depth_layers),
        manifest="results/model/manifest.json",
        dense="results/experts/dense.safetensors",
        dense_checksum="results/checksums/dense.json",
        native="results/generate/native.json",
        native_logits="results/generate/native_logits.safetensors",
    output:
        json="results/generate/depth_{depth}.json",
        trace="results/traces/depth_{depth}.parquet",
    log:
        "logs/generate/depth_{depth}.log",
    wildcard_constraints:
        depth=r"\d+",
    conda:
        "../envs/moe-offload.yaml"
    resources:
        mem_mb=config["resources"]["base_mem_mb"] * 2,
        gpu=gpu_count(),
    params:
        run=generate_params(),
        cache=canonical(config["cache"]),
    script:
        "../scripts/generate_depth.py"
