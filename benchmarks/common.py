"""What every benchmark script shares: the model dimensions, building and extracting a synthetic
checkpoint, and printing its one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

DIMS = {
    # config/config.yaml's synthetic model
    "tiny": dict(num_experts=16, experts_per_token=4, hidden_size=64, moe_intermediate_size=32, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=512, max_shard_size="1MB", initializer_range=0.1),
    # the Qwen3-Omni thinker's (hub vocab, 4-GB-ish shards so layers straddle them)
    "real": dict(num_experts=128, experts_per_token=8, hidden_size=2048, moe_intermediate_size=768, num_heads=32,
                 num_kv_heads=4, head_dim=128, vocab_size=152064, max_shard_size="4GB", initializer_range=0.02),
}


def build_and_extract(spec: dict, work: Path) -> tuple[dict, object]:
    """A synthetic checkpoint of `spec` under work/ckpt, its dense file and every layer file beside it, each
    made only if absent (a kept workdir is reused). Returns ({ckpt, dense, dir}, the text config)."""
    from moe_offload.checkpoint.extract import extract_dense, extract_layer
    from moe_offload.checkpoint.layouts import detect_checkpoint
    from moe_offload.checkpoint.synthetic import build_synthetic

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        build_synthetic(ckpt, spec)
    _, cfg = detect_checkpoint(ckpt)
    files = {"ckpt": ckpt, "dense": work / "dense.safetensors", "dir": work}
    if not files["dense"].exists():
        extract_dense(ckpt, files["dense"])
    for layer in cfg.expert_layers:
        if not (work / f"layer_{layer}.safetensors").exists():
            extract_layer(ckpt, layer, work / f"layer_{layer}.safetensors")
    return files, cfg


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
