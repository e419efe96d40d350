"""Proof that extracted files hold exactly the source's bytes, and that nothing is missing or doubled.

Both sides are read straight from the files at the offsets their headers declare, through a header
reader written here apart from checkpoint.read_header (which the extractor uses), so that one bug cannot
both misplace bytes and approve them. Expectations (which experts, which projections, shapes, dtypes)
come from config.json and the source index, not from the extracted file.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from math import prod
from pathlib import Path

import xxhash

from .shards import Checkpoint, TensorInfo
from ..errors import InputError
from ..hashing import CHUNK, hash_file
from .layouts import PROJECTIONS, detect, read_config

TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Every tensor of the text model is a weight, a norm or an embedding: floating point only.
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}
WEIGHT_DTYPES = {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


class ExtractedFileError(InputError):
    """A check failed on the extracted file's side (its header, tensors, shapes, dtypes or bytes), the
    source having passed its manifest check: extracting it again repairs it."""


def declared_tensors(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """(metadata, tensors at absolute offsets) as a safetensors file's header declares them; refuses a
    header whose entries the loader would reject (non-integer or negative dims or offsets, a span that
    does not match the shape, bytes past the end of the file, two tensors sharing bytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise InputError(f"{path}: not a safetensors file (its first 8 bytes are no header length "
                                 f"that fits its {size} bytes)")
            header = json.loads(f.read(n))
        base = 8 + n
        tensors = {name: TensorInfo(name, path, e["dtype"], tuple(e["shape"]), base + e["data_offsets"][0],
                                    e["data_offsets"][1] - e["data_offsets"][0])
                   for name, e in header.items() if name != "__metadata__"}
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise InputError(f"{path}: unreadable safetensors header ({type(err).__name__}: {str(err)[:200]})") from None
    ends = []
    for name, t in tensors.items():
        begin = t.offset - base
        if not all(_natural(d) for d in t.shape) or not _natural(begin) or not _natural(t.nbytes):
            raise InputError(f"{path}: tensor {name}: negative or non-integer shape or offsets in the header")
        if t.dtype not in DTYPE_BYTES or t.nbytes != DTYPE_BYTES[t.dtype] * prod(t.shape):
            raise InputError(f"{path}: tensor {name}: {t.nbytes} bytes do not hold {t.dtype} {list(t.shape)}")
        if t.offset + t.nbytes > size:
            raise InputError(f"{path}: tensor {name}: ends at byte {t.offset + t.nbytes}, past the file's {size}")
        ends.append((t.offset, t.offset + t.nbytes, name))
    ends.sort()
    for (_, end, a), (begin, _, b) in zip(ends, ends[1:]):
        if begin < end:
            raise InputError(f"{path}: tensors {a} and {b} overlap in the header's byte ranges")
    return header.get("__metadata__", {}), tensors


def _extracted_tensors(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """declared_tensors of an extracted file, whose faults are its own."""
    try:
        return declared_tensors(path)
    except ExtractedFileError:
        raise
    except InputError as err:
        raise ExtractedFileError(str(err)) from None


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _source(ckpt: Checkpoint, name: str, shards: dict) -> TensorInfo:
    shard = ckpt.shard_path(ckpt.weight_map[name])
    if shard not in shards:
        shards[shard] = declared_tensors(shard)[1]
    try:
        return shards[shard][name]
    except KeyError:
        raise InputError(f"tensor {name}: the index names {shard.name}, whose header lacks it") from None


def hash_tensor(info: TensorInfo, error=InputError) -> str:
    h = xxhash.xxh3_128()
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        left = info.nbytes
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise error(f"{info.file}: truncated inside {info.name}")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _config_dtype(config: dict) -> str | None:
    name = config.get("dtype") or config.get("torch_dtype")
    return TORCH_TO_ST.get(name) if isinstance(name, str) else None


def _check_tensors(ckpt: Checkpoint, extracted_path: Path, expected: list[str], label, shapes=None, dtype=None) -> dict:
    """Compare every expected tensor of one extracted file with its source; label(name) names it in errors.
    Faults of the extracted file raise ExtractedFileError, the source's InputError."""
    extracted, shards = _extracted_tensors(extracted_path)[1], {}
    for name in expected:
        if name not in extracted:
            raise ExtractedFileError(f"{label(name)}: missing from {extracted_path}")
    extra = sorted(set(extracted) - set(expected))
    if extra:
        raise ExtractedFileError(f"{extracted_path}: holds {len(extra)} unexpected tensors, e.g. {extra[0]}")
    report = {}
    for name in expected:
        if name not in ckpt.weight_map:
            raise InputError(f"{label(name)}: not in the source index {ckpt.path}")
        ours, src = extracted[name], _source(ckpt, name, shards)
        want_shape = shapes(name) if shapes else src.shape
        if src.shape != want_shape:
            raise InputError(f"{label(name)}: source {src.file.name} has shape {list(src.shape)}, config.json says {list(want_shape)}")
        if ours.shape != want_shape:
            raise ExtractedFileError(f"{label(name)}: extracted shape {list(ours.shape)}, config.json says {list(want_shape)}")
        if src.dtype not in WEIGHT_DTYPES:
            raise InputError(f"{label(name)}: dtype {src.dtype} in source {src.file.name}, a weight must be floating point")
        if ours.dtype not in WEIGHT_DTYPES:
            raise ExtractedFileError(f"{label(name)}: dtype {ours.dtype} in {extracted_path}, a weight must be floating point")
        want_dtype = dtype or src.dtype
        if src.dtype != want_dtype:
            raise InputError(f"{label(name)}: source dtype {src.dtype}, config.json says {want_dtype}")
        if ours.dtype != want_dtype:
            raise ExtractedFileError(f"{label(name)}: extracted dtype {ours.dtype}, config.json says {want_dtype}")
        # the source passed its manifest check, so a difference is the extracted file's
        ours_hash, src_hash = hash_tensor(ours, ExtractedFileError), hash_tensor(src)
        if ours_hash != src_hash:
            raise ExtractedFileError(f"{label(name)}: extracted bytes differ from source {src.file.name} "
                                     f"(xxh3 {ours_hash} != {src_hash})")
        report[name] = {"xxh3_128": ours_hash, "shape": list(ours.shape), "dtype": ours.dtype, "source": src.file.name}
    return report


def validate_layer(checkpoint_dir: str | Path, layer: int, extracted_path: str | Path) -> dict:
    config = read_config(checkpoint_dir)
    layout, cfg = detect(config)
    cfg.check_layer(layer)
    ckpt, extracted_path = Checkpoint(checkpoint_dir), Path(extracted_path)
    meta = _extracted_tensors(extracted_path)[0]
    if meta.get("layer") != str(layer):
        raise ExtractedFileError(f"{extracted_path}: header says layer {meta.get('layer')}, expected layer {layer}")
    expected = layout.expert_names(layer, cfg.num_experts)
    shapes = cfg.expert_shapes()
    prefix = layout.expert_prefix(layer)

    def label(name: str) -> str:
        expert, proj = name[len(prefix):].split(".")[:2]
        return f"layer {layer} expert {expert} {proj}"

    tensors = _check_tensors(ckpt, extracted_path, expected, label,
                             shapes=lambda n: shapes[n.rsplit(".", 2)[-2]], dtype=_config_dtype(config))
    # The cache reads one expert as one byte range: its three tensors must be adjacent, in order.
    infos = _extracted_tensors(extracted_path)[1]
    for e in range(cfg.num_experts):
        parts = [infos[layout.expert(layer, e, p)] for p in PROJECTIONS]
        if any(a.offset + a.nbytes != b.offset for a, b in zip(parts, parts[1:])):
            raise ExtractedFileError(f"layer {layer} expert {e}: its tensors are not one contiguous byte range in {extracted_path}")
    return {"layer": layer, "file": str(extracted_path), "file_xxh3_128": hash_file(extracted_path),
            "num_experts": cfg.num_experts, "tensors": tensors}


def validate_dense(checkpoint_dir: str | Path, extracted_path: str | Path) -> dict:
    config = read_config(checkpoint_dir)
    layout, _ = detect(config)
    ckpt = Checkpoint(checkpoint_dir)
    tensors = _check_tensors(ckpt, Path(extracted_path), layout.dense_names(ckpt.weight_map), lambda n: f"dense tensor {n}",
                             dtype=None)
    return {"file": str(extracted_path), "file_xxh3_128": hash_file(extracted_path), "tensors": tensors}


def validate_towers(checkpoint_dir: str | Path, extracted_path: str | Path) -> dict:
    """The towers file: exactly the source's audio and vision tower tensors, byte for byte."""
    layout, _ = detect(read_config(checkpoint_dir))
    ckpt = Checkpoint(checkpoint_dir)
    names = layout.tower_names(ckpt.weight_map)
    if not names:
        raise InputError(f"{ckpt.path}: the checkpoint has no audio or vision tower tensors")
    tensors = _check_tensors(ckpt, Path(extracted_path), names, lambda n: f"tower tensor {n}", dtype=None)
    return {"file": str(extracted_path), "file_xxh3_128": hash_file(extracted_path), "tensors": tensors}


def validate_all(checkpoint_dir: str | Path, dense_report: dict, layer_reports: list[dict]) -> dict:
    """Across the dense file and all layers, each tensor of the text model appears exactly once."""
    layout, cfg = detect(read_config(checkpoint_dir))
    ckpt = Checkpoint(checkpoint_dir)
    got_layers = sorted(r["layer"] for r in layer_reports)
    if got_layers != cfg.expert_layers:
        missing = sorted(set(cfg.expert_layers) - set(got_layers))
        raise InputError(f"expert layers {missing or got_layers} missing or unexpected among the checksum files")
    seen = Counter(list(dense_report["tensors"]))
    for report in layer_reports:
        seen.update(list(report["tensors"]))
    component = [name for name in ckpt.weight_map if layout.in_component(name)]
    for name in component:
        if seen[name] != 1:
            raise InputError(f"tensor {name} appears {seen[name]} times across the extracted files, expected once")
    extra = sorted(set(seen) - set(component))
    if extra:
        raise InputError(f"extracted files hold {extra[0]}, which is not a tensor of the source's text model")
    return {
        "checkpoint": str(checkpoint_dir),  # as the manifest gives it: project-relative where inside
        "layout": layout.name,
        "tensors": len(component),
        "dense": {"file": dense_report["file"], "file_xxh3_128": dense_report["file_xxh3_128"],
                  "tensors": len(dense_report["tensors"])},
        "layers": {str(r["layer"]): {"file": r["file"], "file_xxh3_128": r["file_xxh3_128"], "tensors": len(r["tensors"])}
                   for r in sorted(layer_reports, key=lambda r: r["layer"])},
        "valid": True,
    }
