"""Extraction and validation as library calls, on synthetic checkpoints whose layers straddle shards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe_offload.checkpoint.shards import Checkpoint, header_tensors
from moe_offload.errors import InputError
from moe_offload.checkpoint.extract import extract_layer
from moe_offload.checkpoint.layouts import PROJECTIONS, detect_checkpoint
from moe_offload.checkpoint.validate import validate_all, validate_dense, validate_layer


@pytest.fixture(scope="module", params=["omni", "qwen3_moe"])
def extracted(request):
    ex = request.getfixturevalue("omni_extracted" if request.param == "omni" else "qwen3_moe_extracted")
    return ex.ckpt, ex.layout, ex.config, ex.layers, ex.dense


def test_some_layers_straddle_shards(omni_ckpt):
    layout, cfg = detect_checkpoint(omni_ckpt)
    ckpt = Checkpoint(omni_ckpt)
    straddling = [layer for layer in cfg.expert_layers
                  if len({ckpt.weight_map[n] for n in layout.expert_names(layer, cfg.num_experts)}) > 1]
    assert len(straddling) >= 2, "the fixture must exercise experts split across shards"


def test_every_expert_extracted_with_source_values(extracted):
    ckpt_dir, layout, cfg, layers, _ = extracted
    ckpt = Checkpoint(ckpt_dir)
    source = {}
    for shard in ckpt.shard_names:  # the source through the safetensors library, shard by shard
        source.update(load_file(ckpt_dir / shard))
    for layer, path in layers.items():
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["layer"] == str(layer)
            assert int(f.metadata()["num_experts"]) == cfg.num_experts
            names = set(f.keys())
            assert names == set(layout.expert_names(layer, cfg.num_experts))
            for name in names:
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16
                assert torch.equal(tensor, source[name]), name


def test_experts_are_contiguous_in_order(extracted):
    _, layout, cfg, layers, _ = extracted
    layer, path = next(iter(layers.items()))
    infos = header_tensors(path)
    ordered = sorted(infos.values(), key=lambda i: i.offset)
    assert [i.name for i in ordered] == layout.expert_names(layer, cfg.num_experts)
    assert all(a.offset + a.nbytes == b.offset for a, b in zip(ordered, ordered[1:]))


def test_validation_passes_and_covers_every_tensor_once(extracted):
    ckpt_dir, layout, cfg, layers, dense = extracted
    reports = [validate_layer(ckpt_dir, layer, path) for layer, path in layers.items()]
    dense_report = validate_dense(ckpt_dir, dense)
    summary = validate_all(ckpt_dir, dense_report, reports)
    component = [n for n in Checkpoint(ckpt_dir).weight_map if layout.in_component(n)]
    assert summary["tensors"] == len(component)
    assert len(dense_report["tensors"]) + sum(len(r["tensors"]) for r in reports) == len(component)
    # routers, norms, embeddings, lm_head are dense; no expert is
    assert layout.router(0) in dense_report["tensors"] and layout.lm_head in dense_report["tensors"]
    assert not any(".mlp.experts." in n for n in dense_report["tensors"])
    for layer in set(range(cfg.num_layers)) - set(cfg.expert_layers):  # dense-MLP layers
        assert f"{layout.layer(layer)}mlp.gate_proj.weight" in dense_report["tensors"]


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_validation_names_the_corrupted_tensor(extracted, tmp_path):
    ckpt_dir, layout, cfg, layers, _ = extracted
    layer = cfg.expert_layers[-1]
    bad = tmp_path / "layer.safetensors"
    shutil.copy(layers[layer], bad)
    _flip_byte(bad, header_tensors(bad)[layout.expert(layer, 5, "up_proj")].offset + 3)
    with pytest.raises(InputError, match=rf"layer {layer} expert 5 up_proj: extracted bytes differ from source"):
        validate_layer(ckpt_dir, layer, bad)


def test_validation_rejects_a_layer_missing_an_expert(extracted, tmp_path):
    ckpt_dir, layout, cfg, layers, _ = extracted
    layer = cfg.expert_layers[0]
    with safe_open(layers[layer], framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if ".experts.7." not in n}
        meta = f.metadata()
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(InputError, match=rf"layer {layer} expert 7 \w+_proj: missing"):
        validate_layer(ckpt_dir, layer, tmp_path / "short.safetensors")


def test_validation_rejects_the_wrong_layer(extracted):
    ckpt_dir, _, cfg, layers, _ = extracted
    a, b = cfg.expert_layers[:2]
    with pytest.raises(InputError, match=rf"header says layer {a}, expected layer {b}"):
        validate_layer(ckpt_dir, b, layers[a])


def test_coverage_check_finds_missing_and_doubled_tensors(extracted):
    ckpt_dir, layout, cfg, layers, dense = extracted
    reports = [validate_layer(ckpt_dir, layer, path) for layer, path in layers.items()]
    dense_report = validate_dense(ckpt_dir, dense)
    norm = f"{layout.prefix}norm.weight"
    without_norm = {**dense_report, "tensors": {k: v for k, v in dense_report["tensors"].items() if k != norm}}
    with pytest.raises(InputError, match=rf"tensor {norm} appears 0 times"):
        validate_all(ckpt_dir, without_norm, reports)
    expert = layout.expert(cfg.expert_layers[0], 0, "down_proj")
    doubled = {**dense_report, "tensors": {**dense_report["tensors"], expert: {}}}
    with pytest.raises(InputError, match=rf"tensor {expert} appears 2 times"):
        validate_all(ckpt_dir, doubled, reports)
    with pytest.raises(InputError, match=r"expert layers .* missing"):
        validate_all(ckpt_dir, dense_report, reports[1:])


def test_index_is_followed_not_shard_order(omni_ckpt, tmp_path):
    """An extractor that read only the shard where a layer starts would lose experts; ours must not."""
    layout, cfg = detect_checkpoint(omni_ckpt)
    ckpt = Checkpoint(omni_ckpt)
    layer = next(l for l in cfg.expert_layers
                 if len({ckpt.weight_map[n] for n in layout.expert_names(l, cfg.num_experts)}) > 1)
    extract_layer(omni_ckpt, layer, tmp_path / "l.safetensors")
    experts = {n.split(".experts.")[1].split(".")[0] for n in header_tensors(tmp_path / "l.safetensors")}
    assert len(experts) == cfg.num_experts
    assert json.loads((omni_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(p in PROJECTIONS for p in cfg.expert_shapes())


def test_towers_extracted_and_validated_byte_for_byte(omni_ckpt, qwen3_moe_ckpt, tmp_path):
    """The thinker's audio and vision towers into a file of their own, proven against the source like the
    dense file; a flipped byte is named; a text-only layout has no towers to extract."""
    from moe_offload.checkpoint.extract import extract_towers
    from moe_offload.checkpoint.validate import validate_towers

    out = tmp_path / "towers.safetensors"
    extract_towers(omni_ckpt, out)
    report = validate_towers(omni_ckpt, out)
    names = list(report["tensors"])
    assert names and all(n.startswith(("thinker.audio_tower.", "thinker.visual.")) for n in names)
    assert any(n.startswith("thinker.visual.") for n in names) and any("audio_tower" in n for n in names)
    assert set(names) == {n for n in Checkpoint(omni_ckpt).weight_map if n.startswith(("thinker.audio_tower.",
                                                                                       "thinker.visual."))}
    _flip_byte(out, header_tensors(out)[names[-1]].offset + 1)
    with pytest.raises(InputError, match=rf"tower tensor {names[-1]}: extracted bytes differ from source"):
        validate_towers(omni_ckpt, out)
    with pytest.raises(InputError, match="no audio or vision tower"):
        extract_towers(qwen3_moe_ckpt, tmp_path / "none.safetensors")
