"""The real Qwen3-Omni-30B-A3B at full size, without its bytes: a skeleton checkpoint with the real config,
every tensor's real name, shape and dtype (28,042 tensors, 70.7 GB, transformers' own model on the meta
device, converted to the hub's per-expert names), in 15 shards of at most 5 GB with real safetensors
headers, the tensor data left as holes in sparse files (a few MB on disk)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from moe_offload import resources as res
from moe_offload.checkpoint import source
from moe_offload.checkpoint.dims import THINKER_TEXT
from moe_offload.checkpoint.layouts import detect_checkpoint
from moe_offload.checkpoint.source import build_manifest
from moe_offload.checkpoint.shards import INDEX_NAME, Checkpoint
from moe_offload.checkpoint.validate import validate_layer

from conftest import error_lines, set_config, snakemake

SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size, as the hub checkpoint was saved
TALKER_TEXT = dict(vocab_size=3072, hidden_size=1024, intermediate_size=2048, num_hidden_layers=20,
                   num_attention_heads=16, num_key_value_heads=2, head_dim=128, moe_intermediate_size=384,
                   num_experts=128, num_experts_per_tok=6, shared_expert_intermediate_size=768)
ST_DTYPE = {"torch.bfloat16": "BF16", "torch.float32": "F32"}
GiB = 2**30


def build_skeleton(out: Path) -> Path:
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    cfg = Qwen3OmniMoeConfig(
        thinker_config=dict(text_config=copy.deepcopy(THINKER_TEXT), vision_start_token_id=151652),
        talker_config=dict(text_config=TALKER_TEXT, spatial_merge_size=2, speaker_id={"ethan": 0}),
        enable_audio_output=True)
    with torch.device("meta"):
        model = Qwen3OmniMoeForConditionalGeneration(cfg).to(torch.bfloat16)
    tensors = revert_weight_conversion(model, model.state_dict())  # the hub's names: experts one by one
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, ST_DTYPE[str(t.dtype)], list(t.shape), nbytes))
        size += nbytes
    shards.append(current)
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes in shard:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            weight_map[name] = fname
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # the data: a hole
        total += offset
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(cfg.to_json_string())
    return out


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory) -> Path:
    return build_skeleton(tmp_path_factory.mktemp("real") / "Qwen3-Omni-30B-A3B-Instruct")


def test_skeleton_is_the_real_checkpoint_shape(skeleton):
    ckpt = Checkpoint(skeleton)
    layout, cfg = detect_checkpoint(skeleton)
    assert layout.name == "qwen3_omni_thinker" and len(ckpt.shard_names) == 15
    assert 28_000 <= len(ckpt.weight_map) <= 28_100
    apparent = sum((skeleton / s).stat().st_size for s in ckpt.shard_names)
    assert 70e9 < apparent < 71e9
    assert sum((skeleton / s).stat().st_blocks * 512 for s in ckpt.shard_names) < 50 * 2**20  # holes
    # a layer's experts straddle shards, as BACKGROUND.md describes for layers 1 and 5
    straddling = [L for L in cfg.expert_layers
                  if len({ckpt.weight_map[n] for n in layout.expert_names(L, cfg.num_experts)}) > 1]
    assert len(straddling) >= 8
    assert res.extract_bytes(cfg)["layer_bytes"] == 1.125 * GiB


def _declared(plan: str, rule: str) -> dict[str, int]:
    """The resources a dry run prints for the first job of `rule`."""
    block = plan.split(f"rule {rule}:", 1)[1].split("\n\n", 1)[0]
    line = next(l for l in block.splitlines() if l.strip().startswith("resources:"))
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)(?:,|$)", line)}


@pytest.mark.slow
def test_plan_resources_disk_and_layer_17_at_real_scale(workdir, skeleton, monkeypatch):
    monkeypatch.setattr(source, "hash_file", lambda path: f"not hashed: {path.stat().st_size} bytes")
    _, cfg = detect_checkpoint(skeleton)
    set_config(workdir, model={"source": "local", "path": str(skeleton)},
               generate={"device": "cuda", "dtype": "bfloat16", "depths": [8, 48],
                         "prompts": ["The capital of France is", "Explain why the sky is blue in one sentence."]},
               cache={"capacity": 16, "pin_memory": True})

    # native timing holds the whole model (the thinker's towers too): on a machine with 16 GB the plan stops
    # before any job starts
    seq = len(b"Explain why the sky is blue in one sentence.") + 32
    towers = res.tower_params(json.loads((skeleton / "config.json").read_text())["thinker_config"]) * 2
    whole = res.to_mb(res.native_bytes(cfg, "bfloat16", seq, towers_bytes=towers)["total_bytes"], 1024)
    small = snakemake(workdir, "-n", "--resources", "mem_mb=16000")
    assert small.returncode != 0
    assert error_lines(small) == [res.fits_line("generate_native_timing", whole, 16000, "set native.timing: false "
                                                "(the reference run offloads and still completes)")]
    assert 57 < whole / 1024 < 62  # 57 GiB: the whole thinker text model in bf16, and 2.3 GiB of towers
    assert not (workdir / "results").exists()

    # without the timing run, a GPU plan with 16 GiB of host memory fits
    set_config(workdir, native={"timing": False, "max_memory_mb": 20000, "cpu_memory_mb": 8000})
    plan = snakemake(workdir, "-n", "results/compare.json", "--resources", "mem_mb=16000")
    assert plan.returncode == 0, plan.stdout[-2000:] + plan.stderr[-2000:]
    assert "generate_native_timing" not in plan.stdout
    stats = plan.stdout.split("Job stats:")[1]
    assert re.search(r"extract_layer\s+48\b", stats) and re.search(r"validate_layer\s+48\b", stats)
    assert re.search(r"generate_depth\s+2\b", stats)
    depth = _declared(plan.stdout, "generate_depth")
    run_depth = int(re.search(r"depth_(\d+)\.json", plan.stdout.split("rule generate_depth:", 1)[1]).group(1))
    need = res.depth_bytes(cfg, run_depth, 16, "per_layer", "bfloat16", seq, pinned_staging=True)
    assert depth["gpu"] == 1 and depth["gpu_mem_mb"] == res.to_mb(need["total_bytes"])
    assert depth["mem_mb"] == res.to_mb(need["dense_bytes"] + need["host_staging_bytes"], 1024)
    threads = plan.stdout.split("rule generate_depth:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"threads: (\d+)", threads).group(1) == str(os.cpu_count())  # every core: runs alone
    native = _declared(plan.stdout, "generate_native_reference")
    assert native["gpu"] == 1 and native["gpu_mem_mb"] == res.to_mb(20000 * 2**20 + res.kv_bytes(cfg, 48, seq,
                                                                                                  "bfloat16"))
    assert native["mem_mb"] == 8000 + 1024

    # the disk check: extraction of all 48 layers (54 GiB) against a disk made to look too small
    free = shutil.disk_usage(workdir).free
    set_config(workdir, resources={"disk_headroom_mb": (free - 40 * 10**9) // 2**20})  # leaves 40 GB
    full = snakemake(workdir, "-n", "results/checksums/all.json", "--resources", "mem_mb=16000")
    assert full.returncode != 0
    written = res.extract_bytes(cfg)["total_bytes"]
    lines = error_lines(full)  # other processes change the free space a little meanwhile: figures by pattern
    assert len(lines) == 1 and re.fullmatch(
        re.escape(f"error: not enough disk for the extracted experts ({written / 1e9:.1f} GB) plus "
                  "resources.disk_headroom_mb under .: needs ") + r"[\d.]+ GB, [\d.]+ GB free", lines[0]), lines
    assert 57 < written / 1e9 < 62  # 54 GiB of experts and 2.9 GiB of dense weights
    set_config(workdir, resources={"disk_headroom_mb": 1024})

    # layer 17: extracted (1.2 GB) and validated against the skeleton's bytes. The manifest is written
    # here with stand-in file hashes: hashing 70 GB of holes would take minutes and proves nothing here.
    manifest = build_manifest(skeleton, {"source": "local", "path": str(skeleton)})
    (workdir / "results/model").mkdir(parents=True)
    (workdir / "results/model/manifest.json").write_text(json.dumps(manifest))
    proc = snakemake(workdir, "--cores", "2", "extract_layer_17", "--resources", "mem_mb=16000", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "results/experts/layer_17.safetensors"
    assert out.stat().st_size > 1.125 * GiB
    report = json.loads((workdir / "results/checksums/layer_17.json").read_text())
    assert len(report["tensors"]) == 128 * 3
    validate_layer(skeleton, 17, out)
    assert sorted(p.name for p in (workdir / "results/experts").iterdir()) == ["layer_17.safetensors"]
