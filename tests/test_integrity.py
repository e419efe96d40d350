"""Issue 18, item 4: the manifest covers every shard the index names (subfolders too), shards may link
only inside the checkpoint or into their hub repo's blobs/, a file that is not safetensors is named as
such, extracted files carry no path of their checkout, and a layer that fails validation is repaired by
the next run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from moe_offload.checkpoint.extract import extract_dense, extract_layer
from moe_offload.checkpoint.manifest import manifest_checkpoint
from moe_offload.checkpoint.shards import INDEX_NAME, Checkpoint, read_header
from moe_offload.checkpoint.source import build_manifest
from moe_offload.checkpoint.validate import ExtractedFileError, validate_dense, validate_layer
from moe_offload.errors import InputError

from conftest import error_lines, snakemake, use_small_synthetic

LAYER = 1


@pytest.fixture
def copy_ckpt(omni_ckpt, tmp_path) -> Path:
    dst = tmp_path / "project" / "ckpt"
    shutil.copytree(omni_ckpt, dst)
    return dst


def _layer_shard(ckpt: Path) -> str:
    """A shard holding some of layer LAYER's experts (so extraction and validation read it)."""
    weight_map = Checkpoint(ckpt).weight_map
    return weight_map[f"thinker.model.layers.{LAYER}.mlp.experts.0.gate_proj.weight"]


def _rename_in_index(ckpt: Path, old: str, new: str) -> None:
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["weight_map"] = {t: (new if s == old else s) for t, s in index["weight_map"].items()}
    (ckpt / INDEX_NAME).write_text(json.dumps(index))


def _flip_last_byte_keep_size(path: Path) -> None:
    """Same size, a new mtime: the manifest must fall back to the hash to see it."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))


# --- the manifest covers shards in subfolders -------------------------------------------------------

def test_a_shard_in_a_subfolder_is_in_the_manifest_and_a_change_to_it_is_noticed(copy_ckpt, monkeypatch):
    from moe_offload.steps import _native_files

    shard = _layer_shard(copy_ckpt)
    (copy_ckpt / "weights").mkdir()
    (copy_ckpt / shard).rename(copy_ckpt / "weights" / shard)
    _rename_in_index(copy_ckpt, shard, f"weights/{shard}")
    monkeypatch.chdir(copy_ckpt.parent)
    manifest = build_manifest("ckpt", {"source": "local"})
    names = [f["name"] for f in manifest["files"]]
    assert f"weights/{shard}" in names and "config.json" in names
    # every present shard the index names is recorded, and nothing else but top-level files
    assert set(Checkpoint("ckpt").shard_names) <= set(names)
    assert all("/" not in n or n == f"weights/{shard}" for n in names)
    # the native reference hashes it too
    assert Path(f"ckpt/weights/{shard}") in [p for p, _, _ in _native_files(Path("ckpt"), manifest)]
    assert manifest_checkpoint(manifest) == Path("ckpt")
    _flip_last_byte_keep_size(copy_ckpt / "weights" / shard)
    with pytest.raises(InputError, match=rf"^checkpoint file ckpt/weights/{shard} changed since .*--forcerun download$"):
        manifest_checkpoint(manifest)


# --- the symlink rule -------------------------------------------------------------------------------

def test_a_shard_linking_out_of_the_checkpoint_is_refused_naming_it(copy_ckpt, tmp_path):
    shard = _layer_shard(copy_ckpt)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (copy_ckpt / shard).rename(outside / shard)  # the same valid bytes, reached through a link
    (copy_ckpt / shard).symlink_to(outside / shard)
    for call in (lambda: build_manifest(copy_ckpt, {}),
                 lambda: extract_layer(copy_ckpt, LAYER, tmp_path / "layer.safetensors")):
        with pytest.raises(InputError) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"{copy_ckpt / shard}: a symlink that leads out of the checkpoint directory")
        assert "\n" not in message and "elsewhere" not in message
    assert not (tmp_path / "layer.safetensors").exists()


def test_a_shard_under_a_linked_folder_out_of_the_checkpoint_is_refused(copy_ckpt, tmp_path):
    shard = _layer_shard(copy_ckpt)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (copy_ckpt / shard).rename(outside / shard)
    (copy_ckpt / "weights").symlink_to(outside, target_is_directory=True)
    _rename_in_index(copy_ckpt, shard, f"weights/{shard}")
    with pytest.raises(InputError, match="a symlink that leads out of the checkpoint directory"):
        build_manifest(copy_ckpt, {})


def test_a_shard_linking_inside_the_checkpoint_is_allowed(copy_ckpt, tmp_path):
    shard = _layer_shard(copy_ckpt)
    (copy_ckpt / "store").mkdir()
    (copy_ckpt / shard).rename(copy_ckpt / "store" / shard)
    (copy_ckpt / shard).symlink_to(Path("store") / shard)
    build_manifest(copy_ckpt, {})
    extract_layer(copy_ckpt, LAYER, tmp_path / "layer.safetensors")
    assert validate_layer(copy_ckpt, LAYER, tmp_path / "layer.safetensors")["layer"] == LAYER


def _hub_snapshot(ckpt: Path, cache: Path, repo: str = "models--org--tiny", blobs_repo: str | None = None) -> Path:
    """ckpt laid out as huggingface_hub stores it: every file a relative symlink into the repo's blobs/."""
    snapshot = cache / repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    blobs = cache / (blobs_repo or repo) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(ckpt.iterdir())):
        blob = blobs / f"blob{i:04d}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_a_hub_snapshot_linking_into_its_blobs_is_allowed(omni_ckpt, tmp_path):
    snapshot = _hub_snapshot(omni_ckpt, tmp_path / "hub")
    assert (snapshot / _layer_shard(snapshot)).is_symlink()
    build_manifest(snapshot, {})
    extract_layer(snapshot, LAYER, tmp_path / "layer.safetensors")
    extract_dense(snapshot, tmp_path / "dense.safetensors")
    assert validate_layer(snapshot, LAYER, tmp_path / "layer.safetensors")["layer"] == LAYER
    assert validate_dense(snapshot, tmp_path / "dense.safetensors")["tensors"]


