"""Resources from the model: the bytes each job holds, checked against what the runtime and transformers
actually hold, and the real checkpoint's figures the README quotes."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from moe_offload import disk, resources as res
from moe_offload.checkpoint.dims import THINKER_TEXT
from moe_offload.checkpoint.layouts import text_config_from_dict
from moe_offload.checkpoint.synthetic import _qwen3_moe_model, text_config
from moe_offload.errors import InputError
from moe_offload.runtime.generate import load_runtime

from conftest import small_spec

REAL = text_config_from_dict(THINKER_TEXT)  # Qwen3-Omni-30B-A3B's thinker text model
GiB = 2**30


def test_model_bytes_equal_transformers_parameters():
    spec = small_spec("qwen3_moe", mlp_only_layers=[2])  # a dense-MLP layer counts too
    model = _qwen3_moe_model(spec)
    held = sum(p.numel() * 4 for p in model.parameters())  # float32, as built
    assert res.model_bytes(text_config_from_dict(text_config(spec)), "float32") == held


@pytest.mark.parametrize("capacity, scope", [(6, "per_layer"), (None, "per_layer"), (20, "global")])
def test_depth_bytes_equal_what_the_runtime_holds(omni_extracted, capacity, scope):
    depth, ex = 3, omni_extracted
    rt = load_runtime(ex.dense, ex.dir, ex.ckpt, depth=depth, capacity=capacity, scope=scope, dtype=torch.float32)
    for layer in range(depth):  # the cache allocates a pool when a layer first asks for it
        rt.cache.slabs(layer)
    cfg = ex.config
    need = res.depth_bytes(cfg, depth, capacity, scope, "float32", seq_len=40)
    assert need["dense_bytes"] == rt.dense_bytes
    assert need["expert_cache_bytes"] == rt.cache.slab_bytes
    assert need["kv_cache_bytes"] == 2 * depth * cfg.num_kv_heads * 40 * cfg.head_dim * 4
    assert need["total_bytes"] == rt.dense_bytes + rt.cache.slab_bytes + need["kv_cache_bytes"]


def test_native_within_a_budget_holds_at_most_the_budget():
    whole = res.native_bytes(REAL, "bfloat16", 100)
    capped = res.native_bytes(REAL, "bfloat16", 100, budget_bytes=20 * GiB)
    assert whole["held_bytes"] == whole["weights_bytes"] and whole["offloaded_bytes"] == 0
    assert capped["held_bytes"] == 20 * GiB
    assert capped["offloaded_bytes"] == whole["weights_bytes"] - 20 * GiB
    assert res.native_bytes(REAL, "float32", 100)["weights_bytes"] == 2 * whole["weights_bytes"]


def test_real_checkpoint_figures():
    """The README's figures: experts 54 GiB extracted, 9 MiB each, the rest of the text model 2.9 GiB."""
    assert REAL.expert_bytes == 9 * 2**20
    written = res.extract_bytes(REAL)
    assert written["layer_bytes"] == 1.125 * GiB and written["layers_bytes"] == 54 * GiB
    assert 2.8 * GiB < written["dense_bytes"] < 3.0 * GiB
    # all resident on a GPU in bf16: every expert of the 48 layers, plus dense
    full = res.depth_bytes(REAL, 48, None, "per_layer", "bfloat16", 4096)
    assert full["expert_cache_bytes"] == 54 * GiB
    top_k = res.depth_bytes(REAL, 48, 8, "per_layer", "bfloat16", 4096)
    assert top_k["expert_cache_bytes"] == 48 * 8 * 9 * 2**20  # 3.4 GiB: 48 x 8 real experts
    assert res.cache_slots(REAL, 48, 1000, "global") == 1000
    assert res.cache_slots(REAL, 48, 1000, "per_layer") == 48 * 128  # never more than a layer has


def test_fits_line_names_job_need_and_machine():
    assert res.fits_line("job", 100, 100) is None
    line = res.fits_line("generate_native_timing", 60 * 1024, 23 * 1024, "set native.timing: false")
    assert line == ("error: generate_native_timing needs 60.0 GiB of memory, the machine has 23.0 GiB: "
                    "set native.timing: false")


def _fake_smi(tmp_path, body: str) -> str:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(0o755)
    return str(smi)


def test_gpu_memory_from_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = _fake_smi(tmp_path, 'printf "0, 81559\\n1, 40960\\n"')
    assert res.gpu_memory_mb("cuda", two) == 81559
    assert res.gpu_memory_mb("cuda:1", two) == 40960
    assert res.gpu_memory_mb("cuda:2", two) is None  # no such GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # cuda:0 is then the second GPU
    assert res.gpu_memory_mb("cuda", two) == 40960
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert res.gpu_memory_mb("cuda", _fake_smi(tmp_path, 'echo "0, [N/A]"')) is None  # no figure (unified memory)
    assert res.gpu_memory_mb("cuda", _fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9")) is None
    assert res.gpu_memory_mb("cuda", str(tmp_path / "absent")) is None


def test_fits_line_for_gpu_memory_in_mib():
    line = res.fits_line("generate_depth (depth 1)", 40, 10, "lower cache.capacity", "GPU memory", "the GPU (cuda)")
    assert line == "error: generate_depth (depth 1) needs 40 MiB of GPU memory, the GPU (cuda) has 10 MiB: lower cache.capacity"


def test_check_disk(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(100 * 10**9, 90 * 10**9, 10 * 10**9))
    disk.check_disk(tmp_path / "not" / "yet", 10 * 10**9, "x")  # exactly enough; a missing folder asks its parent
    with pytest.raises(InputError, match=r"not enough disk for layer 17 under .*: needs 12.1 GB, 10.0 GB free"):
        disk.check_disk(tmp_path, 12_100_000_000, "layer 17")


@pytest.mark.parametrize("extracted", ["omni_extracted", "qwen3_moe_extracted"])
def test_bytes_read_per_token_are_the_tensors_a_runtime_token_reads(extracted, request):
    """The decode bound's bytes, from the model's dimensions, against the runtime's own tensors: every
    dense weight of the layers run (the embedding only its row), each MoE layer's top-k experts."""
    ex = request.getfixturevalue(extracted)
    depth = ex.config.num_layers
    rt = load_runtime(ex.dense, ex.dir, ex.ckpt, depth=depth, capacity=ex.config.experts_per_token,
                      dtype=torch.float32)
    m, k = rt.model, ex.config.experts_per_token
    read = m.norm.nbytes + m.lm_head.nbytes + m.embed[0].nbytes
    for block in m.layers:
        a = block.attn
        read += sum(t.nbytes for t in (a.wqkv, a.wo, a.q_norm, a.k_norm, block.ln1, block.ln2))
        if block.moe is not None:
            w1, w2, _ = rt.cache.slabs(block.mlp.layer)
            read += block.mlp.router.nbytes + k * (w1[0].nbytes + w2[0].nbytes)
        else:
            read += block.mlp.gate.nbytes + block.mlp.up.nbytes + block.mlp.down.nbytes
    assert res.bytes_read_per_token(ex.config, depth, torch.float32) == read
    assert res.bytes_read_per_token(ex.config, depth, "bfloat16") == read // 2
