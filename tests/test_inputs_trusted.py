"""Inputs stay inside the checkpoint, headers the loader would reject are refused at validation, the
manifest survives moving the project, and a checkpoint changed after its manifest is noticed."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from moe_offload.checkpoint.extract import extract_dense, extract_layer
from moe_offload.checkpoint.layouts import detect_checkpoint
from moe_offload.checkpoint.shards import INDEX_NAME, Checkpoint
from moe_offload.checkpoint.manifest import manifest_checkpoint
from moe_offload.checkpoint.source import build_manifest
from moe_offload.checkpoint.validate import validate_dense, validate_layer
from moe_offload.errors import InputError


@pytest.fixture
def copy_ckpt(omni_ckpt, tmp_path):
    dst = tmp_path / "project" / "ckpt"
    shutil.copytree(omni_ckpt, dst)
    return dst


def _point_index(ckpt, shard_name: str) -> str:
    """Make the index send one of layer 0's expert tensors to shard_name; returns that tensor."""
    index = json.loads((ckpt / INDEX_NAME).read_text())
    tensor = "thinker.model.layers.0.mlp.experts.3.up_proj.weight"
    index["weight_map"][tensor] = shard_name
    (ckpt / INDEX_NAME).write_text(json.dumps(index))
    return tensor


@pytest.mark.parametrize("shard", ["../../outside/evil.safetensors", "/proc/self/environ", "sub/../../x.safetensors",
                                   "~/evil.safetensors"])
def test_shard_outside_the_checkpoint_is_refused_unopened(copy_ckpt, tmp_path, shard):
    outside = tmp_path / "outside"
    outside.mkdir()
    # a valid shard outside: following the name would extract its bytes and call them valid
    shutil.copy(copy_ckpt / Checkpoint(copy_ckpt).shard_names[0], outside / "evil.safetensors")
    tensor = _point_index(copy_ckpt, shard)
    with pytest.raises(InputError) as err:
        build_manifest(copy_ckpt, {})
    message = str(err.value)
    assert "outside the checkpoint directory" in message and tensor in message
    assert "evil" not in message and "environ" not in message and "\n" not in message
    with pytest.raises(InputError, match="outside the checkpoint directory"):
        extract_layer(copy_ckpt, 0, tmp_path / "layer_0.safetensors")
    assert not (tmp_path / "layer_0.safetensors").exists()


def test_manifest_path_is_project_relative_and_survives_a_move(copy_ckpt, monkeypatch):
    project = copy_ckpt.parent
    monkeypatch.chdir(project)
    manifest = build_manifest("ckpt", {"source": "local"})
    assert manifest["path"] == "ckpt"
    moved = project.parent / "moved"
    project.rename(moved)
    monkeypatch.chdir(moved)
    assert manifest_checkpoint(manifest) == moved.joinpath("ckpt").relative_to(moved)
    # a checkpoint outside the project stays absolute
    elsewhere = moved.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert os.path.isabs(build_manifest(moved / "ckpt", {"source": "local"})["path"])


def test_checkpoint_changed_since_manifest_is_noticed(copy_ckpt, monkeypatch):
    monkeypatch.chdir(copy_ckpt.parent)
    manifest = build_manifest("ckpt", {"source": "local"})
    shard = copy_ckpt / Checkpoint(copy_ckpt).shard_names[2]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, mtime put back: only the hash can tell
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(InputError, match=rf"checkpoint file ckpt/{shard.name} changed since .*--forcerun download"):
        manifest_checkpoint(manifest)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(InputError, match=rf"{shard.name} changed"):
        manifest_checkpoint(manifest)


def _rewrite_header(path, edit) -> None:
    """Apply edit(header dict) to a safetensors file's JSON header, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


EXPERT = "thinker.model.layers.1.mlp.experts.2.gate_proj.weight"
NEXT = "thinker.model.layers.1.mlp.experts.2.up_proj.weight"


def _overlap(h):
    h[NEXT]["data_offsets"] = [h[EXPERT]["data_offsets"][0], h[EXPERT]["data_offsets"][1]]


def _negative_dim(h):
    h[EXPERT]["shape"] = [-h[EXPERT]["shape"][0], -h[EXPERT]["shape"][1]]


def _float_dim(h):
    h[EXPERT]["shape"] = [float(d) for d in h[EXPERT]["shape"]]


def _past_end(h):
    h[EXPERT]["data_offsets"] = [10**9, 10**9 + h[EXPERT]["data_offsets"][1] - h[EXPERT]["data_offsets"][0]]


@pytest.mark.parametrize("edit, message", [
    (_overlap, "overlap"), (_negative_dim, "negative or non-integer"), (_float_dim, "negative or non-integer"),
    (_past_end, "past the file"),
])
def test_validation_refuses_headers_the_loader_rejects(omni_extracted, tmp_path, edit, message):
    ckpt = omni_extracted.ckpt
    bad = tmp_path / "layer_1.safetensors"
    shutil.copy(omni_extracted.layers[1], bad)
    _rewrite_header(bad, edit)
    with pytest.raises(InputError, match=message) as err:
        validate_layer(ckpt, 1, bad)
    assert "layers.1.mlp.experts.2" in str(err.value)


def test_validation_refuses_an_integer_norm(omni_ckpt, tmp_path):
    """An I16 norm of the same byte size in both source and extraction: the bytes match, the dtype cannot."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(omni_ckpt, ckpt)
    norm = "thinker.model.norm.weight"
    shard = ckpt / Checkpoint(ckpt).weight_map[norm]
    _rewrite_header(shard, lambda h: h[norm].update(dtype="I16"))
    extract_dense(ckpt, tmp_path / "dense.safetensors")
    with pytest.raises(InputError, match=rf"dense tensor {norm}: dtype I16 .*floating point"):
        validate_dense(ckpt, tmp_path / "dense.safetensors")
    assert detect_checkpoint(ckpt)  # the checkpoint itself still parses: the refusal is validation's


def _edit_text_config(ckpt, **values):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["thinker_config"]["text_config"].update(values)
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    (lambda c: _edit_text_config(c, num_hidden_layers=10**9), "num_layers is 1000000000"),
    (lambda c: _edit_text_config(c, num_hidden_layers="48"), "num_layers is '48'"),
    (lambda c: _edit_text_config(c, num_experts_per_tok=99), "num_experts_per_tok 99 is more than num_experts"),
    (lambda c: _edit_text_config(c, num_key_value_heads=3), "not divisible by num_key_value_heads 3"),
    (lambda c: _edit_text_config(c, hidden_size=None), "wrong type"),
    (lambda c: (c / "config.json").write_text("[1, 2]"), "is not a JSON object"),
    (lambda c: (c / "config.json").write_bytes(b"\xff\xfe{"), "is not valid JSON"),
    (lambda c: (c / INDEX_NAME).write_text('{"weight_map": [1]}'), "not a safetensors index"),
])
def test_bad_checkpoint_config_is_refused(copy_ckpt, edit, message):
    edit(copy_ckpt)
    with pytest.raises(InputError, match=message):
        build_manifest(copy_ckpt, {})


def test_huge_layer_count_is_one_line_at_parse_time(workdir, copy_ckpt):
    """The planner reads config.json: a billion layers is one line at once, not a hang or MemoryError."""
    from conftest import error_lines, set_config, snakemake

    _edit_text_config(copy_ckpt, num_hidden_layers=10**9)
    set_config(workdir, model={"source": "local", "path": str(copy_ckpt)})
    proc = snakemake(workdir, "-n", "results/compare.json", timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "num_layers is 1000000000" in lines[0], proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
