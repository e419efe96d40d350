"""Getting the model: manifest contents, hub downloads (offline, from a local hub cache), bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from moe_offload.checkpoint.shards import Checkpoint
from moe_offload.errors import InputError
from moe_offload.checkpoint.layouts import detect_checkpoint
from moe_offload.checkpoint.source import build_manifest, hub_patterns
from moe_offload.checkpoint.synthetic import build_synthetic
from moe_offload.hashing import hash_file

from conftest import small_spec


def test_manifest_describes_the_checkpoint(omni_ckpt):
    m = build_manifest(omni_ckpt, {"source": "local", "path": str(omni_ckpt)})
    layout, cfg = detect_checkpoint(omni_ckpt)
    assert (m["layout"], m["num_layers"], m["num_experts"], m["experts_per_token"]) == (
        "qwen3_omni_thinker", cfg.num_layers, cfg.num_experts, cfg.experts_per_token)
    names = {f["name"] for f in m["files"]}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= names
    assert set(Checkpoint(omni_ckpt).shard_names) <= names
    shard = next(f for f in m["files"] if f["name"].endswith(".safetensors"))
    assert shard["xxh3_128"] == hash_file(omni_ckpt / shard["name"])
    assert shard["size"] == (omni_ckpt / shard["name"]).stat().st_size


def test_hub_patterns_skip_shards_without_thinker_tensors(omni_ckpt):
    config = json.loads((omni_ckpt / "config.json").read_text())
    weight_map = Checkpoint(omni_ckpt).weight_map
    patterns = hub_patterns(config, weight_map)
    thinker = {s for n, s in weight_map.items() if n.startswith("thinker.")}
    assert thinker <= set(patterns)
    talker_only = set(weight_map.values()) - thinker
    assert talker_only, "the fixture should have shards holding only talker/code2wav tensors"
    assert not talker_only & set(patterns)


def _hub_cache(ckpt, cache, repo="Qwen/Tiny-Omni", sha="0" * 40):
    """A Hugging Face cache holding `ckpt` as the snapshot of `repo` at `main`."""
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(ckpt, root / "snapshots" / sha)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(sha)
    return root / "snapshots" / sha


def test_hf_source_through_the_hub_client_offline(omni_ckpt, tmp_path):
    snapshot = _hub_cache(omni_ckpt, tmp_path / "hub")
    code = ("import json, sys; from moe_offload.checkpoint.source import obtain, build_manifest; "
            "p = obtain({'source': 'hf', 'repo_id': 'Qwen/Tiny-Omni', 'revision': 'main', 'cache_dir': sys.argv[1]}, None); "
            "print(json.dumps(build_manifest(p, {})))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hub")], env=env, capture_output=True,
                         text=True, check=True)
    manifest = json.loads(out.stdout)
    assert manifest["path"] == str(snapshot.resolve())
    assert manifest["num_experts"] == small_spec()["num_experts"]


def test_hf_source_unreachable_is_one_line(tmp_path):
    code = ("from moe_offload.checkpoint.source import obtain; "
            "obtain({'source': 'hf', 'repo_id': 'Qwen/Absent', 'revision': 'main', 'cache_dir': '%s'}, None)" % tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "InputError: could not get config.json of Qwen/Absent@main" in out.stderr


@pytest.fixture
def copy_ckpt(omni_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(omni_ckpt, dst)
    return dst


def test_missing_directory():
    with pytest.raises(InputError, match="checkpoint directory /no/such/dir does not exist"):
        build_manifest("/no/such/dir", {})


def test_missing_index(copy_ckpt):
    (copy_ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(InputError, match="has no model.safetensors.index.json"):
        build_manifest(copy_ckpt, {})


def test_truncated_shard(copy_ckpt):
    shard = copy_ckpt / Checkpoint(copy_ckpt).shard_names[3]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=rf"{shard.name}: truncated shard: .* ends at byte"):
        build_manifest(copy_ckpt, {})


def test_corrupt_header(copy_ckpt):
    shard = copy_ckpt / Checkpoint(copy_ckpt).shard_names[1]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"#!@?"
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"{shard.name}: corrupt safetensors header"):
        build_manifest(copy_ckpt, {})


def test_checkpoint_without_experts(tmp_path):
    ckpt = build_synthetic(tmp_path / "dense", small_spec("qwen3_moe", num_layers=2, mlp_only_layers=[0, 1]))
    with pytest.raises(InputError, match="the checkpoint has no experts"):
        build_manifest(ckpt, {})


def test_unsupported_model_type(copy_ckpt):
    cfg = json.loads((copy_ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (copy_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="model_type 'llama' is not a supported MoE layout"):
        build_manifest(copy_ckpt, {})


def test_embed_scale_scales_the_token_embeddings_alone(tmp_path):
    """The benchmarks' routing-follows-the-token knob: the built checkpoint's text model differs from the
    default one only in its token embeddings, multiplied by the scale. (The unused talker is left out:
    its experts are not initialised by transformers, so they differ between any two builds.)"""
    from safetensors.torch import load_file

    spec = small_spec("qwen3_omni_thinker", num_layers=2)

    def tensors(out, **extra):
        ckpt = build_synthetic(tmp_path / out, dict(spec, **extra))
        return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}

    plain, scaled = tensors("plain"), tensors("scaled", embed_scale=4)
    changed = [k for k in plain if not k.startswith(("talker", "code2wav")) and not (plain[k] == scaled[k]).all()]
    assert changed == [detect_checkpoint(tmp_path / "plain")[0].prefix + "embed_tokens.weight"]
    assert (scaled[changed[0]].float() == plain[changed[0]].float() * 4).all()