def test_a_hub_snapshot_linking_into_another_repos_blobs_is_refused(omni_ckpt, tmp_path):
    snapshot = _hub_snapshot(omni_ckpt, tmp_path / "hub", blobs_repo="models--other--repo")
    with pytest.raises(InputError, match="a symlink that leads out of the checkpoint directory"):
        build_manifest(snapshot, {})


# --- "not a safetensors file" names the file --------------------------------------------------------

@pytest.mark.parametrize("content", ["link to config.json", b"x" * 4, b"GIF89a" + b"\x00" * 200])
def test_a_shard_that_is_not_safetensors_is_named_as_such(copy_ckpt, content):
    shard = copy_ckpt / _layer_shard(copy_ckpt)
    shard.unlink()
    if content == "link to config.json":  # the case: a link (inside) to another kind of file
        shard.symlink_to("config.json")
    else:
        shard.write_bytes(content)
    with pytest.raises(InputError) as err:
        build_manifest(copy_ckpt, {})
    message = str(err.value)
    assert message.startswith(f"{shard}: not a safetensors file") and "\n" not in message
    assert not any(len(word) > 12 and word.isdigit() for word in message.split())  # no absurd header length
    with pytest.raises(InputError, match=rf"^{shard}: not a safetensors file"):
        read_header(shard)


def test_an_extracted_file_that_is_not_safetensors_is_the_extracted_files_fault(omni_ckpt, tmp_path):
    bad = tmp_path / "layer.safetensors"
    bad.write_bytes((omni_ckpt / "config.json").read_bytes())
    with pytest.raises(ExtractedFileError, match=rf"^{bad}: not a safetensors file"):
        validate_layer(omni_ckpt, LAYER, bad)


# --- no absolute path in extracted files ------------------------------------------------------------

def test_two_clones_extract_identical_bytes_with_no_path_in_them(omni_ckpt, tmp_path):
    outputs = []
    for clone in ("clone_a", "clone_b/deeper"):
        ckpt = tmp_path / clone / "results/model/checkpoint"
        shutil.copytree(omni_ckpt, ckpt)
        out = tmp_path / clone / "results/experts"
        extract_layer(ckpt, LAYER, out / f"layer_{LAYER}.safetensors")
        extract_dense(ckpt, out / "dense.safetensors")
        outputs.append(out)
        assert validate_layer(ckpt, LAYER, out / f"layer_{LAYER}.safetensors")["layer"] == LAYER
    for name in (f"layer_{LAYER}.safetensors", "dense.safetensors"):
        a, b = (out / name for out in outputs)
        assert a.read_bytes() == b.read_bytes(), name
        header = json.dumps(read_header(a)[0])
        assert str(tmp_path) not in header and "clone_a" not in header


# --- a layer that fails validation is re-extracted by the next run ----------------------------------

def test_which_side_a_validation_fault_is_on(omni_ckpt, copy_ckpt, tmp_path):
    good = tmp_path / "layer.safetensors"
    extract_layer(omni_ckpt, LAYER, good)
    bad = tmp_path / "bad.safetensors"
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ExtractedFileError, match=f"layer {LAYER} expert .*extracted bytes differ"):
        validate_layer(omni_ckpt, LAYER, bad)
    # a fault of the source is not the extracted file's: re-extracting would not repair it
    cfg = json.loads((copy_ckpt / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["moe_intermediate_size"] += 1
    (copy_ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="source .* has shape") as err:
        validate_layer(copy_ckpt, LAYER, good)
    assert not isinstance(err.value, ExtractedFileError)


@pytest.mark.slow
def test_a_corrupted_layer_is_removed_and_the_next_run_extracts_it_again(workdir):
    use_small_synthetic(workdir, num_layers=2)
    target = f"results/checksums/layer_{LAYER}.json"
    first = snakemake(workdir, "--cores", "1", target)
    assert first.returncode == 0, first.stderr[-3000:]
    layer_file = workdir / f"results/experts/layer_{LAYER}.safetensors"
    good = layer_file.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside an expert; the new mtime makes validation rerun
    layer_file.write_bytes(bytes(data))
    failed = snakemake(workdir, "--cores", "1", target)
    assert failed.returncode != 0
    lines = set(error_lines(failed))  # the job's line, also shown again from its log
    assert len(lines) == 1, failed.stderr[-3000:]
    line = lines.pop()
    assert "extracted bytes differ from source" in line
    assert line.endswith(f"removed results/experts/layer_{LAYER}.safetensors, the next run extracts it again")
    assert not layer_file.exists() and not (workdir / target).exists()
    again = snakemake(workdir, "--cores", "1", target)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rule extract_layer:" in again.stderr and "rule download:" not in again.stderr
    assert layer_file.read_bytes() == good
    assert json.loads((workdir / target).read_text())["layer"] == LAYER
